"""MCP servers behind the middleware, on a real uvicorn, driven by the official MCP client.

Both protocol modes: ``session`` is the initialize handshake with an ``Mcp-Session-Id``
(no routing headers, so per-tool scopes come from the body), ``stateless`` is revision
2026-07-28 (``Mcp-Method`` / ``Mcp-Name`` headers). A loopback "upstream API" accepts only a
delegated token issued for it, for the caller, to this server's client.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import pytest
from fastmcp import Context as FastMCPContext
from fastmcp import FastMCP
from fastmcp.server.dependencies import get_access_token as fastmcp_access_token
from fastmcp.server.dependencies import get_http_request
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_delegation import DelegationMiddleware, current_access_context, grant
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

from .conftest import CLIENT_ID, CLIENT_SECRET

MODES = {"session": "legacy", "stateless": "2026-07-28"}
AGENT_ID, AGENT_SECRET = "agent", "agent-secret"


@dataclass
class Upstream:
    """A loopback API that answers who the delegated token is for, and refuses any other."""

    origin: str
    calls: list[str] = field(default_factory=list)


@pytest.fixture
async def served_auth() -> AsyncIterator[LocalAuthorizationServer]:
    """Every server of these tests runs in the test's event loop, none on a thread: the MCP SDKs
    parse code while serving, and CPython 3.11 can fail with a spurious SystemError (AST
    recursion depth mismatch, gh-106905) when another thread parses at the same moment (Python
    3.11 parses source lines to underline them in every traceback it formats)."""
    with loopback_socket() as (sock, issuer):
        auth = LocalAuthorizationServer(issuer)
        auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
        async with serve(auth, sock):
            yield auth


@pytest.fixture
async def upstream(served_auth: LocalAuthorizationServer) -> AsyncIterator[Upstream]:
    with loopback_socket() as (sock, origin):
        api = Upstream(origin)

        async def user(request: Request) -> JSONResponse:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            claims = served_auth.verify(token) if scheme == "Bearer" else None
            # Only a token exchanged for this API by the MCP server's own client will do.
            if claims is None or claims["aud"] != origin or claims["act"] != {"sub": CLIENT_ID}:
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            api.calls.append(claims["sub"])
            return JSONResponse({"login": claims["sub"]})

        async with serve(Starlette(routes=[Route("/user", user)]), sock):
            yield api


@dataclass
class Served:
    url: str  # the MCP endpoint, which is also the resource identifier
    tool_runs: list[str]


def mcp_server(upstream: Upstream, tool_runs: list[str]) -> MCPServer:
    server = MCPServer("delegated")

    @server.tool()
    @grant(upstream.origin)
    async def whoami(ctx: Context) -> str:
        """Calls the upstream API as the caller."""
        access = current_access_context()
        tool_runs.append("whoami")
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                upstream.origin + "/user",
                headers={"authorization": f"Bearer {access.access(upstream.origin).access_token}"},
            )
        request = ctx.request_context.request
        sdk_token = get_access_token()
        return json.dumps(
            {
                "upstream": answer.json(),
                "state": request.state.access_context.subject if request else None,
                "sdk_subject": sdk_token.subject if sdk_token else None,
                "sdk_scopes": sdk_token.scopes if sdk_token else None,
            }
        )

    @server.tool()
    async def create_issue(title: str) -> str:
        tool_runs.append("create_issue")
        return f"created {title}"

    return server


@pytest.fixture
def serve_mcp(
    served_auth: LocalAuthorizationServer, upstream: Upstream
) -> Callable[..., AbstractAsyncContextManager[Served]]:
    @asynccontextmanager
    async def serve_wrapped(**options: Any) -> AsyncIterator[Served]:
        tool_runs: list[str] = []
        app = mcp_server(upstream, tool_runs).streamable_http_app()
        with loopback_socket() as (sock, origin):
            wrapped = DelegationMiddleware(
                app,
                issuer=served_auth.issuer,
                resource=origin + "/mcp",
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                tool_scopes={"create_issue": ["repo:write"]},
                **options,
            )
            async with serve(wrapped, sock):
                yield Served(origin + "/mcp", tool_runs)

    return serve_wrapped


@asynccontextmanager
async def connect(url: str, mode: str, **client: Any) -> AsyncIterator[Client]:
    """The official client over its own HTTP client (httpx2), which the transport leaves open."""
    async with (
        httpx2.AsyncClient(**client) as http,
        Client(streamable_http_client(url, http_client=http), mode=MODES[mode]) as connected,
    ):
        yield connected


def bearer(token: str) -> dict[str, Any]:
    return {"headers": {"authorization": f"Bearer {token}"}}


@pytest.mark.parametrize("mode", MODES)
async def test_bearer_token_tool_exchanges_and_calls_upstream_as_the_caller(
    served_auth: LocalAuthorizationServer, upstream: Upstream, serve_mcp: Any, mode: str
) -> None:
    async with serve_mcp() as served:
        for user in ("alice", "bob"):
            token = served_auth.mint(user, audience=served.url, scope="mcp:tools")
            async with connect(served.url, mode, **bearer(token)) as client:
                result = await client.call_tool("whoami", {})
            assert not result.is_error, result
            assert json.loads(result.content[0].text) == {  # type: ignore[union-attr]
                "upstream": {"login": user},
                "state": user,
                "sdk_subject": user,
                "sdk_scopes": ["mcp:tools"],
            }
    assert upstream.calls == ["alice", "bob"]


@pytest.mark.parametrize("mode", MODES)
async def test_client_credentials_client_discovers_the_authorization_server(
    served_auth: LocalAuthorizationServer, upstream: Upstream, serve_mcp: Any, mode: str
) -> None:
    served_auth.register_client(AGENT_ID, secret=AGENT_SECRET)
    async with serve_mcp(required_scopes=["mcp:tools"]) as served:
        provider = oauth(served.url, served_auth.issuer)
        async with connect(served.url, mode, auth=provider) as client:
            result = await client.call_tool("whoami", {})
    assert json.loads(result.content[0].text)["upstream"] == {"login": AGENT_ID}  # type: ignore[union-attr]
    grants = [f for f in served_auth.exchanges if f["grant_type"] == "client_credentials"]
    # Found through the 401 and the metadata: the token was asked for this resource and the
    # scope the challenge named.
    assert [(g["resource"], g["scope"]) for g in grants] == [(served.url, "mcp:tools")]


@pytest.mark.parametrize("mode", MODES)
async def test_per_tool_scope_step_up(
    served_auth: LocalAuthorizationServer, serve_mcp: Any, mode: str
) -> None:
    served_auth.register_client(AGENT_ID, secret=AGENT_SECRET)
    async with serve_mcp(required_scopes=["mcp:tools"]) as served:
        provider = oauth(served.url, served_auth.issuer)
        async with connect(served.url, mode, auth=provider) as client:
            listed = await client.list_tools()
            result = await client.call_tool("create_issue", {"title": "bug"})
        assert {tool.name for tool in listed.tools} == {"whoami", "create_issue"}
        assert result.content[0].text == "created bug"  # type: ignore[union-attr]
        assert served.tool_runs == ["create_issue"]
    scopes = [f["scope"] for f in served_auth.exchanges if f["grant_type"] == "client_credentials"]
    assert scopes == ["mcp:tools", "mcp:tools repo:write"]


@pytest.mark.parametrize("mode", MODES)
async def test_tool_needing_a_scope_the_token_lacks_never_runs(
    served_auth: LocalAuthorizationServer, serve_mcp: Any, mode: str
) -> None:
    responses: list[httpx2.Response] = []

    async def record(response: httpx2.Response) -> None:
        responses.append(response)

    async with serve_mcp(required_scopes=["mcp:tools"]) as served:
        token = served_auth.mint("alice", audience=served.url, scope="mcp:tools")
        hooks = {"event_hooks": {"response": [record]}}
        async with connect(served.url, mode, **bearer(token), **hooks) as client:
            assert (await client.call_tool("whoami", {})).is_error is False
            with pytest.raises(MCPError):
                await client.call_tool("create_issue", {"title": "bug"})
        assert served.tool_runs == ["whoami"]
    refused = [r for r in responses if r.status_code == 403]
    assert len(refused) == 1
    origin = served.url.removesuffix("/mcp")
    assert refused[0].headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="mcp:tools repo:write", '
        'error_description="The access token lacks a required scope", '
        f'resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp"'
    )


async def test_a_session_stays_with_the_user_who_opened_it(
    served_auth: LocalAuthorizationServer, serve_mcp: Any
) -> None:
    async with serve_mcp() as served:
        alice = served_auth.mint("alice", audience=served.url)
        bob = served_auth.mint("bob", audience=served.url)
        headers = {"accept": "application/json, text/event-stream"}
        initialize = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        }
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        async with httpx.AsyncClient(headers=headers) as http:
            opened = await http.post(
                served.url, json=initialize, headers={"authorization": f"Bearer {alice}"}
            )
            session = {"mcp-session-id": opened.headers["mcp-session-id"]}
            stolen = await http.post(
                served.url, json=listing, headers={"authorization": f"Bearer {bob}", **session}
            )
            own = await http.post(
                served.url, json=listing, headers={"authorization": f"Bearer {alice}", **session}
            )
    assert opened.status_code == 200
    # The SDK binds the session to the principal the middleware filled in.
    assert stolen.status_code == 404
    assert own.status_code == 200


async def test_mounted_under_a_prefix_the_metadata_url_reaches_the_middleware(
    served_auth: LocalAuthorizationServer, upstream: Upstream
) -> None:
    served_auth.register_client(AGENT_ID, secret=AGENT_SECRET)
    server = mcp_server(upstream, [])
    mcp_app = server.streamable_http_app()
    with loopback_socket() as (sock, origin):
        resource = origin + "/tools/mcp"
        wrapped = DelegationMiddleware(
            mcp_app,
            issuer=served_auth.issuer,
            resource=resource,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
        )

        # A Mount passes no lifespan on: the outer application runs the MCP app's, and closes
        # the middleware's HTTP client at shutdown.
        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with server.session_manager.run():
                yield
            await wrapped.aclose()

        outer = Starlette(routes=[Mount("/tools", app=wrapped)], lifespan=lifespan)
        async with serve(outer, sock):
            async with httpx.AsyncClient() as http:
                refused = await http.post(resource, json={})
            metadata_url = origin + "/tools/.well-known/oauth-protected-resource/tools/mcp"
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == (
                f'Bearer resource_metadata="{metadata_url}"'
            )
            async with httpx.AsyncClient() as http:
                metadata = (await http.get(metadata_url)).json()
            assert metadata["resource"] == resource
            assert metadata["authorization_servers"] == [served_auth.issuer]
            async with connect(
                resource, "stateless", auth=oauth(resource, served_auth.issuer)
            ) as c:
                result = await c.call_tool("whoami", {})
    assert json.loads(result.content[0].text)["upstream"] == {"login": AGENT_ID}  # type: ignore[union-attr]


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def oauth(server_url: str, issuer: str) -> ClientCredentialsOAuthProvider:
    return ClientCredentialsOAuthProvider(
        server_url=server_url,
        storage=MemoryStorage(),
        client_id=AGENT_ID,
        client_secret=AGENT_SECRET,
        issuer=issuer,
    )


async def test_routing_headers_that_disagree_with_the_body_run_no_tool(
    served_auth: LocalAuthorizationServer, serve_mcp: Any
) -> None:
    # Headers hiding the body's tools/call: the middleware reads the body and needs the tool's
    # scope; with the scope, the SDK refuses headers that disagree with the body.
    async with serve_mcp() as served:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "create_issue",
                "arguments": {"title": "sneaky"},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
            },
        }
        headers = {
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/list",
        }
        async with httpx.AsyncClient() as http:
            for scope, status in (("mcp:tools", 403), ("mcp:tools repo:write", 400)):
                token = served_auth.mint("alice", audience=served.url, scope=scope)
                answer = await http.post(
                    served.url, json=body, headers={**headers, "authorization": f"Bearer {token}"}
                )
                assert answer.status_code == status
        assert "header" in answer.text.lower()  # the SDK refuses the mismatch
        assert served.tool_runs == []


@pytest.mark.parametrize("mode", MODES)
# In session mode the official client, cancelling its open GET stream to a FastMCP server on
# exit, loses that connection unclosed (httpx2): a ResourceWarning about the client, not us.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_fastmcp_tool_with_context_gets_a_grant(
    served_auth: LocalAuthorizationServer, upstream: Upstream, mode: str
) -> None:
    server = FastMCP("delegated")

    @server.tool
    @grant(upstream.origin)
    async def whoami(ctx: FastMCPContext) -> str:
        grant_ = current_access_context().access(upstream.origin)
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                upstream.origin + "/user",
                headers={"authorization": f"Bearer {grant_.access_token}"},
            )
        token = fastmcp_access_token()
        return json.dumps(
            {
                "upstream": answer.json(),
                "state": get_http_request().state.access_context.subject,
                "fastmcp_subject": token.claims.get("sub") if token else None,
            }
        )

    with loopback_socket() as (sock, origin):
        wrapped = DelegationMiddleware(
            server.http_app(path="/mcp"),
            issuer=served_auth.issuer,
            resource=origin + "/mcp",
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
        )
        async with serve(wrapped, sock):
            token = served_auth.mint("carol", audience=origin + "/mcp")
            async with connect(origin + "/mcp", mode, **bearer(token)) as client:
                result = await client.call_tool("whoami", {})
    gc.collect()  # so that the client's lost connection is reported here, not in a later test
    assert json.loads(result.content[0].text) == {  # type: ignore[union-attr]
        "upstream": {"login": "carol"},
        "state": "carol",
        "fastmcp_subject": "carol",
    }


async def test_the_sdk_principal_is_built_once_per_token_and_never_shows_it() -> None:
    auth = LocalAuthorizationServer()
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["user"], scope["auth"], get_access_token()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    resource = "http://127.0.0.1:8000/mcp"
    middleware = DelegationMiddleware(
        app, issuer=auth.issuer, resource=resource, http_client=auth.http_client()
    )
    token = auth.mint("alice", audience=resource, scope="b a", claims={"client_id": "agent"})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://127.0.0.1:8000"
    ) as http:
        for _ in range(2):
            assert (await http.get("/mcp", headers={"authorization": f"Bearer {token}"})).is_success
        assert get_access_token() is None  # reset after the request
    await middleware.aclose()
    (user, credentials, current), again = seen
    assert again[0] is user  # built once for the token
    assert current is user.access_token
    assert (user.display_name, user.scopes, credentials.scopes) == ("agent", ["a", "b"], ["a", "b"])
    access_token = user.access_token
    assert access_token.token == token
    assert (access_token.subject, access_token.resource) == ("alice", resource)
    assert access_token.claims["iss"] == auth.issuer
    for shown in (repr(access_token), str(access_token), repr(access_token.model_dump_json)):
        assert token not in shown
        assert token.split(".")[1] not in shown


def test_without_the_sdk_in_use_nothing_of_it_is_imported_or_filled() -> None:
    # A fresh interpreter: this one has imported the SDK already.
    script = """
