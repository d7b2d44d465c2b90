"""ASGI callable types, shaped like Starlette's so the middleware type-checks wherever an ASGI
application is expected (Starlette, FastAPI, httpx's ASGITransport, uvicorn)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
