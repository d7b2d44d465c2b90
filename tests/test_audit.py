"""The audit trail: the events on the ``asgi_delegation.audit`` logger (levels and fields), the
``on_audit`` callback (sync, async, failing, slow: the bounded queue), ``stats()``, and the
immutability of events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from hashlib import sha256
from typing import Any

import anyio
import httpx
import pytest
from joserfc.jwk import RSAKey

import asgi_delegation._audit
import asgi_delegation._exchange
from asgi_delegation import (
    AuthenticationEvent,
    DelegationMiddleware,
    ExchangeEvent,
    FetchEvent,
)
from asgi_delegation._audit import AuditEvent
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import (
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    Clock,
    Gateway,
    audit_delivered,
    echo_app,
    exchanger_of,
)

AUDIT = "asgi_delegation.audit"
GatewayFactory = Callable[..., Gateway]


# -- helpers -----------------------------------------------------------------------------------


def kind_of(event: dict[str, Any]) -> str:
    """Which event a ``record.audit`` dict is (the dict does not say: its fields do)."""
    if "cached" in event:
        return "authentication"
    if "attempts" in event:
        return "exchange"
    assert "document" in event, event
    return "fetch"


def audited(caplog: pytest.LogCaptureFixture, kind: str | None = None) -> list[tuple[int, Any]]:
    """(level, event dict) of every record on the audit logger, of one kind if ``kind``."""
    found = []
    for record in caplog.records:
        if record.name != AUDIT:
            continue
        event = record.audit  # type: ignore[attr-defined]
        assert isinstance(event, dict)
        if kind is None or kind_of(event) == kind:
            found.append((record.levelno, event))
    return found


def token_id(token: str) -> str:
    return sha256(token.encode()).hexdigest()[:16]


def without_at(event: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(event["at"], float)
    assert abs(event["at"] - time.time()) < 60
    return {k: v for k, v in event.items() if k != "at"}


def timed(event: dict[str, Any]) -> dict[str, Any]:
    """The exchange or fetch event without its clock readings, which are checked loosely."""
    assert isinstance(event["latency_ms"], float)
    assert event["latency_ms"] > 0
    return {k: v for k, v in without_at(event).items() if k != "latency_ms"}


async def settled() -> None:
    """Until every other task waits (the audit worker included, on its queue or callback)."""
    await anyio.wait_all_tasks_blocked()


async def background_done(gateway: Gateway) -> None:
    tasks = list(exchanger_of(gateway.middleware)._background)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class Gated(httpx.AsyncBaseTransport):
    """A transport that can hold token requests at a gate: ``hold()`` returns the event that
    lets them go; ``arrived`` is set when the first one reaches the gate."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.gate: anyio.Event | None = None
        self.arrived = anyio.Event()

    def hold(self) -> anyio.Event:
        self.gate, self.arrived = anyio.Event(), anyio.Event()
        return self.gate

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token" and self.gate is not None:
            self.arrived.set()
            await self.gate.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def joined_exchanges(gateway: Gateway, transport: Gated, token: str, n: int) -> list[Any]:
    """``n`` identical exchanges at once; the token request waits until all have started."""
    gate = transport.hold()
    documents: list[Any] = []

    async def one() -> None:
        documents.append(await gateway.exchange(token, GITHUB))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for _ in range(n):
                tasks.start_soon(one)
            await transport.arrived.wait()
            await settled()  # every other call is waiting for the first one's request
            gate.set()
    transport.gate = None
    return documents


# -- authentication events ---------------------------------------------------------------------


