"""Whatever a request to the authorization server raises, only documented outcomes come out.

Every exception class httpx exports, and what the network below it can raise besides, is
injected into each request the middleware sends (the metadata, the JWKS, the token endpoint):
an inbound request gets 503 with ``Retry-After``, ``exchange()`` gets ``ExchangeUnavailable``;
never a 500, never an exception of another kind, never the exception's text (it may quote a
URL with credentials, or a token).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from asgi_delegation import ConfigurationError, DelegationMiddleware
from asgi_delegation._fetch import fetch_json
from asgi_delegation._urls import secure_url
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import GITHUB, RESOURCE, Gateway, echo_app

LEAK = "https://user:pa55word@as.example/?token=eyJhbGciOiJSUzI1NiJ9.leak"

Raise = Callable[[httpx.Request], BaseException]


def _raising(kind: type[Exception]) -> Raise:
    def make(request: httpx.Request) -> Exception:
        if issubclass(kind, httpx.HTTPStatusError):
            return kind(LEAK, request=request, response=httpx.Response(500, request=request))
        if issubclass(kind, httpx.RequestError):
            return kind(LEAK, request=request)
        try:
            return kind(LEAK)
        except TypeError:  # StreamConsumed and its kind take no message
            return kind()

    return make


def _event_loop_is_closed(request: httpx.Request) -> Exception:
    # What a pooled connection of an event loop that has ended raises.
    return RuntimeError("Event loop is closed")


HTTPX_EXCEPTIONS = sorted(
    {
        exported
        for name in httpx.__all__
        if isinstance(exported := getattr(httpx, name), type) and issubclass(exported, Exception)
    },
    key=lambda kind: kind.__name__,
)
RAISED: dict[str, Raise] = {
    **{kind.__name__: _raising(kind) for kind in HTTPX_EXCEPTIONS},
    "OSError": _raising(OSError),
    "RuntimeError": _event_loop_is_closed,
}


def test_the_exceptions_outside_httpx_error_are_among_them() -> None:
    outside = {kind.__name__ for kind in HTTPX_EXCEPTIONS if not issubclass(kind, httpx.HTTPError)}
    assert {"InvalidURL", "CookieConflict", "StreamError", "StreamConsumed"} <= outside


def IS_METADATA(request: httpx.Request) -> bool:
    return "/.well-known/" in request.url.path


def IS_JWKS(request: httpx.Request) -> bool:
    return request.url.path.endswith("/jwks")


def IS_TOKEN(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/token")


class Failing(httpx.AsyncBaseTransport):
    """Reaches ``auth`` in process, except that the requests ``where`` picks raise."""

    def __init__(
        self, auth: LocalAuthorizationServer, where: Callable[[httpx.Request], bool], raise_: Raise
    ) -> None:
        self._inner = httpx.ASGITransport(app=auth)
        self._where = where
        self._raise = raise_
        self.raised: list[BaseException] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._where(request):
            exc = self._raise(request)
            self.raised.append(exc)
            raise exc
        return await self._inner.handle_async_request(request)


def failing_gateway(
    gateway_factory: Callable[..., Gateway],
    auth: LocalAuthorizationServer,
    where: Callable[[httpx.Request], bool],
    raise_: Raise,
    **options: Any,
) -> tuple[Gateway, Failing]:
    transport = Failing(auth, where, raise_)
    gateway = gateway_factory(http_client=httpx.AsyncClient(transport=transport), **options)
    return gateway, transport


def assert_unsaid(text: str, transport: Failing) -> None:
    assert transport.raised, "nothing was injected"
    assert LEAK not in text
    for exc in transport.raised:
        assert str(exc) not in text or not str(exc)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, "asgi_delegation")
    return caplog


@pytest.mark.parametrize("where", [IS_METADATA, IS_JWKS], ids=["metadata", "jwks"])
@pytest.mark.parametrize("raised", RAISED, ids=str)
async def test_a_failed_fetch_answers_503_with_retry_after(
    gateway_factory: Any,
    auth: LocalAuthorizationServer,
    logged: pytest.LogCaptureFixture,
    where: Callable[[httpx.Request], bool],
    raised: str,
) -> None:
    gateway, transport = failing_gateway(gateway_factory, auth, where, RAISED[raised])
    response = await gateway.get(auth.mint(audience=RESOURCE))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == "temporarily_unavailable"
    assert type(transport.raised[0]).__name__ in logged.text  # the type alone is named
    assert_unsaid(response.text + logged.text, transport)


@pytest.mark.parametrize("where", [IS_METADATA, IS_TOKEN], ids=["metadata", "token"])
@pytest.mark.parametrize("raised", RAISED, ids=str)
async def test_a_failed_exchange_is_exchange_unavailable(
    gateway_factory: Any,
    auth: LocalAuthorizationServer,
    logged: pytest.LogCaptureFixture,
    where: Callable[[httpx.Request], bool],
    raised: str,
) -> None:
    # With jwks_uri configured, inbound tokens validate without the metadata an exchange needs.
    gateway, transport = failing_gateway(
        gateway_factory,
        auth,
        where,
        RAISED[raised],
        jwks_uri=auth.issuer + "/jwks",
        exchange_attempts=2,
    )
    answer = await gateway.exchange(auth.mint(audience=RESOURCE), GITHUB)
    error = answer["error"]
    assert error["class"] == "ExchangeUnavailable", answer
    assert error["error"] == "temporarily_unavailable"
    if where is IS_TOKEN:  # the retries were made, each failing the same way
        assert len(transport.raised) == 2
    assert_unsaid(str(error) + logged.text, transport)


async def test_cancellation_still_propagates(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    def cancelled(request: httpx.Request) -> BaseException:
        return asyncio.CancelledError()

    gateway, _ = failing_gateway(gateway_factory, auth, IS_TOKEN, cancelled)
    with pytest.raises(asyncio.CancelledError):
        await gateway.exchange(auth.mint(audience=RESOURCE), GITHUB)


async def test_fetch_json_lets_cancellation_through(auth: LocalAuthorizationServer) -> None:
    def cancelled(request: httpx.Request) -> BaseException:
        return asyncio.CancelledError()

    async with httpx.AsyncClient(transport=Failing(auth, IS_JWKS, cancelled)) as client:
        with pytest.raises(asyncio.CancelledError):
            await fetch_json(client, auth.issuer + "/jwks", deadline=5, max_bytes=1024)


# Accepted by urllib's parser, refused by httpx's.
URLS_HTTPX_REFUSES = {
    "IPv4 out of range": "https://999.1.1.1/path",
    "IPv6 literal": "https://[v1.x]/path",
    "IDNA": "https://\u2488.example/path",
    "lone surrogate": "https://as.example/\udcff",
}


@pytest.mark.parametrize("url", URLS_HTTPX_REFUSES.values(), ids=URLS_HTTPX_REFUSES.keys())
def test_secure_url_refuses_what_httpx_refuses(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^jwks_uri is not a valid URL$"):
        secure_url(url, "jwks_uri")


@pytest.mark.parametrize("argument", ["issuer", "resource", "jwks_uri", "token_endpoint"])
def test_configuration_httpx_refuses_is_a_configuration_error(argument: str) -> None:
    arguments: dict[str, Any] = {"issuer": "https://as.example", "resource": RESOURCE}
    arguments[argument] = URLS_HTTPX_REFUSES["IPv4 out of range"]
    with pytest.raises(ConfigurationError, match=rf"^{argument} is not a valid URL$"):
        DelegationMiddleware(echo_app, **arguments)


@pytest.mark.parametrize("url", URLS_HTTPX_REFUSES.values(), ids=URLS_HTTPX_REFUSES.keys())
async def test_a_jwks_uri_httpx_refuses_in_the_metadata_answers_503(
    gateway_factory: Any,
    auth: LocalAuthorizationServer,
    monkeypatch: pytest.MonkeyPatch,
    logged: pytest.LogCaptureFixture,
    url: str,
) -> None:
    monkeypatch.setattr(auth, "metadata", lambda: {"issuer": auth.issuer, "jwks_uri": url})
    response = await gateway_factory().get(auth.mint(audience=RESOURCE))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "the metadata's jwks_uri is not a valid URL" in logged.text


@pytest.mark.parametrize("url", URLS_HTTPX_REFUSES.values(), ids=URLS_HTTPX_REFUSES.keys())
async def test_a_token_endpoint_httpx_refuses_in_the_metadata_is_exchange_unavailable(
    gateway_factory: Any, auth: LocalAuthorizationServer, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    document = {**auth.metadata(), "token_endpoint": url}
    monkeypatch.setattr(auth, "metadata", lambda: document)
    gateway = gateway_factory(jwks_uri=auth.issuer + "/jwks")
    answer = await gateway.exchange(auth.mint(audience=RESOURCE), GITHUB)
    assert answer["error"]["class"] == "ExchangeUnavailable", answer
    assert answer["error"]["error"] == "temporarily_unavailable"