import asyncio, sys
import httpx
from asgi_delegation import DelegationMiddleware
from asgi_delegation.testing import LocalAuthorizationServer

seen = []
async def app(scope, receive, send):
    seen.append(sorted(k for k in ("user", "auth") if k in scope))
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def main():
    auth = LocalAuthorizationServer()
    resource = "http://127.0.0.1:8000/mcp"
    mw = DelegationMiddleware(app, issuer=auth.issuer, resource=resource,
                              http_client=auth.http_client())
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        token = auth.mint("alice", audience=resource)
        response = await c.get("/mcp", headers={"authorization": "Bearer " + token})
    print(response.status_code, seen, "mcp" in sys.modules)

asyncio.run(main())
"""
    done = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["204", "[[]]", "False"], done.stderr


async def principals(
    tokens: list[str], monkeypatch: pytest.MonkeyPatch | None = None, **options: Any
) -> list[tuple[Any, Any, Any]]:
    """(scope["user"], scope["auth"], the access context) of one request per token."""
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["user"], scope["auth"], scope["state"]["access_context"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    auth = PRINCIPAL_AUTH
    middleware = DelegationMiddleware(
        app,
        issuer=auth.issuer,
        resource=PRINCIPAL_RESOURCE,
        http_client=auth.http_client(),
        **options,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://127.0.0.1:8000"
    ) as http:
        for token in tokens:
            answer = await http.get("/mcp", headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 204
    await middleware.aclose()
    return seen


PRINCIPAL_AUTH = LocalAuthorizationServer()
PRINCIPAL_RESOURCE = "http://127.0.0.1:8000/mcp"


def principal_token(subject: str, scope: str = "read write") -> str:
    return PRINCIPAL_AUTH.mint(subject, audience=PRINCIPAL_RESOURCE, scope=scope)


async def test_principals_share_the_entry_and_scope_lists_no_request_can_change() -> None:
    tokens = [principal_token("alice"), principal_token("bob"), principal_token("carol", "read")]
    (alice, alice_auth, alice_ctx), (bob, bob_auth, _), (carol, carol_auth, _) = await principals(
        tokens
    )
    assert alice.access_token.claims is alice_ctx.claims  # the validated claims, not a copy
    assert alice.scopes == ["read", "write"]
    assert carol.scopes == ["read"]
    assert alice.scopes is bob.scopes
    assert alice_auth is bob_auth
    assert alice_auth.scopes is alice.scopes
    assert carol_auth is not alice_auth
    mutators: tuple[Callable[[Any], object], ...] = (
        lambda s: s.append("admin"),
        lambda s: s.__setitem__(0, "admin"),
        lambda s: s.sort(),
    )
    for mutate in mutators:
        with pytest.raises(TypeError, match="read-only"):
            mutate(alice.access_token.scopes)
    with pytest.raises(TypeError, match="read-only"):
        alice.access_token.claims["sub"] = "bob"
    assert bob.scopes == ["read", "write"]
    assert bob.access_token.subject == "bob"
    dumped = alice.access_token.model_dump()
    assert dumped["scopes"] == ["read", "write"]
    assert dumped["claims"]["sub"] == "alice"
    assert json.loads(alice.access_token.model_dump_json())["subject"] == "alice"
    assert alice.access_token.model_fields_set == set(type(alice.access_token).model_fields)
    copied = alice.access_token.model_copy(deep=True)
    assert copied == alice.access_token
    assert copied.scopes == ["read", "write"]


async def test_a_principal_is_forgotten_with_its_token() -> None:
    alice, bob = principal_token("alice"), principal_token("bob")
    seen = await principals([alice, alice, bob, alice], token_cache_size=1)
    users = [user for user, _, _ in seen]
    assert users[0] is users[1]  # cached with the token
    assert users[3] is not users[0]  # its token was evicted by bob's: built again
    assert users[3].access_token.subject == "alice"


async def test_an_sdk_model_that_changed_is_built_by_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A model whose fields are not the ones the direct build knows: pydantic validates them.
    from asgi_delegation import _mcp_principal

    monkeypatch.setattr(_mcp_principal, "_FIELDS", ("token",))
    ((user, credentials, context),) = await principals([principal_token("alice")])
    access_token = user.access_token
    assert (access_token.subject, access_token.scopes, credentials.scopes) == (
        "alice",
        ["read", "write"],
        ["read", "write"],
    )
    assert access_token.claims == context.claims
    assert access_token.token not in repr(access_token)
