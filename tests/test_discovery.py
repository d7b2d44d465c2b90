"""Discovery and JWKS fetches over real HTTP on 127.0.0.1, including hostile servers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from asgi_delegation._discovery import discovery_urls
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket, serve_on

from .conftest import RESOURCE, fetches

Handler = Callable[[Any, Any, Any], Awaitable[None]]


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    with loopback_socket() as (sock, origin):
        async with serve_on(app, sock):
            yield origin


def intercepting(auth: Any, path_suffix: str, handler: Handler) -> Any:
    """``auth``, except that paths ending in ``path_suffix`` are answered by ``handler``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith(path_suffix):
            await handler(scope, receive, send)
        else:
            await auth(scope, receive, send)

    return app


def answer(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Handler:
    async def handler(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers or []})
        await send({"type": "http.response.body", "body": body})

    return handler


async def test_discovery_and_jwks_over_loopback(
    served_auth: LocalAuthorizationServer, gateway_factory: Any
) -> None:
    gateway = gateway_factory(issuer=served_auth.issuer, http_client=None)
    for n in range(3):
        token = served_auth.mint(f"u{n}", audience=RESOURCE)
        assert (await gateway.get(token)).status_code == 200
    assert served_auth.requests == {"/.well-known/oauth-authorization-server": 1, "/jwks": 1}


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        (
            "https://as.example",
            (
                "https://as.example/.well-known/oauth-authorization-server",
                "https://as.example/.well-known/openid-configuration",
            ),
        ),
        (
            "https://as.example/tenant/",
            (
                "https://as.example/.well-known/oauth-authorization-server/tenant",
                "https://as.example/.well-known/openid-configuration/tenant",
                "https://as.example/tenant/.well-known/openid-configuration",
            ),
        ),
    ],
)
def test_discovery_urls(issuer: str, expected: tuple[str, ...]) -> None:
    assert discovery_urls(issuer) == expected


async def test_issuer_with_a_path_uses_path_insertion(gateway_factory: Any) -> None:
    auth = LocalAuthorizationServer("http://127.0.0.1/tenant-a")
    async with auth.serve() as issuer:
        assert issuer.endswith("/tenant-a")
        gateway = gateway_factory(issuer=issuer, http_client=None)
        assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    assert auth.requests == {
        "/.well-known/oauth-authorization-server/tenant-a": 1,
        "/tenant-a/jwks": 1,
    }


async def test_falls_back_to_openid_configuration(
    auth: LocalAuthorizationServer, gateway_factory: Any
) -> None:
    app = intercepting(auth, "oauth-authorization-server", answer(404, b"{}"))
    async with serving(app) as origin:
        auth.issuer = origin
        gateway = gateway_factory(issuer=origin, http_client=None)
        assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    assert auth.requests["/.well-known/openid-configuration"] == 1


@pytest.mark.parametrize(
    "configured", ["{origin}/", "{origin}/other", "http://localhost:{port}"], ids=str
)
async def test_metadata_naming_another_issuer_is_refused(
    served_auth: LocalAuthorizationServer,
    gateway_factory: Any,
    caplog: pytest.LogCaptureFixture,
    configured: str,
) -> None:
    origin = served_auth.issuer
    port = origin.rsplit(":", 1)[1]
    issuer = configured.format(origin=origin, port=port)
    gateway = gateway_factory(issuer=issuer, http_client=None)
    response = await gateway.get(served_auth.mint(audience=RESOURCE, claims={"iss": issuer}))
    assert response.status_code == 503
    assert "another issuer" in caplog.text or "HTTP 404" in caplog.text
    assert fetches(served_auth, "jwks") == 0


async def test_jwks_uri_override_skips_discovery(
    served_auth: LocalAuthorizationServer, gateway_factory: Any
) -> None:
    gateway = gateway_factory(
        issuer=served_auth.issuer, jwks_uri=served_auth.issuer + "/jwks", http_client=None
    )
    assert (await gateway.get(served_auth.mint(audience=RESOURCE))).status_code == 200
    assert served_auth.requests == {"/jwks": 1}


