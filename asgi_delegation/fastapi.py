"""FastAPI dependencies: the caller's access context, or a grant for an upstream API.

::

    from asgi_delegation import Grant
    from asgi_delegation.fastapi import delegated

    @app.get("/repos")
    async def repos(github: Annotated[Grant, Depends(delegated("https://api.github.com"))]):
        ...

Both dependencies declare the bearer scheme (``DelegatedBearer``) so that it appears in the
OpenAPI document and its security requirements. The token itself is validated by
:class:`~asgi_delegation.DelegationMiddleware`, which must wrap the application.

A failed exchange becomes an ``HTTPException`` whose ``detail`` holds ``error``,
``error_description`` and ``resource``:

============================================  ======  ==============================================
failure                                       status  meaning for the caller
============================================  ======  ==============================================
:class:`ExchangeDenied`, about the user        403     the user may not use that API (no consent,
(``access_denied``, ``invalid_grant``, ...)            not a dependency, scope not grantable)
:class:`ExchangeDenied`, about this server     502     this server's own credentials or request are
(``invalid_client``, ``unauthorized_client``,          wrong: nothing the caller can fix
``unsupported_grant_type``, ``invalid_request``)
:class:`ExchangeNotAllowed`                    403     refused by this server's own policy
:class:`ExchangeUnavailable`                   503     try again later (``Retry-After`` when known)
============================================  ======  ==============================================
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Security
from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection

from ._context import AccessContext
from ._errors import ExchangeDenied, ExchangeError, ExchangeUnavailable
from ._grant import Grant

__all__ = ["access_context", "delegated"]

# Never raises: the middleware has answered every request without a valid token already.
_bearer = HTTPBearer(
    scheme_name="DelegatedBearer",
    bearerFormat="JWT",
    description="An access token for this resource, from its authorization server "
    "(see /.well-known/oauth-protected-resource)",
    auto_error=False,
)
# Errors that say this server, not the caller, is misconfigured at the authorization server.
_SERVER_SIDE = frozenset(
    {"invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_request"}
)


async def access_context(
    connection: HTTPConnection, _: Annotated[Any, Security(_bearer)]
) -> AccessContext:
    """The caller's :class:`AccessContext` (``ctx: Annotated[AccessContext,
    Depends(access_context)]``)."""
    context = connection.scope.get("state", {}).get("access_context")
    if not isinstance(context, AccessContext):
        raise LookupError(
            "no access context on this request: wrap the application in DelegationMiddleware "
            "and keep this path out of public_paths"
        )
    return context


def delegated(resource: str, *, scope: str | None = None) -> Callable[..., Awaitable[Grant]]:
    """A dependency giving the endpoint a :class:`Grant` for ``resource`` acting as the caller
    (cached, single-flight), or answering the request with the HTTP error above."""
    if not isinstance(resource, str) or not resource:
        raise TypeError("delegated() needs a resource identifier")

    async def grant_for(context: Annotated[AccessContext, Depends(access_context)]) -> Grant:
        try:
            return await context.exchange(resource, scope=scope)
        except ExchangeError as exc:
            raise _http_error(exc) from None

    return grant_for


def _http_error(exc: ExchangeError) -> HTTPException:
    detail = {
        "error": exc.error,
        "error_description": exc.error_description,
        "resource": exc.resource,
    }
    if isinstance(exc, ExchangeUnavailable):
        headers = None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return HTTPException(503, detail=detail, headers=headers)
    if isinstance(exc, ExchangeDenied) and exc.error in _SERVER_SIDE:
        return HTTPException(502, detail=detail)
    return HTTPException(403, detail=detail)
