"""What the middleware keeps for one trusted issuer, and how a token is routed to it.

Each issuer has its own metadata, keys, validator, exchanger and, for opaque tokens or
``introspect_jwts``, introspector: a token that names issuer A is checked with A's keys and
audience only, and its exchanges go to A's token endpoint with A's client. The validated-token
cache, the HTTP client, the audit trail and the concurrency budget for requests to
authorization servers are shared.

Routing reads a JWT's ``iss`` before verification, as a hint only: it must equal a configured
issuer byte for byte, or the token is refused before anything is fetched. No URL is ever built
from a token.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from ._audit import Auditor
from ._claims import Common
from ._discovery import Discovery
from ._exchange import Exchanger
from ._fetch import parse_json_object
from ._http import HTTPClient
from ._introspection import Introspector
from ._issuer import Issuer
from ._jwks import JWKS
from ._loops import PerLoop
from ._tokens import InvalidToken, TokenCache, TokenValidator, ValidToken

# RFC 6750 2.1 b64token: what an opaque token must look like before it is sent anywhere.
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class Shared:
    """The settings and parts every issuer's pieces share."""

    resource: str
    http: HTTPClient
    auditor: Auditor
    tokens: TokenCache
    common: Common  # what validated tokens repeat, kept once for every issuer
    limiter: PerLoop[anyio.CapacityLimiter]
    timeout: float
    cooldown: float
    leeway: float
    max_token_bytes: int
    require_at_jwt: bool
    introspection_cache_ttl: float
    token_cache_size: int
    # Exchanger with the exchange settings bound; takes the per-issuer arguments.
    exchanger: Callable[..., Exchanger[Any]]


class Trust:
    def __init__(self, config: Issuer, shared: Shared) -> None:
        self.issuer = issuer = config.issuer
        audiences = config._audiences or frozenset({shared.resource})
        discovery = Discovery(issuer, shared.http, deadline=shared.timeout, auditor=shared.auditor)
        jwks = JWKS(
            discovery,
            shared.http,
            jwks_uri=config._jwks_uri,
            algorithms=config._algorithms,
            deadline=shared.timeout,
            cooldown=shared.cooldown,
            auditor=shared.auditor,
        )
        self.validator = TokenValidator(
            jwks,
            issuer=issuer,
            audiences=audiences,
            algorithms=config._algorithms,
            leeway=shared.leeway,
            max_bytes=shared.max_token_bytes,
            require_at_jwt=shared.require_at_jwt,
            cache=shared.tokens,
            common=shared.common,
        )
        self.exchanger = shared.exchanger(
            discovery,
            shared.http,
            issuer=issuer,
            client_auth=config._client_auth,
            token_endpoint=config._token_endpoint,
            target=config._exchange_target,
            requested_token_type=config._requested_token_type,
        )
        self.opaque = config._introspection  # this issuer's tokens may be opaque
        self._introspect_jwts = config._introspect_jwts
        self._introspector: Introspector | None = None
        if config._client_auth is not None and (self.opaque or self._introspect_jwts):
            self._introspector = Introspector(
                issuer=issuer,
                audiences=audiences,
                endpoint=config._introspection_endpoint,
                discovery=discovery,
                http=shared.http,
                client_auth=config._client_auth,
                leeway=shared.leeway,
                cache_ttl=shared.introspection_cache_ttl,
                cache_size=shared.token_cache_size,
                limiter=shared.limiter,
                deadline=shared.timeout,
                auditor=shared.auditor,
                common=shared.common,
            )

    async def verify_jwt(self, token: bytes, digest: bytes) -> ValidToken:
        """Raises :class:`InvalidToken` (401) or ``Unavailable`` (503)."""
        valid = await self.validator.validate(token, digest)
        if self._introspect_jwts:
            assert self._introspector is not None
            # Fails closed: introspection unavailable is a 503, never a 200 on the JWT alone.
            confirmed = await self._introspector.introspect(token, digest)
            valid = replace(valid, cache_until=min(valid.cache_until, confirmed.cache_until))
        return valid

    async def verify_opaque(self, token: bytes, digest: bytes) -> ValidToken:
        if not _B64TOKEN.fullmatch(token):
            raise InvalidToken("malformed")
        assert self._introspector is not None
        return await self._introspector.introspect(token, digest)


def unverified_issuer(token: bytes) -> str:
    """The ``iss`` of a three-segment token's payload, NOT verified: only to choose whose keys
    verify it. Raises :class:`InvalidToken` when there is no such string to read."""
    payload = token.split(b".")[1]
    try:
        claims = parse_json_object(
            base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)), unique_keys=True
        )
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise InvalidToken("wrong_issuer")
    return issuer
