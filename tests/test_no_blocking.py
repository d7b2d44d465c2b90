"""Nothing that can block runs on the event loop: the client assertion file is read in a worker
thread (a FIFO whose writer is slow, a stalled network file system), and so is a sync
``on_audit`` callback, behind the bounded queue, in order, many events per thread hop.

Each test holds the slow part on a ``threading.Event`` and shows that other requests are
answered meanwhile. The events are waited for with a timeout only so that, were the loop
blocked, the test would fail instead of hanging."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from joserfc.jwk import ECKey

import asgi_delegation._audit
from asgi_delegation._audit import AuditEvent
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import GITHUB, Gateway, audit_delivered
from .test_client_auth import assertion

GatewayFactory = Callable[..., Gateway]
WORKLOAD = "workload"
SAFETY = 10  # seconds: only so that a blocked loop fails the test rather than hanging it
DEADLINE = 2 * SAFETY  # for the test itself: a thread that gave up waiting is reported first


# -- the client assertion file -----------------------------------------------------------------


class SlowWriter:
    """Writes ``text`` into the FIFO at ``path`` from a thread of its own, but only once
    ``release`` is set: ``reading`` is set when a reader has opened the FIFO."""

    def __init__(self, path: Path, text: str) -> None:
        os.mkfifo(path)
        self.path, self.text = path, text
        self.reading, self.release = threading.Event(), threading.Event()
        self.released: bool | None = None  # False: it gave up waiting (the loop was blocked)
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        with self.path.open("w") as fifo:  # returns once a reader has opened the FIFO
            self.reading.set()
            self.released = self.release.wait(SAFETY)
            fifo.write(self.text)

    async def wait_for_a_reader(self) -> None:
        assert await anyio.to_thread.run_sync(self.reading.wait, SAFETY)

    def finish(self) -> None:
        self.release.set()
        self.thread.join(SAFETY)


@pytest.fixture
def workload_key(auth: LocalAuthorizationServer) -> ECKey:
    key = ECKey.generate_key("P-256")
    auth.register_client(WORKLOAD, public_key=ECKey.import_key(key.as_dict(private=False)))
    return key


@pytest.fixture
def writer(
    auth: LocalAuthorizationServer, workload_key: ECKey, tmp_path: Path
) -> Iterator[SlowWriter]:
    writer = SlowWriter(tmp_path / "token", assertion(auth, workload_key, WORKLOAD))
    yield writer
    writer.finish()


async def test_other_requests_are_answered_while_the_assertion_file_is_slow(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, writer: SlowWriter, token: str
) -> None:
    gateway = gateway_factory(client_id=WORKLOAD, client_assertion_file=writer.path)
    documents: list[Any] = []

    async def exchange() -> None:
        documents.append(await gateway.exchange(token, GITHUB))

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(exchange)
            await writer.wait_for_a_reader()
            # The exchange is reading the FIFO, whose writer is held: other requests go on.
            for _ in range(3):
                assert (await gateway.get(token)).status_code == 200
            assert documents == []
            writer.finish()
    assert writer.released, "the writer gave up waiting: the event loop was blocked"
    (document,) = documents
    assert document["grants"][0]["sub"] == "alice"
    assert auth.exchanges[-1]["client_assertion"] == writer.text


async def test_an_assertion_file_that_never_comes_is_given_up_on(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, writer: SlowWriter, token: str
) -> None:
    gateway = gateway_factory(
        client_id=WORKLOAD, client_assertion_file=writer.path, exchange_timeout=0.5
    )
    with anyio.fail_after(DEADLINE):
        document = await gateway.exchange(token, GITHUB)
        assert (await gateway.get(token)).status_code == 200
    assert not writer.release.is_set()  # still held: nothing was read
    error = document["error"]
    assert (error["class"], error["error"]) == ("ExchangeUnavailable", "temporarily_unavailable")
    assert error["description"] == "the client credentials were not ready within 0.5 s"
    assert auth.requests["/token"] == 0


# -- a sync on_audit callback ------------------------------------------------------------------


class BlockingCallback:
    """A sync ``on_audit`` callback that blocks on its first event until ``release`` is set."""

    def __init__(self) -> None:
        self.received: list[AuditEvent] = []
        self.threads: set[int] = set()
        self.entered, self.release = threading.Event(), threading.Event()
        self.returned = 0
        self.released: bool | None = None

    def __call__(self, event: AuditEvent) -> None:
        self.received.append(event)
        self.threads.add(threading.get_ident())
        if len(self.received) == 1:
            self.entered.set()
            self.released = self.release.wait(SAFETY)
        self.returned += 1

    async def wait_until_blocked(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, SAFETY)


def summary(events: list[AuditEvent]) -> list[tuple[str, str, bool | None]]:
    return [(type(e).__name__, e.outcome, getattr(e, "cached", None)) for e in events]


async def test_a_blocked_sync_callback_does_not_block_requests(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    callback = BlockingCallback()
    gateway = gateway_factory(on_audit=callback)
    auditor = gateway.middleware._auditor
    hops: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(func, "__self__", None) is auditor:
            hops.append(func)
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    with anyio.fail_after(DEADLINE):
        # metadata, jwks, acceptance: the callback is stuck on the first one
        assert (await gateway.get(token)).status_code == 200
        await callback.wait_until_blocked()
        for _ in range(20):
            assert (await gateway.get(token)).status_code == 200
        assert (len(callback.received), callback.returned) == (1, 0)  # still blocked
        callback.release.set()
        await audit_delivered(gateway.middleware)
    assert callback.released, "the callback gave up waiting: the event loop was blocked"
    first = [("FetchEvent", "ok", None)] * 2 + [("AuthenticationEvent", "accepted", False)]
    assert summary(callback.received) == first + [("AuthenticationEvent", "accepted", True)] * 20
    assert threading.get_ident() not in callback.threads
    assert len(hops) == 1  # one thread hop took them all, the 22 queued meanwhile included
    assert gateway.middleware.stats()["audit"] == {
        "delivered": 23,
        "dropped": 0,
        "callback_errors": 0,
    }


async def test_a_blocked_sync_callback_drops_what_does_not_fit_in_the_queue(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi_delegation._audit, "_QUEUE_SIZE", 5)
    callback = BlockingCallback()
    gateway = gateway_factory(on_audit=callback)
    with anyio.fail_after(DEADLINE):
        assert (await gateway.get(token)).status_code == 200  # 1 in the callback, 2 queued
        await callback.wait_until_blocked()
        for _ in range(10):  # 3 more fit, 7 do not
            assert (await gateway.get(token)).status_code == 200
        assert gateway.middleware.stats()["audit"]["dropped"] == 7
        callback.release.set()
        await audit_delivered(gateway.middleware)
    assert callback.released
    assert len(callback.received) == 6
    assert gateway.middleware.stats()["audit"] == {
        "delivered": 6,
        "dropped": 7,
        "callback_errors": 0,
    }


async def test_an_async_callback_runs_on_the_loop_and_a_returned_awaitable_is_awaited(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, token: str
) -> None:
    on_loop: list[tuple[str, int]] = []

    async def record(kind: str, event: AuditEvent) -> None:
        await anyio.lowlevel.checkpoint()  # a real awaitable, awaited on the loop
        on_loop.append((kind, threading.get_ident()))

    async def async_callback(event: AuditEvent) -> None:
        await record("async", event)

    def returns_an_awaitable(event: AuditEvent) -> Any:
        return record("sync", event)

    for callback in (async_callback, returns_an_awaitable):
        gateway = gateway_factory(on_audit=callback)
        assert (await gateway.get(token)).status_code == 200
        await audit_delivered(gateway.middleware)
        assert gateway.middleware.stats()["audit"]["delivered"] == 3
    loop_thread = threading.get_ident()
    assert on_loop == [("async", loop_thread)] * 3 + [("sync", loop_thread)] * 3


# -- the exchange policy -----------------------------------------------------------------------


async def test_a_blocking_sync_policy_does_not_block_requests(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, token: str
) -> None:
    entered, release = threading.Event(), threading.Event()
    threads: list[int] = []

    def policy(ctx: Any, resource: str, scope: str | None) -> bool:
        threads.append(threading.get_ident())
        entered.set()
        return release.wait(SAFETY)  # a database lookup that takes its time

    gateway = gateway_factory(policy=policy)
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tasks:
            answers: list[Any] = []

            async def exchange() -> None:
                answers.append(await gateway.exchange(token, GITHUB))

            tasks.start_soon(exchange)
            assert await anyio.to_thread.run_sync(entered.wait, SAFETY)
            for _ in range(5):  # answered while the policy is still deciding
                assert (await gateway.get(token)).status_code == 200
            assert answers == []
            release.set()
    assert answers[0]["grants"], answers
    assert threading.get_ident() not in threads
