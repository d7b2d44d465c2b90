"""``current_access_context()``: the caller's access context, from anywhere in the request.

The middleware sets a ContextVar around the application call. Code that runs in the request's
task, or in a task started from it (asyncio copies the context), sees it: handlers of any
framework, FastAPI dependencies, MCP tools, helpers with no request at hand.
"""

from __future__ import annotations

from contextvars import ContextVar

from ._context import AccessContext

_current: ContextVar[AccessContext] = ContextVar("asgi_delegation.access_context")


def current_access_context() -> AccessContext:
    """The :class:`AccessContext` of the request being handled.

    Raises :class:`LookupError` outside a request that :class:`DelegationMiddleware`
    authenticated (public paths included: they carry no context).
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError(
            "no access context here: current_access_context() works only while handling a "
            "request that DelegationMiddleware authenticated"
        ) from None