async def test_acceptances_are_logged_at_debug_the_first_one_too(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory()
    token = auth.mint("alice", audience=RESOURCE, claims={"client_id": "inspector"})
    first_seen = auth.mint("alice", audience=RESOURCE, claims={"client_id": "inspector"})
    caplog.set_level(logging.INFO, logger=AUDIT)
    # A process logging at INFO (an MCP server) writes no line per new caller.
    assert (await gateway.get(first_seen, path="/tools/list")).status_code == 200
    assert audited(caplog, "authentication") == []
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    assert (await gateway.get(token, path="/tools/list")).status_code == 200
    expected = {
        "outcome": "accepted",
        "reason": None,
        "status": 200,
        "subject": "alice",
        "client_id": "inspector",
        "token_id": token_id(token),
        "path": "/tools/list",
        "cached": False,
        "issuer": auth.issuer,
        "verified_by": "jwt",
    }
    ((level, event),) = audited(caplog, "authentication")
    assert (level, without_at(event)) == (logging.DEBUG, expected)
    assert len(token_id(token)) == 16

    caplog.clear()
    assert (await gateway.get(token, path="/tools/call")).status_code == 200
    ((level, event),) = audited(caplog)
    assert level == logging.DEBUG
    assert without_at(event) == {**expected, "path": "/tools/call", "cached": True}


async def test_client_id_from_azp(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory()
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    token = auth.mint("bob", audience=RESOURCE, omit=["client_id"], claims={"azp": "web-app"})
    assert (await gateway.get(token)).status_code == 200
    ((_, event),) = audited(caplog, "authentication")
    assert (event["subject"], event["client_id"]) == ("bob", "web-app")
    no_client = auth.mint("carol", audience=RESOURCE, omit=["client_id"])
    assert (await gateway.get(no_client)).status_code == 200
    assert audited(caplog, "authentication")[1][1]["client_id"] is None


def _other_key() -> RSAKey:
    return RSAKey.generate_key(2048)


# (reason, status): every category the brief of the audit trail names, and its answer.
REJECTIONS: list[tuple[str, int]] = [
    ("missing", 401),
    ("invalid_request", 400),
    ("expired", 401),
    ("bad_signature", 401),
    ("wrong_audience", 401),
    ("wrong_issuer", 401),
    ("insufficient_scope", 403),
    ("keys_unavailable", 503),
]


@pytest.mark.parametrize(("reason", "status"), REJECTIONS, ids=[r for r, _ in REJECTIONS])
async def test_rejections(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    caplog: Any,
    reason: str,
    status: int,
) -> None:
    gateway = gateway_factory(required_scopes=["read"])
    headers: list[tuple[str, str]] = []
    token: str | None = None
    subject = client_id = None
    if reason == "invalid_request":
        first, second = (auth.mint(u, audience=RESOURCE, scope="read") for u in ("a", "b"))
        headers = [("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}")]
    elif reason != "missing":
        token = {
            "expired": lambda: auth.mint("alice", audience=RESOURCE, expires_in=-100),
            "bad_signature": lambda: auth.mint(
                "alice", audience=RESOURCE, scope="read", key=_other_key(),
                header={"kid": auth.kid},
            ),
            "wrong_audience": lambda: auth.mint("alice", audience="https://other.example"),
            "wrong_issuer": lambda: auth.mint(
                "alice", audience=RESOURCE, claims={"iss": "https://evil.example"}
            ),
            "insufficient_scope": lambda: auth.mint("alice", audience=RESOURCE, scope="write"),
            "keys_unavailable": lambda: auth.mint("alice", audience=RESOURCE, scope="read"),
        }[reason]()  # fmt: skip
        headers = [("authorization", f"Bearer {token}")]
    if reason == "insufficient_scope":
        subject, client_id = "alice", "local-client"
    if reason == "keys_unavailable":
        auth.fail_status = 503  # the authorization server is down on a cold start
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    response = await gateway.get(path="/mcp", headers=headers)
    assert response.status_code == status
    ((level, event),) = audited(caplog, "authentication")
    assert level == logging.INFO
    assert without_at(event) == {
        "outcome": "rejected",
        "reason": reason,
        "status": status,
        "subject": subject,
        "client_id": client_id,
        "token_id": None if token is None else token_id(token),
        "path": "/mcp",
        "cached": False,
        # Known once the token is validated: here, only for a lacking scope.
        "issuer": auth.issuer if subject is not None else None,
        "verified_by": "jwt" if subject is not None else None,
    }
    assert gateway.middleware.stats()["requests"] == {"accepted": 0, "rejected": {reason: 1}}


async def test_rejections_are_counted_per_request_even_when_cached(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory(required_scopes=["admin"])
    token = auth.mint("alice", audience=RESOURCE, scope="read")
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    for _ in range(2):
        assert (await gateway.get(token)).status_code == 403
    events = audited(caplog, "authentication")
    assert [(level, e["reason"], e["status"]) for level, e in events] == [
        (logging.INFO, "insufficient_scope", 403)
    ] * 2
    stats = gateway.middleware.stats()
    assert stats["requests"] == {"accepted": 0, "rejected": {"insufficient_scope": 2}}
    assert stats["caches"]["tokens"] == {"hits": 1, "misses": 1}


async def test_cached_flag_on_a_rejection_from_the_cache(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory(required_scopes=["admin"])
    token = auth.mint("alice", audience=RESOURCE, scope="read")
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    for _ in range(2):
        assert (await gateway.get(token)).status_code == 403
    events = audited(caplog, "authentication")
    assert [e["cached"] for _, e in events] == [False, True]


# -- exchange events ---------------------------------------------------------------------------


def exchange_event(**changes: Any) -> dict[str, Any]:
    """An exchange event of alice's token (client_id local-client), without at / latency_ms."""
    event = {
        "subject": "alice",
        "client_id": "local-client",
        "resource": GITHUB,
        "scope": None,
        "outcome": "granted",
        "cache": "miss",
        "status": 200,
        "error": None,
        "attempts": 1,
        "issuer": "http://127.0.0.1",  # LocalAuthorizationServer's in-process issuer
    }
    event.update(changes)
    return event


async def test_miss_then_hit(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory()
    token = auth.mint("alice", audience=RESOURCE)
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.exchange(token, GITHUB, "repo"))["grants"]
    assert audited(caplog, "exchange") == []  # a grant obtained is logged at DEBUG
    assert (await gateway.exchange(token, GITHUB, "repo"))["grants"]
    assert audited(caplog, "exchange") == []  # and so is a hit

    caplog.set_level(logging.DEBUG, logger=AUDIT)
    other = auth.mint("alice", audience=RESOURCE)
    assert (await gateway.exchange(other, GITHUB, "repo"))["grants"]
    ((level, event),) = audited(caplog, "exchange")
    assert level == logging.DEBUG
    assert timed(event) == exchange_event(scope="repo")

    caplog.clear()
    assert (await gateway.exchange(token, GITHUB, "repo"))["grants"]
    ((level, event),) = audited(caplog, "exchange")
    assert level == logging.DEBUG
    assert without_at(event)["latency_ms"] >= 0
    assert {k: v for k, v in without_at(event).items() if k != "latency_ms"} == exchange_event(
        scope="repo", cache="hit", status=None, attempts=0
    )
    assert auth.requests["/token"] == 2


async def test_concurrent_identical_exchanges_join_one(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    async with httpx.AsyncClient(transport=Gated(httpx.ASGITransport(app=auth))) as client:
        transport = client._transport
        assert isinstance(transport, Gated)
        gateway = gateway_factory(http_client=client)
        token = auth.mint("alice", audience=RESOURCE)
        assert (await gateway.get(token)).status_code == 200  # keys fetched, token cached
        caplog.set_level(logging.DEBUG, logger=AUDIT)
        documents = await joined_exchanges(gateway, transport, token, 4)
    assert all(d["grants"] for d in documents)
    assert auth.requests["/token"] == 1
    events = audited(caplog, "exchange")
    assert [level for level, _ in events] == [logging.DEBUG] * 4
    by_cache = sorted((e["cache"] for _, e in events), key=["miss", "joined"].index)
    assert by_cache == ["miss", "joined", "joined", "joined"]
    for _, event in events:
        if event["cache"] == "miss":
            assert timed(event) == exchange_event()
        else:  # they sent nothing themselves
            assert timed(event) == exchange_event(cache="joined", status=None, attempts=0)
    grants = gateway.middleware.stats()["caches"]["grants"]
    assert grants == {"hit": 0, "miss": 1, "joined": 3, "refresh": 0, "shared": 0}


async def test_denied(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GITHUB])
    gateway = gateway_factory()
    token = auth.mint("alice", audience=RESOURCE)
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.exchange(token, SLACK))["error"]["class"] == "ExchangeDenied"
    ((level, event),) = audited(caplog, "exchange")
    assert level == logging.WARNING
    assert timed(event) == exchange_event(
        resource=SLACK, outcome="denied", status=400, error="invalid_target"
    )


async def test_unavailable_after_every_attempt(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    caplog: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi_delegation._exchange, "_BACKOFF_BASE", 0.001)
    gateway = gateway_factory(exchange_attempts=3)
    token = auth.mint("alice", audience=RESOURCE)
    auth.token_answers += [ScriptedAnswer(503, {"error": "temporarily_unavailable"})] * 3
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.exchange(token, GITHUB))["error"]["class"] == "ExchangeUnavailable"
    ((level, event),) = audited(caplog, "exchange")
    assert level == logging.WARNING
    assert timed(event) == exchange_event(
        outcome="unavailable", status=503, error="temporarily_unavailable", attempts=3
    )
    assert auth.requests["/token"] == 3


async def test_not_allowed(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory(allowed_resources=[GITHUB])
    token = auth.mint("alice", audience=RESOURCE)
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.exchange(token, SLACK))["error"]["class"] == "ExchangeNotAllowed"
    ((level, event),) = audited(caplog, "exchange")
    assert level == logging.WARNING
    # Refused before the cache is consulted: "none".
    assert timed(event) == exchange_event(
        resource=SLACK,
        outcome="not_allowed",
        cache="none",
        status=None,
        error="not_allowed",
        attempts=0,
    )
    assert auth.requests["/token"] == 0


async def test_background_refresh(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any, clock: Clock
) -> None:
    gateway = gateway_factory()
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 300
    assert (await gateway.exchange(token, GITHUB))["grants"]
    clock.advance(250)  # inside the 60 s refresh margin
    caplog.set_level(logging.DEBUG, logger=AUDIT)
    assert (await gateway.exchange(token, GITHUB))["grants"]  # a hit, refresh started
    assert exchanger_of(gateway.middleware)._background
    await background_done(gateway)
    hit, (level, event) = audited(caplog, "exchange")
    assert hit[1]["cache"] == "hit"
    assert level == logging.DEBUG
    assert isinstance(event["latency_ms"], float)
    assert event["latency_ms"] > 0
    assert abs(event["at"] - asgi_delegation._clock.now()) < 60
    event = {k: v for k, v in event.items() if k not in ("at", "latency_ms")}
    assert event == exchange_event(cache="refresh")
    assert auth.requests["/token"] == 2
    assert gateway.middleware.stats()["caches"]["grants"] == {
        "hit": 1,
        "miss": 1,
        "joined": 0,
        "refresh": 1,
        "shared": 0,
    }


# -- fetch events ------------------------------------------------------------------------------


async def test_fetches_ok(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory()
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    fetched = [(level, timed(event)) for level, event in audited(caplog, "fetch")]
    assert fetched == [
        (
            logging.INFO,
            {
                "document": "metadata",
                "url": "http://127.0.0.1/.well-known/oauth-authorization-server",
                "outcome": "ok",
                "detail": None,
                "method": "GET",
            },
        ),
        (
            logging.INFO,
            {
                "document": "jwks",
                "url": "http://127.0.0.1/jwks",
                "outcome": "ok",
                "detail": None,
                "method": "GET",
            },
        ),
    ]


async def test_metadata_fetch_failed(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    gateway = gateway_factory()
    auth.fail_status = 503
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 503
    urls = [
        "http://127.0.0.1/.well-known/oauth-authorization-server",
        "http://127.0.0.1/.well-known/openid-configuration",
    ]
    fetched = [(level, timed(event)) for level, event in audited(caplog, "fetch")]
    assert fetched == [
        (
            logging.WARNING,
            {
                "document": "metadata",
                "url": url,
                "outcome": "failed",
                "detail": f"GET {url} answered HTTP 503",
                "method": "GET",
            },
        )
        for url in urls
    ]
    assert gateway.middleware.stats()["fetches"] == {"metadata failed": 2}


async def test_jwks_fetch_failed(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    url = auth.issuer + "/no-such-jwks"
    gateway = gateway_factory(jwks_uri=url)
    caplog.set_level(logging.INFO, logger=AUDIT)
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 503
    fetched = [(level, timed(event)) for level, event in audited(caplog, "fetch")]
    assert fetched == [
        (
            logging.WARNING,
            {
                "document": "jwks",
                "url": url,
                "outcome": "failed",
                "detail": f"GET {url} answered HTTP 404",
                "method": "GET",
            },
        )
    ]
    assert gateway.middleware.stats()["fetches"] == {"jwks failed": 1}


# -- the on_audit callback ---------------------------------------------------------------------


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_callback_receives_every_event(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any, is_async: bool
) -> None:
    received: list[AuditEvent] = []

    def sync_callback(event: AuditEvent) -> None:
        received.append(event)

    async def async_callback(event: AuditEvent) -> None:
        await asyncio.sleep(0)
        received.append(event)

    caplog.set_level(logging.WARNING, logger=AUDIT)  # the logger wants none of these
    gateway = gateway_factory(on_audit=async_callback if is_async else sync_callback)
    token = auth.mint("alice", audience=RESOURCE)
    assert (await gateway.get(token)).status_code == 200
    assert (await gateway.get(token)).status_code == 200
    assert (await gateway.exchange(token, GITHUB))["grants"]
    assert (await gateway.exchange(token, GITHUB))["grants"]
    await audit_delivered(gateway.middleware)
    summary = [
        (type(e).__name__, e.outcome, getattr(e, "cached", None), getattr(e, "cache", None))
        for e in received
    ]
    assert summary == [
        ("FetchEvent", "ok", None, None),
        ("FetchEvent", "ok", None, None),
        ("AuthenticationEvent", "accepted", False, None),
        ("AuthenticationEvent", "accepted", True, None),
        ("AuthenticationEvent", "accepted", True, None),
        ("FetchEvent", "ok", None, None),  # the POST to the token endpoint
        ("ExchangeEvent", "granted", None, "miss"),
        ("AuthenticationEvent", "accepted", True, None),
        ("ExchangeEvent", "granted", None, "hit"),
    ]
    assert audited(caplog) == []
    assert isinstance(received[0], FetchEvent)
    assert isinstance(received[2], AuthenticationEvent)
    assert isinstance(received[6], ExchangeEvent)
    assert received[2].token_id == token_id(token)
    post = received[5]
    assert isinstance(post, FetchEvent)
    assert (post.document, post.method) == ("token", "POST")
    assert gateway.middleware.stats()["audit"] == {
        "delivered": 9,
        "dropped": 0,
        "callback_errors": 0,
    }


async def test_failing_callback_is_isolated(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, caplog: Any
) -> None:
    def explode(event: AuditEvent) -> None:
        raise RuntimeError("the audit sink is down")

    caplog.set_level(logging.ERROR, logger="asgi_delegation")
    gateway = gateway_factory(on_audit=explode)
    token = auth.mint("alice", audience=RESOURCE)
    response = await gateway.get(token)
    assert (response.status_code, response.json()["subject"]) == (200, "alice")
    assert (await gateway.exchange(token, GITHUB))["grants"]
    await audit_delivered(gateway.middleware)
    # metadata, jwks, acceptance; acceptance (cached), token endpoint POST, exchange
    assert gateway.middleware.stats()["audit"] == {
        "delivered": 0,
        "dropped": 0,
        "callback_errors": 6,
    }
    errors = [r for r in caplog.records if r.name == "asgi_delegation"]
    assert [r.getMessage() for r in errors] == [
        "the on_audit callback failed on a FetchEvent",
        "the on_audit callback failed on a FetchEvent",
        "the on_audit callback failed on a AuthenticationEvent",
        "the on_audit callback failed on a AuthenticationEvent",
        "the on_audit callback failed on a FetchEvent",
        "the on_audit callback failed on a ExchangeEvent",
    ]
    assert all(r.levelno == logging.ERROR for r in errors)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in errors)


async def test_slow_callback_never_slows_requests(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi_delegation._audit, "_QUEUE_SIZE", 5)
    release = anyio.Event()
    received: list[AuditEvent] = []

    async def slow(event: AuditEvent) -> None:
        received.append(event)
        await release.wait()

    gateway = gateway_factory(on_audit=slow)
    middleware = gateway.middleware
    token = auth.mint("alice", audience=RESOURCE)
    with anyio.fail_after(10):
        # 3 events (metadata, jwks, acceptance): the callback is stuck on the first, 2 queued.
        assert (await gateway.get(token)).status_code == 200
        await settled()
        assert len(received) == 1
        for _ in range(99):  # one event each: 3 more fit the queue, 96 do not
            assert (await gateway.get(token)).status_code == 200
    assert middleware.stats()["audit"] == {"delivered": 0, "dropped": 96, "callback_errors": 0}

    release.set()
    await settled()
    assert middleware.stats()["audit"] == {"delivered": 6, "dropped": 96, "callback_errors": 0}
    assert len(received) == 6
    assert (await gateway.get(token)).status_code == 200
    await settled()
    assert middleware.stats()["audit"] == {"delivered": 7, "dropped": 96, "callback_errors": 0}

    worker = middleware._auditor._worker
    assert worker is not None
    assert not worker.done()
    await middleware.aclose()
    await asyncio.wait({worker})
    assert worker.cancelled()


def test_callback_keeps_receiving_in_a_later_event_loop(auth: LocalAuthorizationServer) -> None:
    received: list[AuditEvent] = []
    client = auth.http_client()
    middleware = DelegationMiddleware(
        echo_app,
        issuer=auth.issuer,
        resource=RESOURCE,
        http_client=client,
        on_audit=received.append,
    )
    token = auth.mint("alice", audience=RESOURCE)

    async def call() -> None:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as gateway:
            response = await gateway.get("/", headers={"authorization": f"Bearer {token}"})
            assert response.status_code == 200
            await audit_delivered(middleware)

    asyncio.run(call())  # metadata, jwks, acceptance
    assert len(received) == 3
    asyncio.run(call())  # acceptance from the cache
    try:
        assert middleware.stats()["audit"] == {
            "delivered": 4,
            "dropped": 0,
            "callback_errors": 0,
        }
        assert len(received) == 4
    finally:
        asyncio.run(client.aclose())


# -- stats() -----------------------------------------------------------------------------------


async def test_stats_after_a_scripted_sequence(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi_delegation._exchange, "_BACKOFF_BASE", 0.001)
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GITHUB, GOOGLE])
    received: list[AuditEvent] = []

    def collect(event: AuditEvent) -> None:
        if isinstance(event, AuthenticationEvent) and event.reason == "expired":
            raise RuntimeError("this one fails")
        received.append(event)

    async with (
        auth.serve() as issuer,
        httpx.AsyncClient(transport=Gated(httpx.AsyncHTTPTransport())) as client,
    ):
        transport = client._transport
        assert isinstance(transport, Gated)
        gateway = gateway_factory(
            issuer=issuer,
            http_client=client,
            required_scopes=["read"],
            allowed_resources=[GITHUB, GOOGLE, SLACK],
            exchange_attempts=2,
            on_audit=collect,
        )
        alice = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=10_000)
        bob = auth.mint("bob", audience=RESOURCE, scope="read", expires_in=10_000)
        assert (await gateway.get(alice)).status_code == 200  # token miss, two fetches
        assert (await gateway.get(alice)).status_code == 200  # token hit
        assert (await gateway.get()).status_code == 401  # missing
        expired = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=-100)
        assert (await gateway.get(expired)).status_code == 401  # token miss
        narrow = auth.mint("carol", audience=RESOURCE, scope="write")
        assert (await gateway.get(narrow)).status_code == 403  # token miss
        two = [("authorization", f"Bearer {alice}"), ("authorization", f"Bearer {bob}")]
        assert (await gateway.get(headers=two)).status_code == 400

        assert (await gateway.exchange(alice, GITHUB))["grants"]  # miss, 200
        assert (await gateway.exchange(alice, GITHUB))["grants"]  # hit
        denied = await gateway.exchange(alice, SLACK)  # miss, 400 invalid_target
        assert denied["error"]["error"] == "invalid_target"
        refused = await gateway.exchange(alice, "https://elsewhere.example")  # not_allowed
        assert refused["error"]["error"] == "not_allowed"
        auth.token_answers.append(ScriptedAnswer(200, b'{"access_token": "x', drop=True))
        assert (await gateway.exchange(alice, GOOGLE))["grants"]  # network, then 200
        auth.token_answers += [ScriptedAnswer(503, {"error": "temporarily_unavailable"})] * 2
        unavailable = await gateway.exchange(bob, GOOGLE)  # bob: token miss; 503 twice
        assert unavailable["error"]["error"] == "temporarily_unavailable"
        documents = await joined_exchanges(gateway, transport, bob, 3)  # a miss, 2 joined
        assert all(d["grants"] for d in documents)

        clock.advance(250)  # alice's GitHub grant is inside its refresh margin
        assert (await gateway.exchange(alice, GITHUB))["grants"]  # a hit, and a refresh
        await background_done(gateway)
        await audit_delivered(gateway.middleware)
        stats = gateway.middleware.stats()

    latency = stats["exchanges"].pop("latency_ms")
    assert latency["count"] == 6  # the misses and the refresh; not hits, joined or refused
    assert 0 < latency["mean"] <= latency["max"]
    assert stats == {
        "requests": {
            "accepted": 12,
            "rejected": {"missing": 1, "expired": 1, "insufficient_scope": 1, "invalid_request": 1},
        },
        "caches": {
            "tokens": {"hits": 10, "misses": 4},
            "grants": {"hit": 2, "miss": 5, "joined": 2, "refresh": 1, "shared": 0},
        },
        "exchanges": {
            "outcomes": {"granted": 6, "denied": 1, "not_allowed": 1, "unavailable": 1},
            "errors": {"invalid_target": 1, "not_allowed": 1, "temporarily_unavailable": 1},
        },
        "token_endpoint": {"responses": {"200": 4, "400": 1, "network": 1, "503": 2}},
        # every token-endpoint request is a fetch too: 4 answered 200, 4 did not
        "fetches": {"metadata ok": 1, "jwks ok": 1, "token ok": 4, "token failed": 4},
        # 10 fetches, 16 authentications, 11 exchanges; the expired rejection's callback failed
        "audit": {"delivered": 36, "dropped": 0, "callback_errors": 1},
    }
    assert len(received) == 36


