"""How long a grant is handed out: never after the caller's token expires (from the cache, by
``access()``, through ``auth()``, or refreshed ahead), and a refresh ahead of expiry that fails
is retried after a backoff while the grant is still valid."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from asgi_delegation import AccessContext, ExchangeDenied
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import GITHUB, GOOGLE, RESOURCE, Clock, Gateway, exchanger_of

GatewayFactory = Callable[..., Gateway]
LEEWAY = 30  # the middleware's default
SUBJECT_LIFETIME = 600


def token_requests(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


async def held_context(gateway_factory: GatewayFactory, token: str, **options: Any) -> Any:
    """The access context of one request, kept as a long request (an SSE stream, a WebSocket)
    keeps it, and the middleware that made it."""
    seen: list[AccessContext] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["state"]["access_context"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gateway = gateway_factory(app=app, **options)
    assert (await gateway.get(token)).status_code == 200
    (context,) = seen
    return context, gateway.middleware


def past_the_subject_token(clock: Clock) -> None:
    """Move time past the subject token's ``exp`` plus the leeway (the token was minted with
    the real clock, a second or so ago at most)."""
    clock.advance(SUBJECT_LIFETIME + LEEWAY + 2 - clock.offset)


def expired_refusal(error: ExchangeDenied, resource: str, token: str) -> None:
    assert (error.error, error.resource) == ("invalid_grant", resource)
    assert error.error_description == "the subject token has expired"
    assert token not in str(error)


async def background_done(middleware: Any) -> None:
    tasks = list(exchanger_of(middleware)._background)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def subject(auth: LocalAuthorizationServer) -> str:
    return auth.mint("alice", audience=RESOURCE, expires_in=SUBJECT_LIFETIME)


# -- never after the subject token's exp + leeway ----------------------------------------------


async def test_a_cached_grant_is_not_handed_out_after_the_subject_token_expires(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, subject: str, clock: Clock
) -> None:
    auth.exchange_expires_in = 3600  # the grant would outlive the subject token by far
    context, _ = await held_context(gateway_factory, subject)
    grant = await context.exchange(GITHUB)
    clock.advance(SUBJECT_LIFETIME + LEEWAY - 10)  # within the leeway: still from the cache
    assert await context.exchange(GITHUB) is grant
    past_the_subject_token(clock)
    with pytest.raises(ExchangeDenied) as refused:
        await context.exchange(GITHUB)
    expired_refusal(refused.value, GITHUB, subject)
    assert token_requests(auth) == 1


async def test_an_expired_subject_token_is_refused_without_a_request_and_audited(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    subject: str,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    context, middleware = await held_context(gateway_factory, subject)
    await context.exchange(GITHUB)
    past_the_subject_token(clock)  # the local server, on the real clock, would still grant
    caplog.set_level(logging.INFO, logger="asgi_delegation.audit")
    with pytest.raises(ExchangeDenied) as refused:
        await context.exchange(GOOGLE)
    expired_refusal(refused.value, GOOGLE, subject)
    assert token_requests(auth) == 1
    assert context.get_errors() == {GOOGLE: refused.value}
    # As allowed_resources and the policy refuse: before the cache, no request, a WARNING.
    (record,) = [r for r in caplog.records if r.name == "asgi_delegation.audit"]
    assert record.levelno == logging.WARNING
    event = record.audit  # type: ignore[attr-defined]
    assert (event["resource"], event["outcome"], event["cache"], event["error"]) == (
        GOOGLE,
        "denied",
        "none",
        "invalid_grant",
    )
    assert (event["attempts"], event["status"]) == (0, None)
    stats = middleware.stats()
    grants = {"hit": 0, "miss": 1, "joined": 0, "refresh": 0, "shared": 0}
    assert stats["caches"]["grants"] == grants
    assert stats["exchanges"]["outcomes"] == {"granted": 1, "denied": 1}
    assert stats["exchanges"]["errors"] == {"invalid_grant": 1}


async def test_a_grant_obtained_as_the_subject_token_expires_is_not_handed_out(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, subject: str, clock: Clock
) -> None:
    async def token_endpoint_that_takes_long(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/token":
            past_the_subject_token(clock)  # while the request is out
        await auth(scope, receive, send)

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=token_endpoint_that_takes_long))
    async with client:
        context, middleware = await held_context(gateway_factory, subject, http_client=client)
        with pytest.raises(ExchangeDenied) as refused:
            await context.exchange(GITHUB)
    expired_refusal(refused.value, GITHUB, subject)
    assert token_requests(auth) == 1
    assert not len(exchanger_of(middleware)._grants)  # nor cached


async def test_access_refuses_an_earlier_grant_once_the_subject_token_expired(
    gateway_factory: GatewayFactory, subject: str, clock: Clock
) -> None:
    context, _ = await held_context(gateway_factory, subject)
    grant = await context.exchange(GITHUB)
    assert context.access(GITHUB) is grant
    past_the_subject_token(clock)
    with pytest.raises(ExchangeDenied) as refused:
        context.access(GITHUB)
    expired_refusal(refused.value, GITHUB, subject)
    with pytest.raises(LookupError):  # still a programming error, expired or not
        context.access(GOOGLE)


async def test_httpx_auth_sends_no_grant_once_the_subject_token_expired(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, subject: str, clock: Clock
) -> None:
    sent: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(200)

    context, _ = await held_context(gateway_factory, subject)
    transport = httpx.MockTransport(upstream)
    async with httpx.AsyncClient(auth=context.auth(GITHUB), transport=transport) as client:
        assert (await client.get(GITHUB + "/user")).status_code == 200
        past_the_subject_token(clock)
        with pytest.raises(ExchangeDenied) as refused:
            await client.get(GITHUB + "/user")
    expired_refusal(refused.value, GITHUB, subject)
    assert len(sent) == 1
    assert token_requests(auth) == 1


async def test_no_refresh_ahead_when_the_subject_token_ends_first(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, subject: str, clock: Clock
) -> None:
    # The grant's 60 s refresh margin starts at 600 s, before the subject token ends (630 s),
    # but a refreshed grant would end with the subject token as well: nothing to gain.
    auth.exchange_expires_in = SUBJECT_LIFETIME + 60
    context, middleware = await held_context(gateway_factory, subject)
    grant = await context.exchange(GITHUB)
    clock.advance(SUBJECT_LIFETIME + 10)
    assert await context.exchange(GITHUB) is grant
    assert not exchanger_of(middleware)._background
    assert token_requests(auth) == 1


# -- a failed refresh ahead of expiry is retried -----------------------------------------------


FAILURE = ScriptedAnswer(503, {"error": "temporarily_unavailable"})


async def test_a_failed_refresh_is_retried_after_a_backoff(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, clock: Clock
) -> None:
    gateway = gateway_factory(exchange_attempts=1)
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 300
    await gateway.exchange(token, GITHUB)
    clock.advance(250)  # inside the 60 s refresh margin
    auth.token_answers.append(FAILURE)
    await gateway.exchange(token, GITHUB)
    await background_done(gateway.middleware)
    assert token_requests(auth) == 2  # the refresh, which failed
    await gateway.exchange(token, GITHUB)  # within the backoff: served, not refreshed
    assert not exchanger_of(gateway.middleware)._background
    clock.advance(1)  # the first backoff is at most 1 s
    await gateway.exchange(token, GITHUB)
    await background_done(gateway.middleware)
    assert token_requests(auth) == 3  # retried, and this time refreshed
    clock.advance(200)  # the new grant (from 251 s) is not in its margin yet
    await gateway.exchange(token, GITHUB)
    assert token_requests(auth) == 3
    assert gateway.middleware.stats()["exchanges"]["outcomes"] == {"granted": 2, "unavailable": 1}


async def test_refresh_retries_back_off_and_a_success_resets_the_backoff(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, clock: Clock
) -> None:
    gateway = gateway_factory(exchange_attempts=1)
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 300

    async def hit(failing: bool = False) -> int:
        """A cache hit; the token requests it made (a refresh, let finish)."""
        before = token_requests(auth)
        if failing:
            auth.token_answers.append(FAILURE)
        assert (await gateway.exchange(token, GITHUB))["grants"]
        await background_done(gateway.middleware)
        auth.token_answers.clear()
        return token_requests(auth) - before

    await hit()
    clock.advance(250)
    assert await hit(failing=True) == 1
    # Retries wait a jittered 1, 2, then 4 s: between half of that and all of it.
    for backoff in (1, 2, 4):
        clock.advance(backoff / 2 - 0.1)
        assert await hit() == 0
        clock.advance(backoff / 2 + 0.1)
        assert await hit(failing=backoff < 4) == 1
    clock.advance(240)  # the grant refreshed at about 257 s is in its own margin
    assert await hit(failing=True) == 1
    clock.advance(1)  # back to a backoff of 1 s, not 8
    assert await hit() == 1
