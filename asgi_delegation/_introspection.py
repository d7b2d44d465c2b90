"""Opaque bearer tokens validated by OAuth 2.0 Token Introspection (RFC 7662).

One POST per token to the issuer's introspection endpoint, authenticated as this middleware's
client, bounded by one deadline (credentials, a slot of the limiter shared with token exchanges,
the request and a capped body read), no redirect followed. Concurrent introspections of one
token share that request (single-flight on the token's SHA-256, never the token).

An answer is judged strictly, in two steps. First its shape: a body that is no JSON object,
duplicate members, ``active`` that is not a boolean, or a member of the wrong JSON type is the
server's fault, so it becomes :class:`Unavailable` (503 with ``Retry-After``), as does any
status but 2xx, a redirect, a timeout or a network failure; none is cached. Then what it says:
an inactive token, no subject, no audience of ours, another issuer, an expired or not yet valid
token, or a refresh or sender-constrained token is :class:`InvalidToken` (401), remembered for
a few seconds so that a replayed bad token does not reach the server again. A token found
valid is returned; the caller keeps it in the validated-token cache until ``cache_until``.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import anyio

from . import _clock
from ._audit import Auditor
from ._claims import Common
from ._client_auth import ClientAuth
from ._discovery import Discovery
from ._fetch import HEADERS, BodyRefused, parse_json_object, read_capped
from ._http import HTTPClient
from ._loops import PerLoop, Slot
from ._refresh import Unavailable
from ._singleflight import SingleFlight
from ._tokens import InvalidToken, ValidToken, _numeric_date, valid_token

MAX_BODY = 256 * 1024
#: How long an introspection that disqualified a token is remembered (monotonic seconds).
NEGATIVE_TTL = 5.0
_RETRY_AFTER_BASE, _RETRY_AFTER_CAP = 1.0, 5.0
_MAX_SUBJECT = 1024
_VISIBLE = re.compile(rb"[\x21-\x7e]+")
_ABSENT: Any = object()
#: RFC 7662 2.2 members that are strings when present (``null`` is a wrong type, not absence).
_STRINGS = ("sub", "iss", "client_id", "username", "token_type", "jti")
_DATES = ("exp", "nbf", "iat")
#: Token types that are no access token, or not one usable as a bearer token here (RFC 9449
#: sender-constrained tokens say ``DPoP``).
_REFUSED_TYPES = frozenset(
    {"refresh_token", "urn:ietf:params:oauth:token-type:refresh_token", "dpop"}
)
_DOCUMENT = "introspection"


class _Unusable(Exception):
    """No verdict could be had; the message (URLs and reasons only) goes to the FetchEvent."""


class Introspector:
    """Validates opaque bearer tokens at one authorization server's introspection endpoint.

    ``cache_size`` bounds the negative cache (disqualified tokens, oldest out); the positive
    cache is the caller's. ``cache_ttl`` bounds how long a token found valid may be cached, and
    how long it is usable when the answer has no ``exp``.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audiences: frozenset[str],
        endpoint: str | None,
        discovery: Discovery,
        http: HTTPClient,
        client_auth: ClientAuth,
        leeway: float,
        cache_ttl: float,
        cache_size: int,
        limiter: PerLoop[anyio.CapacityLimiter],
        deadline: float,
        auditor: Auditor,
        common: Common,
    ) -> None:
        self._issuer = issuer
        self._audiences = audiences
        self._endpoint = endpoint
        self._discovery = discovery
        self._http = http
        self._client_auth = client_auth
        self._leeway = leeway
        self._cache_ttl = cache_ttl
        self._limiter = limiter  # shared with the token exchanges
        self._deadline = deadline
        self._auditor = auditor
        self._common = common
        # Disqualified tokens by digest: (forgotten at, monotonic; reason; member), oldest first.
        self._negative: OrderedDict[bytes, tuple[float, str, str | None]] = OrderedDict()
        self._negative_size = max(1, cache_size)
        self._flight: SingleFlight[ValidToken] = SingleFlight()
        self._failures = 0  # introspections in a row that had no verdict: the Retry-After grows

    def __repr__(self) -> str:
        return f"Introspector(issuer={self._issuer!r})"

    async def introspect(self, token: bytes, digest: bytes) -> ValidToken:
        """The token's validation by its issuer; raises :class:`InvalidToken` (401) or
        :class:`Unavailable` (503). ``digest`` is the token's SHA-256."""
        # RFC 6750 tokens are visible ASCII: anything else is no token, and is not sent out.
        if not _VISIBLE.fullmatch(token):
            raise InvalidToken("malformed")
        remembered = self._negative.get(digest)
        if remembered is not None:
            until, reason, member = remembered
            if _clock.monotonic() < until:
                raise InvalidToken(reason, member)
            del self._negative[digest]
        work = partial(self._introspect, token.decode("ascii"), digest)
        return await self._flight.run(digest, work)

    async def _introspect(self, token: str, digest: bytes) -> ValidToken:
        """The shared flight: one request and its verdict, reported as one FetchEvent."""
        endpoint = await self._endpoint_url()
        started = time.perf_counter()
        try:
            valid = self._judge(await self._post(endpoint, token))
        except _Unusable as exc:
            self._failures += 1
            self._auditor.fetched(_DOCUMENT, endpoint, started, str(exc), "POST")
            raise Unavailable(self._retry_after()) from None
        except InvalidToken as exc:
            self._failures = 0
            self._auditor.fetched(_DOCUMENT, endpoint, started, None, "POST")
            self._remember(digest, exc)
            raise
        self._failures = 0
        self._auditor.fetched(_DOCUMENT, endpoint, started, None, "POST")
        return valid

    def _retry_after(self) -> float:
        return min(_RETRY_AFTER_CAP, _RETRY_AFTER_BASE * 2.0 ** min(self._failures - 1, 8))

    def _remember(self, digest: bytes, exc: InvalidToken) -> None:
        negative = self._negative
        now = _clock.monotonic()
        # Every entry lives as long, so the oldest are the first to expire: they go first, and
        # the cache holds what the last few seconds brought, not what an attack once did.
        while negative and next(iter(negative.values()))[0] <= now:
            negative.popitem(last=False)
        negative[digest] = (now + NEGATIVE_TTL, exc.reason, exc.member)
        negative.move_to_end(digest)
        if len(negative) > self._negative_size:
            negative.popitem(last=False)

    async def _endpoint_url(self) -> str:
        if self._endpoint is not None:
            return self._endpoint
        endpoint = (await self._discovery.get()).introspection_endpoint  # or Unavailable
        if endpoint is None:
            self._failures += 1
            self._auditor.fetched(
                _DOCUMENT,
                self._issuer,
                time.perf_counter(),
                "the authorization server metadata names no introspection_endpoint",
                "POST",
            )
            raise Unavailable(self._retry_after())
        return endpoint

    async def _post(self, endpoint: str, token: str) -> dict[str, Any]:
        """The answer of one authenticated POST, parsed; raises :class:`_Unusable`."""
        form = {"token": token, "token_type_hint": "access_token"}
        headers = dict(HEADERS)
        deadline = self._deadline
        limiter = self._limiter.get()
        body = b""
        # One deadline over it all; the stage reached tells a timeout or failure apart.
        stage = "credentials"
        try:
            with anyio.fail_after(deadline):
                await self._client_auth.apply(form, headers, endpoint)
                stage = "queued"
                async with Slot(limiter):  # excess requests wait here, within the deadline
                    stage = "sent"
                    async with self._http.get().stream(
                        "POST", endpoint, data=form, headers=headers, follow_redirects=False
                    ) as response:
                        status = response.status_code
                        if 200 <= status < 300:
                            body = await read_capped(response, MAX_BODY)
        except TimeoutError:  # an OSError too: caught first
            if stage == "credentials":
                raise _Unusable(
                    f"the client credentials were not ready within {deadline:g} s"
                ) from None
            if stage == "queued":  # every slot was taken (exchanges and introspections)
                raise _Unusable(
                    f"not sent: the limit of {limiter.total_tokens:g} concurrent requests to the "
                    f"authorization server was reached for all of {deadline:g} s"
                ) from None
            raise _Unusable(f"no answer within {deadline:g} s") from None
        except BodyRefused as exc:
            raise _Unusable(f"answered {exc}") from None
        except Exception as exc:
            if stage == "credentials":
                if isinstance(exc, OSError):  # AssertionFile: its path and why, not its content
                    raise _Unusable(str(exc)) from None
                raise _Unusable(f"the client credentials failed ({type(exc).__name__})") from None
            # Anything httpx or the network below it raises: named by its type alone, since its
            # text may quote the request, which holds the token and the client's credentials.
            raise _Unusable(f"could not be reached ({type(exc).__name__})") from None
        if status in (401, 403):
            raise _Unusable(f"refused this middleware's client credentials (HTTP {status})")
        if 300 <= status < 400:
            raise _Unusable(f"answered a redirect (HTTP {status}), which is not followed")
        if not 200 <= status < 300:
            raise _Unusable(f"answered HTTP {status}")
        try:
            return parse_json_object(body, unique_keys=True)
        except ValueError as exc:  # the message names the parser's failure, never the body
            raise _Unusable(f"answered {exc}") from None

    def _judge(self, answer: dict[str, Any]) -> ValidToken:
        """The token an answer vouches for; raises :class:`_Unusable` for an answer of the
        wrong shape, then :class:`InvalidToken` for a token it disqualifies."""
        active = answer.get("active", _ABSENT)
        if active is _ABSENT:
            raise _Unusable("answered without the active member")
        if not isinstance(active, bool):
            raise _Unusable("answered an active member that is not a boolean")
        if not active:  # RFC 7662 2.2: nothing else need be said, nor is anything else read
            raise InvalidToken("inactive")
        # The shape of every member read, before any verdict: a broken answer is always a 503.
        for name in _STRINGS:
            value = answer.get(name, _ABSENT)
            if value is not _ABSENT and not isinstance(value, str):
                raise _Unusable(f"answered a {name} member that is not a string")
        dates: dict[str, float | None] = {}
        for name in _DATES:
            try:
                dates[name] = _numeric_date(answer, name, required=False)
            except InvalidToken:
                raise _Unusable(f"answered a {name} member that is not a NumericDate") from None
        audiences = _audiences(answer.get("aud", _ABSENT))
        scopes = _scopes(answer.get("scope", _ABSENT))
        token_type = answer.get("token_type")
        now, leeway = _clock.now(), self._leeway
        exp, nbf, iat = dates["exp"], dates["nbf"], dates["iat"]
        # Then the verdict.
        if token_type is not None and token_type.lower() in _REFUSED_TYPES:
            raise InvalidToken("type", "token_type")
        if "cnf" in answer:  # bound to a key or certificate this middleware does not check
            raise InvalidToken("type", "cnf")
        if exp is not None and now >= exp + leeway:
            raise InvalidToken("expired")
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise InvalidToken("not_yet_valid")
        if "iss" in answer and answer["iss"] != self._issuer:
            raise InvalidToken("wrong_issuer")
        # Required even though RFC 7662 makes aud optional: the MCP spec requires the resource
        # server to check that the token was issued for it.
        if self._audiences.isdisjoint(audiences):
            raise InvalidToken("wrong_audience")
        subject = answer.get("sub")
        if not subject or len(subject) > _MAX_SUBJECT:
            raise InvalidToken("malformed", "sub")
        end = now + self._cache_ttl if exp is None else exp + leeway
        try:
            return valid_token(
                answer,
                subject=subject,
                scopes=scopes,
                usable_until=end,
                common=self._common,
                issuer=self._issuer,
                verified_by="introspection",
                cache_until=min(end, now + self._cache_ttl),
            )
        except InvalidToken:  # nested deeper than the claims can be copied: the server's doing
            raise _Unusable("answered members nested too deeply") from None


def _audiences(aud: object) -> frozenset[str]:
    if aud is _ABSENT:
        return frozenset()
    if isinstance(aud, str):
        return frozenset((aud,))
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return frozenset(aud)
    raise _Unusable("answered an aud member that is neither a string nor a list of strings")


def _scopes(scope: object) -> frozenset[str]:
    if scope is _ABSENT:
        return frozenset()
    if isinstance(scope, str):
        return frozenset(scope.split())
    raise _Unusable("answered a scope member that is not a string")
