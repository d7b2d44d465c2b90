"""``Issuer``: one authorization server the middleware trusts, with every setting of its own.

Each issuer has its own metadata, keys, audience and algorithms, and its own client at the
authorization server for exchanges and introspection. Everything is checked at construction,
with the same rules (and messages) as ``DelegationMiddleware``'s own arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from joserfc.jwk import ECKey, OKPKey, RSAKey

from ._client_auth import client_auth_from
from ._errors import ConfigurationError
from ._exchange import TARGETS
from ._jwks import ALGORITHM_KEYS
from ._urls import secure_url

#: The algorithms accepted by default: every asymmetric JWS algorithm in common use.
#: ``none`` and the HMAC family are never accepted: a resource server holds no shared secret.
DEFAULT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "Ed25519",
)


def _algorithms(value: Iterable[str]) -> frozenset[str]:
    algorithms = frozenset(value)
    for alg in algorithms:
        if alg not in ALGORITHM_KEYS:
            raise ConfigurationError(
                f"algorithm {alg!r} is not accepted: only asymmetric JWS algorithms are "
                f"({', '.join(ALGORITHM_KEYS)}); 'none' and HS* never are"
            )
    if not algorithms:
        raise ConfigurationError("algorithms must name at least one algorithm")
    return algorithms


def _audiences(audience: str | Iterable[str] | None) -> frozenset[str] | None:
    if audience is None:
        return None
    audiences = frozenset({audience}) if isinstance(audience, str) else frozenset(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ConfigurationError("audience must be a non-empty string or list of strings")
    return audiences


def _optional_url(url: str | None, what: str) -> str | None:
    return None if url is None else secure_url(url, what)


class Issuer:
    """An authorization server whose tokens the middleware accepts (``issuers=[...]``).

    ``audience`` defaults to the middleware's ``resource``. ``introspection=True`` makes this
    the issuer of opaque (non-JWT) tokens, validated by RFC 7662 introspection (at most one
    issuer may say so); ``introspect_jwts=True`` also introspects its valid JWTs, to honour
    revocation. Client credentials (``client_id`` with ``client_secret``, ``private_key`` or
    ``client_assertion_file``) serve its token exchanges and introspection. Its ``repr`` shows
    the issuer and client id, never a secret.
    """

    __slots__ = (
        "_algorithms",
        "_audiences",
        "_client_auth",
        "_exchange_target",
        "_introspect_jwts",
        "_introspection",
        "_introspection_endpoint",
        "_jwks_uri",
        "_requested_token_type",
        "_token_endpoint",
        "issuer",
    )

    def __init__(
        self,
        issuer: str,
        *,
        audience: str | Iterable[str] | None = None,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        jwks_uri: str | None = None,
        token_endpoint: str | None = None,
        introspection: bool = False,
        introspection_endpoint: str | None = None,
        introspect_jwts: bool = False,
        client_id: str | None = None,
        client_secret: str | None = None,
        client_auth: str | None = None,
        private_key: Mapping[str, Any] | RSAKey | ECKey | OKPKey | None = None,
        client_assertion_file: str | os.PathLike[str] | None = None,
        exchange_target: str = "resource",
        requested_token_type: str | None = None,
    ) -> None:
        self.issuer = secure_url(issuer, "issuer")
        if urlsplit(self.issuer).query:
            raise ConfigurationError("issuer must not have a query")
        self._audiences = _audiences(audience)
        self._algorithms = _algorithms(algorithms)
        self._jwks_uri = _optional_url(jwks_uri, "jwks_uri")
        self._token_endpoint = _optional_url(token_endpoint, "token_endpoint")
        self._introspection_endpoint = _optional_url(
            introspection_endpoint, "introspection_endpoint"
        )
        if not isinstance(introspection, bool) or not isinstance(introspect_jwts, bool):
            raise ConfigurationError("introspection and introspect_jwts must be booleans")
        self._introspection = introspection
        self._introspect_jwts = introspect_jwts
        if exchange_target not in TARGETS:
            raise ConfigurationError(f"exchange_target must be one of {', '.join(TARGETS)}")
        self._exchange_target = exchange_target
        self._requested_token_type = requested_token_type
        self._client_auth = client_auth_from(
            client_id=client_id,
            client_secret=client_secret,
            client_auth=client_auth,
            private_key=private_key,
            client_assertion_file=client_assertion_file,
        )
        if (introspection or introspect_jwts) and self._client_auth is None:
            # RFC 7662 2.1: the protected resource authenticates to the introspection endpoint.
            raise ConfigurationError(
                f"introspection at {self.issuer} needs client credentials: a client_id with a "
                "client_secret, private_key or client_assertion_file"
            )

    @property
    def client_id(self) -> str | None:
        return None if self._client_auth is None else self._client_auth.client_id

    def __repr__(self) -> str:
        return f"Issuer({self.issuer!r}, client_id={self.client_id!r})"
