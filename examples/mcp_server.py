"""An MCP server whose tool calls an upstream API as the caller, with a delegated token.

``DelegationMiddleware`` wraps the official SDK's streamable HTTP app: it validates each
request's bearer token, and answers 401 with the RFC 9728 metadata that tells MCP clients where
to get one. ``@grant(notes_api)`` exchanges that token (RFC 8693) for a token for the notes API
before the tool runs; the tool reads it with ``current_access_context().access(notes_api)``.

Run the self-contained demo (a local authorization server, a fake notes API and this server,
all on 127.0.0.1; needs ``pip install asgi-delegation[serve] mcp``)::

    python examples/mcp_server.py

Its MCP client (the SDK's ``ClientCredentialsOAuthProvider``) starts with no token: it finds
the authorization server through the 401 and gets a token as itself (client credentials, so
the "user" the notes API sees is the client, ``demo-agent``), then calls the tool.
"""

import logging
import secrets

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.types import TextContent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_delegation import DelegationMiddleware, current_access_context, grant
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

CLIENT_ID = "notes-mcp"  # this MCP server's client at the authorization server


def create_app(
    *, issuer: str, resource: str, client_secret: str, notes_api: str
) -> DelegationMiddleware:
    # The notes API's base URL doubles as its resource identifier: the token is exchanged for
    # exactly the API it is sent to. The demo passes the loopback origin of its fake API.
    server = MCPServer("notes")

    @server.tool()
    @grant(notes_api)  # exchanged before the tool runs
    async def count_notes() -> str:
        """How many notes the caller has in the notes API."""
        notes = current_access_context().access(notes_api)  # the Grant, or the exchange's error
        async with httpx.AsyncClient(base_url=notes_api) as http:
            answer = await http.get(
                "/notes", headers={"Authorization": f"Bearer {notes.access_token}"}
            )
        answer.raise_for_status()
        page = answer.json()
        return f"{page['owner']} has {len(page['notes'])} notes"

    # The SDK's app answers at /mcp, and has a lifespan that must run (serve with lifespan on).
    app = server.streamable_http_app()
    return DelegationMiddleware(
        app, issuer=issuer, resource=resource, client_id=CLIENT_ID, client_secret=client_secret
    )


# -- demo harness: everything below stands in for the real world --------------------------------


def fake_notes_api(auth: LocalAuthorizationServer, origin: str) -> Starlette:
    """``GET /notes`` answers the notes of whoever the token names, if the token is for us."""

    async def notes(request: Request) -> JSONResponse:
        claims = auth.verify(request.headers.get("Authorization", "").removeprefix("Bearer "))
        if claims is None or claims.get("aud") != origin:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return JSONResponse({"owner": claims["sub"], "notes": ["buy milk", "call Bob"]})

    return Starlette(routes=[Route("/notes", notes)])


class MemoryStorage:
    """The SDK's ``TokenStorage``, in memory: the MCP client starts with no token."""

    tokens: OAuthToken | None = None
    client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def demo() -> None:
    logging.basicConfig(level=logging.WARNING)  # before MCPServer() sets up INFO logging
    server_secret, agent_secret = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    # Every server runs in this event loop: see asgi_delegation.testing.serve on why not threads.
    with (
        loopback_socket() as (auth_sock, issuer),
        loopback_socket() as (notes_sock, notes_api),
        loopback_socket() as (mcp_sock, origin),
    ):
        auth = LocalAuthorizationServer(issuer)
        auth.register_client(CLIENT_ID, secret=server_secret)
        auth.register_client("demo-agent", secret=agent_secret)  # the MCP client
        mcp_url = origin + "/mcp"
        app = create_app(
            issuer=issuer, resource=mcp_url, client_secret=server_secret, notes_api=notes_api
        )
        provider = ClientCredentialsOAuthProvider(
            server_url=mcp_url,
            storage=MemoryStorage(),
            client_id="demo-agent",
            client_secret=agent_secret,
            issuer=issuer,  # send the agent's secret to this authorization server only
        )
        async with (
            serve(auth, auth_sock),
            serve(fake_notes_api(auth, notes_api), notes_sock),
            serve(app, mcp_sock),
            httpx2.AsyncClient(auth=provider) as http,
            Client(streamable_http_client(mcp_url, http_client=http), mode="2026-07-28") as mcp,
        ):
            result = await mcp.call_tool("count_notes", {})
    text = "".join(part.text for part in result.content if isinstance(part, TextContent))
    print(f"count_notes: {text}")
    if result.is_error:
        raise SystemExit(1)


if __name__ == "__main__":
    anyio.run(demo)
