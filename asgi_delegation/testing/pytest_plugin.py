"""pytest fixtures for testing an application behind :class:`DelegationMiddleware`.

Installed with the package (entry point ``pytest11``, name ``asgi_delegation``); its fixtures do
nothing until a test asks for one, and ``-p no:asgi_delegation`` turns the plugin off. They are
synchronous, so they work with plain tests and with any async test plugin (pytest-asyncio,
anyio, ...). Each is function-scoped:

``delegation_resource`` -> ``str``
    The resource identifier of the application under test, ``http://127.0.0.1:8000/mcp``.
    Override the fixture (in a ``conftest.py``, module or class) to use yours.
``delegation_auth_server`` -> :class:`~asgi_delegation.testing.LocalAuthorizationServer`
    Running on a free loopback port for the test (``.issuer`` is its URL), with a client
    registered that may exchange tokens for any resource. Needs uvicorn
    (``pip install 'asgi-delegation[serve]'``).
``delegation_auth_servers`` -> ``(LocalAuthorizationServer, LocalAuthorizationServer)``
    For tests with two issuers: ``delegation_auth_server`` and a second server on a loopback
    port of its own, so with another issuer, and with keys of its own. The second has the same
    client registered (same ``client_id`` and secret, its own :class:`Client` object), so one
    set of credentials is good at both; mint its tokens with ``second.mint(...)``.
``delegation_client`` -> :class:`~asgi_delegation.testing.Client`
    That client: ``.client_id`` is ``"test-client"``, ``.secret`` a random secret. Restrict what
    it may exchange for with ``.allowed_resources = frozenset({...})``.
``delegation_token`` -> ``(sub="user", scope=None, **mint_kwargs) -> str``
    Mints an access token for ``delegation_resource`` from that server; ``mint_kwargs`` go to
    :meth:`LocalAuthorizationServer.mint` (``expires_in``, ``claims``, ``audience``, ...).
``delegation_middleware`` -> ``(app, **options) -> DelegationMiddleware``
    Wraps ``app`` in a middleware configured with the server's issuer, ``delegation_resource``
    and the client's credentials; ``options`` override or add to them. The middleware reaches
    the server in process (``http_client=delegation_auth_server.http_client()``), so it works
    in any event loop and holds no socket; pass ``http_client=None`` to go over the loopback
    port with its own client instead, and close it with ``await middleware.aclose()``.

Example::

    import asyncio

    import httpx


    async def whoami(scope, receive, send):
        ctx = scope["state"]["access_context"]
        grant = await ctx.exchange("https://api.example.com")  # RFC 8693, as the caller
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ctx.subject.encode()})


    def test_whoami(delegation_middleware, delegation_token):
        app = delegation_middleware(whoami, required_scopes=["read"])

        async def call(token):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get("/", headers={"Authorization": f"Bearer {token}"})

        assert asyncio.run(call(delegation_token("alice", scope="read"))).text == "alice"
        assert asyncio.run(call(delegation_token("alice"))).status_code == 403
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .._middleware import DelegationMiddleware
from ._server import LocalAuthorizationServer
from ._token_endpoint import Client

__all__ = ["DEFAULT_RESOURCE", "TEST_CLIENT_ID"]

DEFAULT_RESOURCE = "http://127.0.0.1:8000/mcp"
TEST_CLIENT_ID = "test-client"


@pytest.fixture
def delegation_resource() -> str:
    """The resource identifier of the application under test (override it to use yours)."""
    return DEFAULT_RESOURCE


@contextmanager
def _running(client_id: str, secret: str | None) -> Iterator[LocalAuthorizationServer]:
    # Every fixture that serves depends on delegation_auth_server, which is set up first.
    if importlib.util.find_spec("uvicorn") is None:
        pytest.fail(
            "delegation_auth_server needs uvicorn: pip install 'asgi-delegation[serve]'",
            pytrace=False,
        )
    server = LocalAuthorizationServer()
    server.register_client(client_id, secret=secret)
    with server.running():
        yield server


@pytest.fixture
def delegation_auth_server() -> Iterator[LocalAuthorizationServer]:
    """A LocalAuthorizationServer on a free loopback port, with the client ``test-client``."""
    with _running(TEST_CLIENT_ID, secrets.token_urlsafe(24)) as server:
        yield server


@pytest.fixture
def delegation_auth_servers(
    delegation_auth_server: LocalAuthorizationServer, delegation_client: Client
) -> Iterator[tuple[LocalAuthorizationServer, LocalAuthorizationServer]]:
    """Two issuers: ``delegation_auth_server`` and a second LocalAuthorizationServer on another
    loopback port, with keys of its own and ``delegation_client``'s id and secret registered."""
    # The client's credentials, not a new secret: one middleware configuration trusts both.
    with _running(delegation_client.client_id, delegation_client.secret) as second:
        yield delegation_auth_server, second


@pytest.fixture
def delegation_client(delegation_auth_server: LocalAuthorizationServer) -> Client:
    """The client registered with ``delegation_auth_server``: ``.client_id``, ``.secret``."""
    return delegation_auth_server.clients[TEST_CLIENT_ID]


@pytest.fixture
def delegation_token(
    delegation_auth_server: LocalAuthorizationServer, delegation_resource: str
) -> Callable[..., str]:
    """``(sub="user", scope=None, **mint_kwargs) -> str``: an access token for
    ``delegation_resource``, signed by ``delegation_auth_server``."""

    def mint(sub: str = "user", scope: str | None = None, **mint_kwargs: Any) -> str:
        mint_kwargs.setdefault("audience", delegation_resource)
        return delegation_auth_server.mint(sub, scope=scope, **mint_kwargs)

    return mint


@pytest.fixture
def delegation_middleware(
    delegation_auth_server: LocalAuthorizationServer,
    delegation_client: Client,
    delegation_resource: str,
) -> Callable[..., DelegationMiddleware]:
    """``(app, **options) -> DelegationMiddleware``: ``app`` behind a middleware that trusts
    ``delegation_auth_server`` and exchanges as ``delegation_client``."""

    def wrap(app: Any, **options: Any) -> DelegationMiddleware:
        settings: dict[str, Any] = {
            "issuer": delegation_auth_server.issuer,
            "resource": delegation_resource,
            "client_id": delegation_client.client_id,
            "client_secret": delegation_client.secret,
        }
        settings.update(options)
        if "http_client" not in options:
            settings["http_client"] = delegation_auth_server.http_client()
        return DelegationMiddleware(app, **settings)

    return wrap
