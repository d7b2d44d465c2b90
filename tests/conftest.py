"""Shared fixtures: a local authorization server, the middleware around an echo app, a clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
import pytest

from asgi_delegation import DelegationMiddleware, ExchangeError, _clock
from asgi_delegation._exchange import Exchanger
from asgi_delegation._http import HTTPClient
from asgi_delegation.testing import LocalAuthorizationServer

RESOURCE = "http://127.0.0.1:8000/mcp"
BASE_URL = "http://127.0.0.1:8000"
CLIENT_ID = "mcp-server"
CLIENT_SECRET = "s3cr:t +/=%"  # characters that client_secret_basic must form-encode
GITHUB = "https://api.github.com"
GOOGLE = "https://www.googleapis.com"
SLACK = "https://slack.com/api"


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


def exchanging_app(auth: LocalAuthorizationServer) -> Any:
    """``GET /exchange?resource=R1,R2&scope=S``: exchanges for each resource, one after the
    other, and answers what the grants say (checked with ``auth.verify``) or the error.
    Every other path is ``echo_app``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/exchange":
            await echo_app(scope, receive, send)
            return
        ctx = scope["state"]["access_context"]
        params = dict(parse_qsl(scope["query_string"].decode()))
        document: dict[str, Any] = {"grants": []}
        try:
            for resource in params.get("resource", "").split(","):
                grant = await ctx.exchange(resource, scope=params.get("scope"))
                claims = auth.verify(grant.access_token) or {}
                document["grants"].append(
                    {
                        "resource": grant.resource,
                        "sub": claims.get("sub"),
                        "aud": claims.get("aud"),
                        "scope": grant.scope,
                        "token_type": grant.token_type,
                    }
                )
        except ExchangeError as exc:
            document["error"] = {
                "class": type(exc).__name__,
                "error": exc.error,
                "description": exc.error_description,
                "retry_after": exc.retry_after,
            }
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


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

    async def exchange(self, token: str, resource: str, scope: str | None = None) -> Any:
        """The JSON answer of ``exchanging_app`` for ``token``'s exchange(s)."""
        params = {"resource": resource, **({"scope": scope} if scope else {})}
        response = await self.get(token, path="/exchange", params=params)
        assert response.status_code == 200, response.text
        return response.json()


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
    server = LocalAuthorizationServer()
    server.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    return server


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
        options.setdefault("client_id", CLIENT_ID)
        if not {"client_secret", "private_key", "client_assertion_file"} & options.keys():
            options["client_secret"] = CLIENT_SECRET
        app = options.pop("app", None) or exchanging_app(auth)
        middleware = DelegationMiddleware(app, **options)
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


async def read_body(receive: Any) -> bytes:
    """The whole request body, for test servers that look at what they are sent."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def audit_delivered(middleware: DelegationMiddleware) -> None:
    """Until every task waits and the ``on_audit`` worker has handed every queued event to the
    callback: a sync callback runs in a worker thread, which ``wait_all_tasks_blocked`` does not
    see (the worker's wake event stays set until its queue is drained)."""
    with anyio.fail_after(10):
        await anyio.wait_all_tasks_blocked()
        while middleware._auditor._wake.is_set():  # noqa: ASYNC110 - no event says "drained"
            await anyio.sleep(0.001)


def fetches(auth: LocalAuthorizationServer, what: str) -> int:
    """How many times ``auth`` served its JWKS ("jwks") or metadata ("metadata")."""
    if what == "jwks":
        return sum(n for path, n in auth.requests.items() if path.endswith("/jwks"))
    return sum(n for path, n in auth.requests.items() if "/.well-known/" in path)


@pytest.fixture
def made_clients(monkeypatch: pytest.MonkeyPatch) -> list[httpx.AsyncClient]:
    """Every HTTP client a middleware makes for itself (one per event loop) from now on."""
    clients: list[httpx.AsyncClient] = []
    open_one = HTTPClient._open

    def recording(self: HTTPClient) -> Any:
        owned = open_one(self)
        clients.append(owned.client)
        return owned

    monkeypatch.setattr(HTTPClient, "_open", recording)
    return clients


def exchanger_of(middleware: DelegationMiddleware) -> Exchanger[Any]:
    """The exchanger of a single-issuer middleware."""
    exchanger = middleware._exchanger
    assert exchanger is not None
    return exchanger
