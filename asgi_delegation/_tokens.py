"""Validation of inbound bearer JWTs (RFC 7519, RFC 9068 profile) with joserfc.

The header is parsed and judged here before any key is looked up, so a hostile header costs
neither a JWKS fetch nor a signature check. joserfc checks the signature with the one key the
header's ``kid`` and ``alg`` select; the claims are then checked here, strictly (types included).
Validated tokens are cached under a hash of the token until they expire.
"""

from __future__ import annotations

import binascii
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc.jws import JWSRegistry

from . import _clock
from ._claims import Common, ReadOnlyDict, freeze
from ._fetch import parse_json_object
from ._jwks import JWKS, MAX_KID_LENGTH
from ._printable import printable

_COMPACT_JWS = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_BASE64URL = bytes.maketrans(b"-_+/", b"+/-_")
_MAX_HEADERS = 16
# Headers that point at keys (honouring any would let the token choose its own key), critical
# extensions (none is understood here) and unencoded payloads (RFC 7797): all refused.
REFUSED_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
_TYP_ALLOWED = frozenset({"at+jwt", "application/at+jwt", "jwt", "application/jwt"})
_ABSENT: Any = object()
_TYP_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
_MAX_SUBJECT = 1024


#: Every ``InvalidToken.reason``.
REASONS = (
    "too_large",
    "malformed",
    "algorithm",
    "header",
    "type",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "inactive",
)


class InvalidToken(Exception):
    """The token is rejected. ``reason`` is a short category, safe to log; never the token.
    ``member`` names the claim or header member at fault, when one is."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(reason if member is None else f"{reason}: {member}")
        self.reason = reason
        self.member = member


# Not frozen: the dataclass's frozen __init__ costs a microsecond per validated token. Nothing
# changes a ValidToken after it is made but its ``sdk`` slot, filled once.
@dataclass(slots=True, eq=False)
class ValidToken:
    subject: str
    claims: Mapping[str, Any]
    scopes: frozenset[str]  # as the token says
    granted: frozenset[str]  # and those they imply: what sufficiency is decided on
    usable_until: float  # exp + leeway (Unix time): no grant is handed out for it after that
    cache_until: float  # when the validated-token cache forgets it (at most usable_until)
    # For audit events, worked out once per token rather than once per request:
    client_id: str | None  # the ``client_id`` or ``azp`` claim
    shown_subject: str  # the subject and client as log lines show them (escaped, bounded)
    shown_client_id: str | None
    issuer: str  # the configured issuer that vouched for the token
    verified_by: str  # "jwt" (signature) or "introspection" (RFC 7662)
    # The MCP SDK's principal for the token, set on its first request when the SDK is in use:
    # kept here, it is forgotten with the token and costs no cache entry of its own.
    sdk: Any = None


def valid_token(
    claims: dict[str, Any],
    *,
    subject: str,
    scopes: frozenset[str],
    usable_until: float,
    common: Common,
    issuer: str,
    verified_by: str,
    cache_until: float | None = None,
) -> ValidToken:
    """A :class:`ValidToken` from checked ``claims`` (a JWT's payload or an introspection
    answer), with everything worked out once per token; raises :class:`InvalidToken` when the
    claims cannot be frozen."""
    kept = _frozen(claims)
    common.share(kept)
    client_id = next(
        (v for v in (kept.get("client_id"), kept.get("azp")) if isinstance(v, str)), None
    )
    scopes, granted = common.scopes(scopes)
    return ValidToken(
        subject,
        kept,
        scopes,
        granted,
        usable_until,
        usable_until if cache_until is None else min(cache_until, usable_until),
        client_id,
        printable(subject),
        None if client_id is None else printable(client_id),
        issuer,
        verified_by,
    )


class TokenCache:
    """Validated tokens under the SHA-256 of the token, until they stop being usable; one for
    every issuer, since the issuer is known only once a token is validated. Bounded: when full,
    the oldest entry goes (an OrderedDict pops it in O(1))."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[bytes, ValidToken] = OrderedDict()
        self._size = size

    def get(self, digest: bytes) -> ValidToken | None:
        hit = self._entries.get(digest)
        if hit is not None and _clock.now() < hit.cache_until:
            return hit
        return None

    def put(self, digest: bytes, valid: ValidToken) -> None:
        entries = self._entries
        entries[digest] = valid
        if len(entries) > self._size:
            entries.popitem(last=False)


def _b64decode(segment: bytes) -> bytes:
    """An unpadded base64url segment, decoded strictly: any other character ('+', '/', '=',
    whitespace) raises ``binascii.Error``, so that no two spellings decode alike."""
    if b"=" in segment:
        raise binascii.Error("padding")
    # '-' and '_' become '+' and '/', and '+' and '/' become characters strict mode refuses.
    standard = segment.translate(_BASE64URL) + b"=" * (-len(segment) % 4)
    return binascii.a2b_base64(standard, strict_mode=True)


def _frozen(claims: dict[str, Any]) -> ReadOnlyDict:
    # Cached claims are shared by every request carrying the token: they must not change.
    if type(claims) is ReadOnlyDict:  # parsed so (a JWT's segments are)
        return claims
    try:
        return freeze(claims)  # type: ignore[no-any-return]
    except RecursionError:  # nesting the JSON parser accepted but the stack cannot copy
        raise InvalidToken("malformed") from None


def _parse_segment(segment: bytes) -> dict[str, Any]:
    try:
        return parse_json_object(_b64decode(segment), frozen=True)
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed") from None


