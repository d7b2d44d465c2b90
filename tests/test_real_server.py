"""The middleware in front of a Starlette app behind a real uvicorn on 127.0.0.1, reached by
real clients: httpx for HTTP, the websockets library for a WebSocket handshake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from asgi_delegation import AccessContext, DelegationMiddleware, grant
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket, serve_on

from .conftest import CLIENT_ID, CLIENT_SECRET, GITHUB


@grant(GITHUB)
async def whoami(request: Request) -> JSONResponse:
    ctx: AccessContext = request.state.access_context
    upstream = ctx.access(GITHUB)
    return JSONResponse({"subject": ctx.subject, "upstream": upstream.resource})


async def chat(websocket: WebSocket) -> None:
    ctx: AccessContext = websocket.state.access_context
    await websocket.accept()
    await websocket.send_text(ctx.subject)
    await websocket.close()


@pytest.fixture
async def app_origin(served_auth: LocalAuthorizationServer) -> AsyncIterator[str]:
    with loopback_socket() as (sock, origin):
        app = DelegationMiddleware(
            Starlette(routes=[Route("/mcp", whoami), WebSocketRoute("/ws", chat)]),
            issuer=served_auth.issuer, resource=origin + "/mcp",
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        )  # fmt: skip
        # With its lifespan, in the server's own event loop, the middleware closes its client.
        async with serve_on(app, sock, lifespan="on"):
            yield origin


async def test_http_through_uvicorn(served_auth: LocalAuthorizationServer, app_origin: str) -> None:
    token = served_auth.mint("alice", audience=app_origin + "/mcp")
    async with httpx.AsyncClient(base_url=app_origin) as client:
        ok = await client.get("/mcp", headers={"authorization": f"Bearer {token}"})
        refused = await client.get("/mcp")
        metadata = await client.get("/.well-known/oauth-protected-resource/mcp")
    assert ok.json() == {"subject": "alice", "upstream": GITHUB}
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == (
        f'Bearer resource_metadata="{app_origin}/.well-known/oauth-protected-resource/mcp"'
    )
    assert metadata.json()["resource"] == app_origin + "/mcp"


async def test_websocket_handshake_through_uvicorn(
    served_auth: LocalAuthorizationServer, app_origin: str
) -> None:
    ws_origin = app_origin.replace("http://", "ws://")
    token = served_auth.mint("alice", audience=app_origin + "/mcp")
    async with connect(
        ws_origin + "/ws", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        assert await ws.recv() == "alice"
    # Refused before accept (close code 1008): the server turns it into an HTTP 403.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_origin + "/ws"):
            pass
    response: Any = refused.value.response
    assert response.status_code == 403
