"""``@grant``: exchange for an endpoint's upstream resources, concurrently, before it runs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from ._context import AccessContext
from ._current import current_access_context

P = ParamSpec("P")
R = TypeVar("R")


def grant(
    *resources: str, scope: str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an async endpoint so that grants for every listed resource are exchanged
    concurrently before its body runs.

    The access context is taken from an argument (a Starlette request or WebSocket, or the
    :class:`AccessContext` itself), else from :func:`current_access_context`: so Quart views,
    MCP tools taking a ``Context`` and FastAPI endpoints work too.

    Failures do not raise: they are recorded on the access context, where the endpoint finds
    them with ``has_errors()`` / ``get_errors()``, and ``access(resource)`` raises them.
    """
    if not resources or not all(isinstance(r, str) and r for r in resources):
        raise TypeError("@grant needs one or more resource identifiers")

    def decorate(endpoint: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError("@grant decorates async functions")

        @functools.wraps(endpoint)
        async def with_grants(*args: P.args, **kwargs: P.kwargs) -> R:
            await _context_in(args, kwargs).prefetch(resources, scope=scope)
            return await endpoint(*args, **kwargs)

        return with_grants

    return decorate


def _context_in(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> AccessContext:
    for value in (*args, *kwargs.values()):
        if isinstance(value, AccessContext):
            return value
        scope = getattr(value, "scope", None)  # a Starlette Request, WebSocket or HTTPConnection
        if isinstance(scope, Mapping):
            context = scope.get("state", {}).get("access_context")
            if isinstance(context, AccessContext):
                return context
    try:
        return current_access_context()
    except LookupError:
        raise LookupError(
            "@grant found no access context: the endpoint must run in a request that "
            "DelegationMiddleware authenticated"
        ) from None
