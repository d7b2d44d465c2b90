"""The middleware in front of a Starlette app under three real ASGI servers on 127.0.0.1
(uvicorn, hypercorn, granian): streaming, WebSocket handshakes, lifespan and challenges behave
the same behind each of them, reached by real clients (httpx, the websockets library)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from asgi_delegation import AccessContext, DelegationMiddleware
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket

from ._servers import SERVERS
from .conftest import CLIENT_ID, CLIENT_SECRET

# Long enough for a slow CI machine, short enough that a hang fails fast.
WAIT = 5.0


@dataclass
class Probe:
    """What the app did, shared with the test: every server here runs in this process."""

    stopped: bool = False
    websockets: int = 0
    # Created outside any loop; it binds to the server's loop, the only one that awaits it.
    release: asyncio.Event = field(default_factory=asyncio.Event)


def probed_app(probe: Probe) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"lifespan": "started"}  # copied by the server into every request's state
        probe.stopped = True

    async def whoami(request: Request) -> JSONResponse:
        ctx: AccessContext = request.state.access_context
        return JSONResponse({"subject": ctx.subject, "lifespan": request.state.lifespan})

    async def events(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            # Holds the response open: the test can only see "one" now if nobody buffers.
            await probe.release.wait()
            yield b"data: two\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def release(request: Request) -> Response:
        probe.release.set()
        return Response(status_code=204)

    async def chat(websocket: WebSocket) -> None:
        probe.websockets += 1
        ctx: AccessContext = websocket.state.access_context
        await websocket.accept()
        await websocket.send_text(ctx.subject)
        await websocket.close()

    return Starlette(
        routes=[
            Route("/mcp", whoami),
            Route("/events", events),
            Route("/release", release, methods=["POST"]),
            WebSocketRoute("/ws", chat),
        ],
        lifespan=lifespan,
    )


@dataclass
class Site:
    origin: str
    probe: Probe
    middleware: DelegationMiddleware
    headers: dict[str, str] = field(repr=False)  # a bearer token: kept out of failure output

    @property
    def ws_origin(self) -> str:
        return self.origin.replace("http://", "ws://")


@asynccontextmanager
async def serving(server: str, auth: LocalAuthorizationServer) -> AsyncIterator[Site]:
    """The middleware around ``probed_app``, under ``server``, until the block ends."""
    with loopback_socket() as (sock, origin):
        probe = Probe()
        middleware = DelegationMiddleware(
            probed_app(probe),
            issuer=auth.issuer, resource=origin + "/mcp",
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        )  # fmt: skip
        token = auth.mint("alice", audience=origin + "/mcp")
        async with SERVERS[server](middleware, sock):
            yield Site(origin, probe, middleware, {"authorization": f"Bearer {token}"})


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def site(served_auth: LocalAuthorizationServer, server: str) -> AsyncIterator[Site]:
    async with serving(server, served_auth) as site:
        yield site


async def test_streaming_is_not_buffered(site: Site) -> None:
    async with httpx.AsyncClient(base_url=site.origin, headers=site.headers) as client:
        try:
            # A buffering middleware (or server) holds the response back until its body ends,
            # which only /release allows: the wait times out and the test fails.
            with anyio.fail_after(WAIT):
                async with client.stream("GET", "/events") as response:
                    chunks = response.aiter_bytes()
                    first = b""
                    while not first.endswith(b"\n\n"):  # a read may end mid-event
                        first += await anext(chunks)
                    released = await client.post("/release")
                    rest = b"".join([chunk async for chunk in chunks])
        finally:
            # Again on failure: a response held open would keep the server from stopping.
            await client.post("/release")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert first == b"data: one\n\n"
    assert released.status_code == 204
    assert rest == b"data: two\n\n"


async def test_websocket_handshake(site: Site) -> None:
    async with connect(site.ws_origin + "/ws", additional_headers=site.headers) as ws:
        with anyio.fail_after(WAIT):
            assert await ws.recv() == "alice"
    # Refused before accept (close code 1008): the server turns it into an HTTP 403.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(site.ws_origin + "/ws"):
            pass
    response: Any = refused.value.response
    assert response.status_code == 403
    # The refusal is the middleware's: some servers answer 403 for an app that fails, too.
    assert site.probe.websockets == 1


async def test_lifespan_runs_through_the_middleware(
    served_auth: LocalAuthorizationServer, server: str, made_clients: list[httpx.AsyncClient]
) -> None:
    async with serving(server, served_auth) as site:
        async with httpx.AsyncClient(base_url=site.origin, headers=site.headers) as client:
            response = await client.get("/mcp")
        assert response.status_code == 200, response.text
        # The state startup yielded reached the first request, next to the access context.
        assert response.json() == {"subject": "alice", "lifespan": "started"}
        assert not site.probe.stopped
    assert site.probe.stopped
    # The middleware closes the client it made when the shutdown passes through it...
    assert len(made_clients) == 1
    assert made_clients[0].is_closed
    # ...and serves again, a new kid included (its JWKS fetched with a new client).
    served_auth.rotate_keys()
    token = served_auth.mint("alice", audience=site.origin + "/mcp")
    with loopback_socket() as (sock, origin):
        async with SERVERS[server](site.middleware, sock), httpx.AsyncClient() as client:
            again = await client.get(origin + "/mcp", headers={"authorization": f"Bearer {token}"})
    assert again.status_code == 200, again.text
    assert len(made_clients) == 2
    assert made_clients[1].is_closed


async def test_unauthenticated_request_is_challenged(site: Site) -> None:
    async with httpx.AsyncClient(base_url=site.origin) as client:
        refused = await client.get("/mcp")
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert "resource_metadata=" in challenge
    assert challenge == (
        f'Bearer resource_metadata="{site.origin}/.well-known/oauth-protected-resource/mcp"'
    )