async def test_stats_snapshot_is_a_copy(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory()
    token = auth.mint("alice", audience=RESOURCE)
    assert (await gateway.exchange(token, GITHUB))["grants"]
    assert (await gateway.get()).status_code == 401
    before = gateway.middleware.stats()
    snapshot = gateway.middleware.stats()
    assert snapshot == before
    snapshot["requests"]["accepted"] = 1000
    snapshot["requests"]["rejected"]["missing"] = 1000
    snapshot["requests"]["rejected"]["forged"] = 1
    snapshot["caches"]["tokens"]["hits"] = 1000
    snapshot["caches"]["grants"]["hit"] = 1000
    snapshot["exchanges"]["outcomes"]["granted"] = 1000
    snapshot["exchanges"]["errors"]["x"] = 1
    snapshot["exchanges"]["latency_ms"]["count"] = 1000
    snapshot["token_endpoint"]["responses"]["200"] = 1000
    snapshot["fetches"]["jwks ok"] = 1000
    snapshot["audit"]["dropped"] = 1000
    snapshot.clear()
    assert gateway.middleware.stats() == before
    assert before["requests"] == {"accepted": 1, "rejected": {"missing": 1}}


# -- events are immutable ----------------------------------------------------------------------


async def test_events_are_immutable(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    received: list[AuditEvent] = []
    gateway = gateway_factory(on_audit=received.append)
    token = auth.mint("alice", audience=RESOURCE)
    assert (await gateway.exchange(token, GITHUB))["grants"]
    await audit_delivered(gateway.middleware)
    kinds = {type(e): e for e in received}
    assert kinds.keys() == {FetchEvent, AuthenticationEvent, ExchangeEvent}
    for event, field in (
        (kinds[AuthenticationEvent], "subject"),
        (kinds[ExchangeEvent], "outcome"),
        (kinds[FetchEvent], "url"),
    ):
        with pytest.raises(AttributeError):
            setattr(event, field, "forged")
        with pytest.raises(AttributeError):
            event.extra = 1  # type: ignore[union-attr]
        with pytest.raises(TypeError):
            event[0] = 0.0  # type: ignore[index]
        assert isinstance(event, tuple)
    accepted = kinds[AuthenticationEvent]
    assert isinstance(accepted, AuthenticationEvent)
    assert accepted.subject == "alice"
