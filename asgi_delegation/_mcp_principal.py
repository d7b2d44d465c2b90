"""What the official MCP SDK reads to know the authenticated user, filled in for it.

The SDK's own auth middleware would put an ``AuthenticatedUser(AccessToken)`` at
``scope["user"]``, Starlette ``AuthCredentials`` at ``scope["auth"]``, and the user in its
``auth_context_var``. With the same three set here, the SDK binds each session to the principal
that opened it (client_id, issuer, subject), ``get_access_token()`` works in tools, and so does
FastMCP's. Only done when the application has imported ``mcp`` by the time the middleware is
built: importing it for an application that does not use it would cost about a second.

They are built once per token, on its first request, and kept on its validated-token entry.
Built as cheaply as the cache entry allows: the ``AccessToken`` holds the entry's claims (read-
only already) and no copy of them, and tokens granting the same scopes share one read-only
scope list and one ``AuthCredentials``. Its fields are known valid, so pydantic's validation,
which would copy them, is skipped while the model has the fields and no hooks it had when this
was written.
"""

from __future__ import annotations

import sys
from contextvars import Token
from typing import Any, NoReturn

from ._context import AccessContext
from ._types import Scope

_FIELDS = ("token", "client_id", "scopes", "expires_at", "resource", "subject", "claims")
_MAX_SCOPE_SETS = 1024


class _ReadOnlyList(list[str]):
    """A scope list many principals share: no request may change another's."""

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("the principal's scopes are read-only")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = remove = pop = clear = sort = reverse = _read_only

    def __copy__(self) -> _ReadOnlyList:
        return self

    def __deepcopy__(self, memo: object) -> _ReadOnlyList:
        return self

    def __reduce__(self) -> tuple[type[list[str]], tuple[list[str]]]:
        return list, (list(self),)


class SdkPrincipal:
    """Builds the SDK's user objects once per token and sets them around each request."""

    def __init__(self, resource: str) -> None:
        from mcp.server.auth.middleware.auth_context import auth_context_var
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken
        from pydantic import Field
        from starlette.authentication import AuthCredentials

        class RedactedAccessToken(AccessToken):
            # The SDK's model shows the bearer token in its repr; this one never does.
            token: str = Field(repr=False)

        model: Any = RedactedAccessToken
        self._model = model
        self._trusted = (
            tuple(model.model_fields) == _FIELDS
            and not model.__pydantic_post_init__
            and not model.__private_attributes__
            and model.model_config.get("extra") != "allow"
        )
        # Shared by every model: it names all the fields (pydantic adds a field's name when it
        # is assigned, which changes nothing), and holds nobody's data.
        self._fields_set = set(_FIELDS)
        self._user_class = AuthenticatedUser
        self._credentials_class = AuthCredentials
        self._var = auth_context_var
        self._resource = resource
        self._by_scopes: dict[frozenset[str], tuple[_ReadOnlyList, Any]] = {}

    def enter(self, scope: Scope, context: AccessContext) -> Token[Any]:
        valid = context._valid
        pair = valid.sdk
        if pair is None:
            valid.sdk = pair = self._build(context)
        scope["user"], scope["auth"] = pair
        return self._var.set(pair[0])

    def exit(self, token: Token[Any]) -> None:
        self._var.reset(token)

    def _build(self, context: AccessContext) -> tuple[Any, Any]:
        valid = context._valid
        # The SDK decides sufficiency on these: the scopes the token's imply count there too.
        scopes, credentials = self._scopes(valid.granted)
        exp = valid.claims.get("exp")
        values = {
            "token": context.subject_token,
            "client_id": valid.client_id or "",
            "scopes": scopes,
            "expires_at": int(exp) if isinstance(exp, int | float) else None,
            "resource": self._resource,
            "subject": valid.subject,
            "claims": valid.claims,
        }
        if self._trusted:
            access_token = self._model.__new__(self._model)
            object.__setattr__(access_token, "__dict__", values)
            object.__setattr__(access_token, "__pydantic_fields_set__", self._fields_set)
            object.__setattr__(access_token, "__pydantic_extra__", None)
            object.__setattr__(access_token, "__pydantic_private__", None)
        else:
            access_token = self._model(**values)
        return self._user_class(access_token), credentials

    def _scopes(self, granted: frozenset[str]) -> tuple[_ReadOnlyList, Any]:
        shared = self._by_scopes.get(granted)
        if shared is None:
            scopes = _ReadOnlyList(sorted(granted))
            credentials = self._credentials_class()
            credentials.scopes = scopes  # it would copy a list given to it
            shared = scopes, credentials
            if len(self._by_scopes) < _MAX_SCOPE_SETS:
                self._by_scopes[granted] = shared
        return shared


def sdk_principal(resource: str) -> SdkPrincipal | None:
    """An :class:`SdkPrincipal` when the application uses the MCP SDK, else None."""
    return SdkPrincipal(resource) if "mcp" in sys.modules else None
