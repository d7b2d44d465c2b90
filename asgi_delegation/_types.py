"""ASGI callable types, shaped like Starlette's so the middleware type-checks wherever an ASGI
application is expected (Starlette, FastAPI, httpx's ASGITransport, uvicorn).

Not asgiref's ``asgiref.typing``: its scopes and messages are TypedDicts, and a callable taking
those is not accepted where a callable taking ``MutableMapping[str, Any]`` is expected (Starlette,
httpx), so the package does not depend on asgiref at all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