HOSTILE_JWKS = {
    "redirect": answer(302, b"", [(b"location", b"/elsewhere")]),
    "html": answer(200, b"<html>maintenance</html>", [(b"content-type", b"text/html")]),
    "not an object": answer(200, b"[1, 2]"),
    "no keys list": answer(200, b'{"keys": {"kty": "RSA"}}'),
    "only unusable keys": answer(200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
    "nan": answer(200, b'{"keys": NaN}'),
    "deep nesting": answer(200, b'{"keys": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "too large": answer(200, b'{"keys": [], "pad": "' + b"x" * (600 * 1024) + b'"}'),
    "compressed": answer(200, b"\x1f\x8b", [(b"content-encoding", b"gzip")]),
    "server error": answer(500, b'{"error": "boom"}'),
}


@pytest.mark.parametrize("case", HOSTILE_JWKS, ids=str)
async def test_hostile_jwks_answers_are_unavailable_not_500(
    auth: LocalAuthorizationServer, gateway_factory: Any, case: str
) -> None:
    app = intercepting(auth, "/jwks", HOSTILE_JWKS[case])
    async with serving(app) as origin:
        auth.issuer = origin
        gateway = gateway_factory(issuer=origin, http_client=None)
        response = await gateway.get(auth.mint(audience=RESOURCE))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == "temporarily_unavailable"
    assert "/elsewhere" not in auth.requests
    assert "/jwks" not in auth.requests  # answered by the hostile handler alone


async def test_trickling_server_is_cut_at_the_deadline(
    auth: LocalAuthorizationServer, gateway_factory: Any
) -> None:
    async def trickle(scope: Any, receive: Any, send: Any) -> None:
        async def until_disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        await send({"type": "http.response.start", "status": 200, "headers": []})
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(until_disconnected)
            while True:
                await send({"type": "http.response.body", "body": b" ", "more_body": True})
                await anyio.sleep(0.05)

    app = intercepting(auth, "/jwks", trickle)
    async with serving(app) as origin:
        auth.issuer = origin
        gateway = gateway_factory(issuer=origin, http_client=None, http_timeout=0.5)
        with anyio.fail_after(5):  # the middleware's own deadline must end it long before
            response = await gateway.get(auth.mint(audience=RESOURCE))
    assert response.status_code == 503


async def test_unsafe_jwks_uri_in_metadata_is_never_fetched(
    auth: LocalAuthorizationServer, gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def metadata(scope: Any, receive: Any, send: Any) -> None:
        document = {**auth.metadata(), "jwks_uri": "http://attacker.example/jwks"}
        await answer(200, __import__("json").dumps(document).encode())(scope, receive, send)

    app = intercepting(auth, "oauth-authorization-server", metadata)
    app = intercepting(app, "openid-configuration", metadata)
    async with serving(app) as origin:
        auth.issuer = origin
        gateway = gateway_factory(issuer=origin, http_client=None)
        caplog.set_level(logging.WARNING, "asgi_delegation")
        response = await gateway.get(auth.mint(audience=RESOURCE))
    assert response.status_code == 503
    assert "jwks_uri must use https://" in caplog.text


async def test_cold_start_with_the_server_down_then_recovery(
    auth: LocalAuthorizationServer, gateway_factory: Any, clock: Any
) -> None:
    with loopback_socket() as (sock, origin):
        auth.issuer = origin
        gateway = gateway_factory(issuer=origin, http_client=None)
        token = auth.mint(audience=RESOURCE)
        # The socket listens but nobody accepts or answers yet: close it for a refusal.
    first = await gateway.get(token)
    assert first.status_code == 503
    assert first.headers["retry-after"] == "1"
    # Inside the backoff nothing is fetched: the answer comes at once.
    assert (await gateway.get(token)).status_code == 503
    clock.advance(1.5)
    second = await gateway.get(token)
    assert second.status_code == 503
    assert second.headers["retry-after"] == "2"  # exponential backoff
    host, port = origin.removeprefix("http://").split(":")
    with loopback_socket(host, int(port)) as (sock, _):
        async with serve_on(auth, sock):
            clock.advance(2.5)
            assert (await gateway.get(token)).status_code == 200