def unverified(token: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None:
    """The header and the claims of ``token``, each decoded but NOT verified (None where that part
    is not base64url JSON), or None when ``token`` is no compact JWS: only ever to explain why
    the validator refused it."""
    if not _COMPACT_JWS.fullmatch(token):
        return None
    parts: list[dict[str, Any] | None] = []
    for segment in token.split(b".")[:2]:
        try:
            parts.append(_parse_segment(segment))
        except InvalidToken:
            parts.append(None)
    return parts[0], parts[1]


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name, _ABSENT)
    if value is _ABSENT:
        if required:
            raise InvalidToken("malformed", name)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("malformed", name)
    if isinstance(value, int) and abs(value) >= 2**53:  # beyond float precision, or overflow
        raise InvalidToken("malformed", name)
    if not math.isfinite(value):
        raise InvalidToken("malformed", name)
    return float(value)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):  # an array
            scopes.update(value)
        else:
            raise InvalidToken("malformed", name)
    return frozenset(scopes)


class TokenValidator:
    def __init__(
        self,
        jwks: JWKS,
        *,
        issuer: str,
        audiences: frozenset[str],
        algorithms: frozenset[str],
        leeway: float,
        max_bytes: int,
        require_at_jwt: bool,
        cache: TokenCache,
        common: Common,
    ) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._audiences = audiences
        self._algorithms = algorithms
        self._leeway = leeway
        self._max_bytes = max_bytes
        self._typ = _TYP_AT_JWT if require_at_jwt else _TYP_ALLOWED
        self._require_typ = require_at_jwt
        self._verifiers = {alg: JWSRegistry.algorithms[alg] for alg in algorithms}
        self._cache = cache
        self._common = common
        self._headers: dict[bytes, dict[str, Any]] = {}  # by segment: read-only, so shared

    async def validate(self, token: bytes, digest: bytes) -> ValidToken:
        """Validate ``token`` in full; raises :class:`InvalidToken`. The caller caches it."""
        if len(token) > self._max_bytes:
            raise InvalidToken("too_large")
        segments = token.split(b".")
        if len(segments) != 3 or not all(segments):
            raise InvalidToken("malformed")
        header_segment, payload_segment, signature_segment = segments
        try:  # strictly: every character outside the base64url alphabet is refused here
            signature = _b64decode(signature_segment)
        except binascii.Error:
            raise InvalidToken("malformed") from None
        # An issuer's tokens share a handful of headers: parsed once, judged every time.
        header = self._headers.get(header_segment)
        known = header is not None
        if header is None:
            header = _parse_segment(header_segment)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm")
        if REFUSED_HEADERS & header.keys():
            raise InvalidToken("header")
        typ = header.get("typ", _ABSENT)
        if typ is _ABSENT:
            if self._require_typ:
                raise InvalidToken("type")
        elif not isinstance(typ, str) or typ.lower() not in self._typ:
            raise InvalidToken("type")
        kid = header.get("kid", _ABSENT)
        if kid is _ABSENT:
            kid = None
        elif not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH:
            # Before any lookup: an unknown kid is remembered for a while, so its size counts.
            raise InvalidToken("malformed", "kid")
        # Claims are judged before the signature: they cost less to check than a signature.
        claims = _parse_segment(payload_segment)
        subject, scopes, usable_until = self._check_claims(claims)
        signing_key = await self._jwks.find(kid, alg)
        if signing_key is None:
            raise InvalidToken("unknown_key")
        # While the keys were fetched, a concurrent request may have validated this very token.
        done = self._cache.get(digest)
        if done is not None and done.issuer == self._issuer:
            return done
        # The header is already judged and the key chosen, so joserfc's algorithm verifies the
        # signature directly rather than parsing the whole token a second time.
        signing_input = token[: len(header_segment) + 1 + len(payload_segment)]
        try:
            verified = self._verifiers[alg].verify(signing_input, signature, signing_key.key)
        except Exception:  # a signature of the wrong shape for the key: never a 500
            verified = False
        if not verified:
            raise InvalidToken("bad_signature")
        if not known:  # only a signed header is kept
            if len(self._headers) >= _MAX_HEADERS:
                self._headers.clear()  # keys rotated many times: start again
            self._headers[header_segment] = header
        return valid_token(
            claims,
            subject=subject,
            scopes=scopes,
            usable_until=usable_until,
            common=self._common,
            issuer=self._issuer,
            verified_by="jwt",
        )

    def _check_claims(self, claims: dict[str, Any]) -> tuple[str, frozenset[str], float]:
        """The subject, the scopes and the end of validity; raises :class:`InvalidToken`."""
        now, leeway = _clock.now(), self._leeway
        exp = _numeric_date(claims, "exp", required=True)
        nbf = _numeric_date(claims, "nbf", required=False)
        iat = _numeric_date(claims, "iat", required=False)
        assert exp is not None
        if now >= exp + leeway:
            raise InvalidToken("expired")
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise InvalidToken("not_yet_valid")
        if claims.get("iss") != self._issuer:
            raise InvalidToken("wrong_issuer")
        if not self._audiences.intersection(_audiences(claims.get("aud"))):
            raise InvalidToken("wrong_audience")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > _MAX_SUBJECT:
            raise InvalidToken("malformed", "sub")
        return subject, _scopes(claims), exp + leeway


def _audiences(aud: object) -> Iterable[str]:
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, tuple) and all(isinstance(a, str) for a in aud):
        return aud
    if aud is None:
        return ()
    raise InvalidToken("malformed", "aud")
