"""Shared fixtures: a local authorization server, the middleware around an echo app, a clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from asgi_delegation import DelegationMiddleware, _clock
from asgi_delegation.testing import LocalAuthorizationServer

RESOURCE = "http://127.0.0.1:8000/mcp"
BASE_URL = "http://127.0.0.1:8000"


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers 200 with what the middleware told it about the caller."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    ctx = scope.get("state", {}).get("access_context")
    document = {
        "path": scope["path"],
        "subject": ctx.subject if ctx else None,
        "scopes": sorted(ctx.scopes) if ctx else None,
    }
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(document)})
        await send({"type": "websocket.close", "code": 1000})
        return
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class Gateway:
    """The middleware in front of ``echo_app``, reached in process through httpx."""

    middleware: DelegationMiddleware
    client: httpx.AsyncClient

    async def get(
        self, token: str | None = None, *, path: str = "/mcp", headers: Any = None, **kw: Any
    ) -> httpx.Response:
        all_headers = httpx.Headers(headers or {})
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        return await self.client.get(path, headers=all_headers, **kw)


@dataclass
class Clock:
    """Replaces the package's clocks; ``advance`` moves both."""

    offset: float = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    real_now, real_monotonic = _clock.now, _clock.monotonic
    monkeypatch.setattr(_clock, "now", lambda: real_now() + c.offset)
    monkeypatch.setattr(_clock, "monotonic", lambda: real_monotonic() + c.offset)
    return c


@pytest.fixture
def auth() -> LocalAuthorizationServer:
    return LocalAuthorizationServer()


@pytest.fixture
async def served_auth(auth: LocalAuthorizationServer) -> AsyncIterator[LocalAuthorizationServer]:
    """The same server, on a real loopback port."""
    async with auth.serve():
        yield auth


@pytest.fixture
async def gateway_factory(
    auth: LocalAuthorizationServer,
) -> AsyncIterator[Callable[..., Gateway]]:
    clients: list[httpx.AsyncClient] = []
    middlewares: list[DelegationMiddleware] = []

    def make(**options: Any) -> Gateway:
        if "http_client" not in options:
            options["http_client"] = auth.http_client()
            clients.append(options["http_client"])
        elif options["http_client"] is None:
            del options["http_client"]
        options.setdefault("issuer", auth.issuer)
        options.setdefault("resource", RESOURCE)
        middleware = DelegationMiddleware(echo_app, **options)
        middlewares.append(middleware)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url=BASE_URL)
        clients.append(client)
        return Gateway(middleware, client)

    yield make
    for client in clients:
        await client.aclose()
    for middleware in middlewares:
        await middleware.aclose()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory()


@pytest.fixture
def token(auth: LocalAuthorizationServer) -> str:
    return auth.mint("alice", audience=RESOURCE, scope="read write")


def fetches(auth: LocalAuthorizationServer, what: str) -> int:
    """How many times ``auth`` served its JWKS ("jwks") or metadata ("metadata")."""
    if what == "jwks":
        return sum(n for path, n in auth.requests.items() if path.endswith("/jwks"))
    return sum(n for path, n in auth.requests.items() if "/.well-known/" in path)
