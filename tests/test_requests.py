"""What the middleware answers, and what it hands to the application, per kind of request."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from asgi_delegation import AccessContext, DelegationMiddleware
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import BASE_URL, RESOURCE, Gateway, echo_app

METADATA_URL = "http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp"


async def test_valid_token_reaches_the_app_with_its_context(gateway: Gateway, token: str) -> None:
    response = await gateway.get(token)
    assert response.status_code == 200
    assert response.json() == {"path": "/mcp", "subject": "alice", "scopes": ["read", "write"]}


async def test_missing_token_gets_a_challenge_pointing_at_the_metadata(gateway: Gateway) -> None:
    response = await gateway.get()
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == f'Bearer resource_metadata="{METADATA_URL}"'
    assert response.json() == {
        "error": "unauthorized",
        "error_description": "A bearer token is required",
    }
    assert response.headers["cache-control"] == "no-store"
    assert "WWW-Authenticate" in response.headers["access-control-expose-headers"]


async def test_challenge_names_required_scopes(gateway_factory: Any) -> None:
    gateway = gateway_factory(required_scopes=["read", "admin"])
    response = await gateway.get()
    assert response.headers["www-authenticate"] == (
        f'Bearer resource_metadata="{METADATA_URL}", scope="admin read"'
    )


async def test_insufficient_scope_names_every_required_scope(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(required_scopes=["read", "admin"])
    response = await gateway.get(auth.mint(audience=RESOURCE, scope="read"))
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope", scope="admin read"')
    assert response.json()["error"] == "insufficient_scope"


async def test_scp_list_and_scope_string_both_grant(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(required_scopes=["a", "b"])
    token = auth.mint(audience=RESOURCE, scope="a", claims={"scp": ["b"]})
    assert (await gateway.get(token)).json()["scopes"] == ["a", "b"]


async def test_custom_audience_replaces_the_resource(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(audience=["api://default", "other"])
    assert (await gateway.get(auth.mint(audience="api://default"))).status_code == 200
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 401


async def test_require_at_jwt(gateway_factory: Any, auth: LocalAuthorizationServer) -> None:
    gateway = gateway_factory(require_at_jwt=True)
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    for header in ({"typ": "JWT"}, {"typ": "application/AT+JWT"}):
        status = (await gateway.get(auth.mint(audience=RESOURCE, header=header))).status_code
        assert status == (401 if header["typ"] == "JWT" else 200)
    no_typ = auth.mint(audience=RESOURCE, omit=["typ"])
    assert (await gateway.get(no_typ)).status_code == 401


async def test_leeway_is_configurable(gateway_factory: Any, auth: LocalAuthorizationServer) -> None:
    token = auth.mint(audience=RESOURCE, expires_in=-10)
    assert (await gateway_factory().get(token)).status_code == 200  # within the default 30 s
    assert (await gateway_factory(leeway=0).get(token)).status_code == 401


async def test_max_token_bytes(gateway_factory: Any, auth: LocalAuthorizationServer) -> None:
    token = auth.mint(audience=RESOURCE, claims={"pad": "x" * 2000})
    response = await gateway_factory(max_token_bytes=1024).get(token)
    assert response.status_code == 401
    assert response.json()["error_description"] == "The access token is too large"


async def test_cached_token_expires_with_its_exp(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Any
) -> None:
    token = auth.mint(audience=RESOURCE, expires_in=60)
    assert (await gateway.get(token)).status_code == 200
    clock.advance(60 + 29)
    assert (await gateway.get(token)).status_code == 200
    clock.advance(2)
    response = await gateway.get(token)
    assert response.status_code == 401
    assert response.json()["error_description"] == "The access token has expired"


async def test_claims_are_read_only(gateway_factory: Any, auth: LocalAuthorizationServer) -> None:
    seen: list[AccessContext] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["state"]["access_context"])
        await echo_app(scope, receive, send)

    middleware = DelegationMiddleware(
        app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client()
    )
    token = auth.mint(audience=RESOURCE, claims={"roles": ["a"], "org": {"id": 1}})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url=BASE_URL
    ) as client:
        await client.get("/", headers={"authorization": f"Bearer {token}"})
    claims = seen[0].claims
    assert claims["roles"] == ("a",)
    with pytest.raises(TypeError):
        claims["org"]["id"] = 2
    assert token not in repr(seen[0])
    assert repr(seen[0]) == "AccessContext(subject='user', scopes=[])"


# -- protected resource metadata ------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"]
)
async def test_metadata_is_served_from_configuration(
    gateway_factory: Any, auth: LocalAuthorizationServer, path: str
) -> None:
    gateway = gateway_factory(required_scopes=["read"])
    response = await gateway.client.get(path, headers={"host": "evil.example"})
    assert response.status_code == 200
    assert response.json() == {
        "resource": RESOURCE,
        "authorization_servers": [auth.issuer],
        "scopes_supported": ["read"],
        "bearer_methods_supported": ["header"],
    }
    assert response.headers["access-control-allow-origin"] == "*"


async def test_metadata_keeps_the_issuer_string_exactly(gateway_factory: Any) -> None:
    gateway = gateway_factory(
        issuer="https://auth.example.com", scopes_supported=["a", "b"], http_client=None
    )
    document = (await gateway.client.get("/.well-known/oauth-protected-resource")).json()
    assert document["authorization_servers"] == ["https://auth.example.com"]
    assert document["scopes_supported"] == ["a", "b"]


async def test_metadata_cors_and_methods(gateway: Gateway) -> None:
    path = "/.well-known/oauth-protected-resource/mcp"
    preflight = await gateway.client.options(
        path,
        headers={
            "origin": "https://inspector.example",
            "access-control-request-method": "GET",
            "access-control-request-headers": "mcp-protocol-version",
        },
    )
    assert preflight.status_code == 204
    assert "mcp-protocol-version" in preflight.headers["access-control-allow-headers"]
    head = await gateway.client.head(path)
    assert head.status_code == 200
    assert head.content == b""
    post = await gateway.client.post(path)
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD, OPTIONS"


async def test_metadata_for_a_resource_without_path(gateway_factory: Any) -> None:
    gateway = gateway_factory(resource="http://127.0.0.1:8000")
    response = await gateway.client.get("/.well-known/oauth-protected-resource")
    assert response.json()["resource"] == "http://127.0.0.1:8000"
    challenge = (await gateway.get()).headers["www-authenticate"]
    assert challenge == (
        'Bearer resource_metadata="http://127.0.0.1:8000/.well-known/oauth-protected-resource"'
    )


# -- what passes without a token ------------------------------------------------------------


async def test_public_paths(gateway_factory: Any) -> None:
    gateway = gateway_factory(public_paths=["/health", "/static/"])
    assert (await gateway.get(path="/health")).status_code == 200
    assert (await gateway.get(path="/static/app.js")).status_code == 200
    assert (await gateway.get(path="/health/x")).status_code == 401
    assert (await gateway.get(path="/static")).status_code == 401
    # Dot segments could step out of a public prefix in an app that normalizes paths.
    raw = httpx.URL(BASE_URL + "/static/")
    escaped = raw.copy_with(raw_path=b"/static/../admin")
    assert (await gateway.client.get(escaped)).status_code == 401


async def test_cors_preflight_passes_to_the_app_which_can_send_no_body(
    gateway: Gateway,
) -> None:
    # echo_app answers every request alike: a preflight, unauthenticated, must not get its body.
    response = await gateway.client.options(
        "/mcp", headers={"origin": "https://x.example", "access-control-request-method": "POST"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"  # the app's own headers
    assert (response.content, response.headers["content-length"]) == (b"", "0")
    plain_options = await gateway.client.options("/mcp")
    assert plain_options.status_code == 401


async def test_a_preflight_answered_in_several_messages_still_sends_no_body(
    gateway_factory: Any,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"6"), (b"access-control-allow-origin", b"*")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"sec", "more_body": True})
        await send({"type": "http.response.body", "body": b"ret", "more_body": False})

    gateway = gateway_factory(app=app)
    response = await gateway.client.options(
        "/mcp", headers={"origin": "https://x.example", "access-control-request-method": "GET"}
    )
    assert (response.status_code, response.content) == (204, b"")
    assert response.headers.get_list("content-length") == ["0"]
    assert response.headers["access-control-allow-origin"] == "*"


# -- ASGI plumbing --------------------------------------------------------------------------


def _http_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000), **extra,
    }  # fmt: skip


async def _drive(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_existing_state_is_kept(auth: LocalAuthorizationServer, token: str) -> None:
    middleware = DelegationMiddleware(
        echo_app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client()
    )
    scope = _http_scope([(b"authorization", f"Bearer {token}".encode())], state={"db": "pool"})
    sent = await _drive(middleware, scope, [{"type": "http.request", "body": b""}])
    assert sent[0]["status"] == 200
    assert scope["state"]["db"] == "pool"
    assert scope["state"]["access_context"].subject == "alice"


@pytest.mark.parametrize("authorized", [True, False])
async def test_websocket_handshake(
    auth: LocalAuthorizationServer, token: str, authorized: bool
) -> None:
    middleware = DelegationMiddleware(
        echo_app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client()
    )
    headers = [(b"authorization", f"Bearer {token}".encode())] if authorized else []
    scope = {**_http_scope(headers), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    sent = await _drive(
        middleware, scope, [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]
    )
    if authorized:
        assert sent[0] == {"type": "websocket.accept"}
        assert json.loads(sent[1]["text"])["subject"] == "alice"
    else:
        assert sent == [{"type": "websocket.close", "code": 1008, "reason": "unauthorized"}]


@pytest.mark.parametrize(
    ("kind", "path", "public", "reaches"),
    [
        # (a metadata path is the metadata's over HTTP, whatever else it is)
        ("http", "/.well-known/oauth-protected-resource/mcp", ["/.well-known/"], "metadata"),
        ("http", "/.well-known/oauth-protected-resource/mcp", [], "metadata"),
        ("websocket", "/.well-known/oauth-protected-resource/mcp", ["/.well-known/"], "app"),
        ("websocket", "/.well-known/oauth-protected-resource/mcp", [], "refused"),
        ("http", "/health", ["/health"], "app"),
        ("websocket", "/health", ["/health"], "app"),
        ("http", "/docs/page", ["/docs/"], "app"),
        ("http", "/docs/../mcp", ["/docs/"], "refused"),
        ("http", "/healthz", ["/health"], "refused"),
    ],
)
async def test_what_reaches_the_app_without_a_token(
    auth: LocalAuthorizationServer, kind: str, path: str, public: list[str], reaches: str
) -> None:
    middleware = DelegationMiddleware(
        echo_app,
        issuer=auth.issuer,
        resource=RESOURCE,
        http_client=auth.http_client(),
        public_paths=public,
    )
    scope = _http_scope([], path=path, raw_path=path.encode())
    incoming: list[dict[str, Any]] = [{"type": "http.request", "body": b""}]
    if kind == "websocket":
        scope = {**scope, "type": "websocket", "scheme": "ws", "subprotocols": []}
        del scope["method"]
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]
    sent = await _drive(middleware, scope, incoming)
    await middleware.aclose()
    if reaches == "refused":
        first = sent[0]
        assert first.get("status") == 401 or first.get("code") == 1008, sent
    elif reaches == "metadata":
        assert sent[0]["status"] == 200
        assert json.loads(sent[1]["body"])["resource"] == RESOURCE
    else:
        body = sent[1]["body"] if kind == "http" else sent[1]["text"]
        assert json.loads(body) == {"path": path, "subject": None, "scopes": None}


async def test_lifespan_passes_through_and_closes_only_its_own_client() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    own = DelegationMiddleware(echo_app, issuer="https://a.example", resource=RESOURCE)
    first = own._http.get()  # this event loop's client
    sent = await _drive(own, dict(scope), list(messages))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert first.is_closed
    # The next cycle gets a new client, and closes it in turn.
    second = own._http.get()
    assert second is not first
    assert not second.is_closed
    assert await _drive(own, dict(scope), list(messages)) == sent
    assert second.is_closed

    client = httpx.AsyncClient()
    given = DelegationMiddleware(
        echo_app, issuer="https://a.example", resource=RESOURCE, http_client=client
    )
    assert await _drive(given, dict(scope), list(messages)) == sent
    assert not client.is_closed
    await client.aclose()


async def test_no_io_at_construction(auth: LocalAuthorizationServer) -> None:
    DelegationMiddleware(echo_app, issuer=auth.issuer, resource=RESOURCE)
    DelegationMiddleware(
        echo_app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client()
    )
    assert auth.requests == {}


async def test_discovery_happens_once_for_many_tokens(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    for n in range(5):
        assert (await gateway.get(auth.mint(f"user{n}", audience=RESOURCE))).status_code == 200
    assert auth.requests == {"/.well-known/oauth-authorization-server": 1, "/jwks": 1}
