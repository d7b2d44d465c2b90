"""What the official MCP SDK reads to know the authenticated user, filled in for it.

The SDK's own auth middleware would put an ``AuthenticatedUser(AccessToken)`` at
``scope["user"]``, Starlette ``AuthCredentials`` at ``scope["auth"]``, and the user in its
``auth_context_var``. With the same three set here, the SDK binds each session to the principal
that opened it (client_id, issuer, subject), ``get_access_token()`` works in tools, and so does
FastMCP's. Only done when the application has imported ``mcp`` by the time the middleware is
built: importing it for an application that does not use it would cost about a second.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from contextvars import Token
from typing import Any

from ._context import AccessContext
from ._types import Scope


class SdkPrincipal:
    """Builds the SDK's user objects once per token and sets them around each request."""

    def __init__(self, resource: str, cache_size: int) -> None:
        from mcp.server.auth.middleware.auth_context import auth_context_var
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken
        from pydantic import Field
        from starlette.authentication import AuthCredentials

        class RedactedAccessToken(AccessToken):
            # The SDK's model shows the bearer token in its repr; this one never does.
            token: str = Field(repr=False)

        self._token_model = RedactedAccessToken
        self._user_class = AuthenticatedUser
        self._credentials_class = AuthCredentials
        self._var = auth_context_var
        self._resource = resource
        self._built: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()
        self._cache_size = cache_size

    def enter(self, scope: Scope, context: AccessContext) -> Token[Any]:
        pair = self._built.get(context.token_digest)
        if pair is None:
            pair = self._build(context)
        scope["user"], scope["auth"] = pair
        return self._var.set(pair[0])

    def exit(self, token: Token[Any]) -> None:
        self._var.reset(token)

    def _build(self, context: AccessContext) -> tuple[Any, Any]:
        claims = _thawed(context.claims)
        exp = claims.get("exp")
        # The SDK decides sufficiency on these: the scopes the token's imply count there too.
        scopes = sorted(context._valid.granted)
        access_token = self._token_model(
            token=context.subject_token,
            client_id=context.client_id or "",
            scopes=scopes,
            expires_at=int(exp) if isinstance(exp, int | float) else None,
            resource=self._resource,
            subject=context.subject,
            claims=claims,
        )
        pair = (self._user_class(access_token), self._credentials_class(scopes))
        # Keyed by the token's hash: the same token always yields the same objects.
        if len(self._built) >= self._cache_size:
            self._built.popitem(last=False)
        self._built[context.token_digest] = pair
        return pair


def sdk_principal(resource: str, cache_size: int) -> SdkPrincipal | None:
    """An :class:`SdkPrincipal` when the application uses the MCP SDK, else None."""
    return SdkPrincipal(resource, cache_size) if "mcp" in sys.modules else None


def _thawed(value: Any) -> Any:
    # Validated claims are frozen (mappings and tuples); the SDK's model wants JSON types.
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return {k: _thawed(v) for k, v in value.items()}
