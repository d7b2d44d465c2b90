"""The shared grant cache under interleavings: three processes (middlewares, each with its own
``RedisGrantCache``) share one real redis-server, each through its own TCP proxy that can reset
its connections, refuse new ones and come back; users with two subject tokens, resources,
scopes, invalidations from any process, grant lifetimes, clock moves and slow answers, in any
order, some at once (exchanges in several processes, exchanges racing an invalidation).

The invariants, checked on every exchange and, for in-process caches, after every step:

* a grant is for its caller: its signed token names the caller's user, resource and scope, and
  it is not about to expire;
* no grant issued before an invalidation of its user is handed out (or kept in-process) after
  that invalidation returned, by any process the invalidation binds. What binds whom:

  - a successful ``invalidate_grants`` binds the calling process at once, exchanges racing it
    there included (see the first test after the machine);
  - it binds every other process once that process hears of it on pub/sub, which must be
    within 0.5 s when its subscription was up (the machine waits for it; past 0.5 s it fails);
  - a process that could not hear it (its proxy down, its subscription not back yet after a
    cut) flushes its in-process grants when its subscription comes back: bound from then on;
  - one that raised ``SharedCacheUnavailable`` binds nobody else (Redis was not told); the
    caller it binds: its in-process grants are dropped, and it reads none of the subject's
    grants from Redis until an invalidation succeeds (see the third test after the machine).

Grants are told apart by their ``jti``; the order the authorization server issued them in is
recorded as its token endpoint answers (``IssuingLog``). "Issued before an invalidation" means:
answered before ``invalidate_grants`` was called.

Whether a process has heard an invalidation, or has resubscribed, is told by a listener
(``Probe``) attached to its cache beside the middleware's in-process cache, through the seam by
which the cache tells in-process caches about other processes: nothing is polled.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import redis.asyncio
import redis.asyncio.connection
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import asgi_delegation.redis as shared_module
from asgi_delegation import (
    DelegationMiddleware,
    ExchangeError,
    Grant,
    SharedCacheUnavailable,
    _clock,
)
from asgi_delegation.redis import RedisGrantCache
from asgi_delegation.testing import LocalAuthorizationServer

from ._redis import RedisServer, redis_server
from .conftest import CLIENT_ID, CLIENT_SECRET, GITHUB, GOOGLE, RESOURCE, exchanger_of

PROCESSES = (0, 1, 2)
# Few users, tokens, resources and scopes: what one exchange caches, a later one asks for again.
USERS = ("alice", "bob")
TOKENS_PER_USER = 2
RESOURCES = (GITHUB, GOOGLE)
SCOPES = (None, "read write", "write read")  # the last two are one scope
LIFETIMES = (30, 300, 3600)
ADVANCES = (1, 10, 31, 100, 4000)
ANSWER_LATENCIES = (0.0, 0.02)
REFRESH_MARGIN = 60.0  # the middleware's default
EXPIRY_SKEW = 5.0  # documented: a grant this close to expiring is no longer handed out
USER_TOKEN_LIFETIME = 10**6  # minted with the real clock; the package clock runs far ahead

REDIS_TIMEOUT = 0.05  # each Redis operation: failures are fast
LEASE_TIMEOUT = 1.0  # the shortest allowed: a lease orphaned by a cut costs at most this
PROPAGATION = 0.5  # documented: other processes drop an invalidated subject's grants by then
RESUBSCRIPTION = 5.0  # generous: a subscription that does not come back by then is a failure
BATCH_DEADLINE = 10.0  # exchanges never fail nor hang because of Redis


def normalized(scope: str | None) -> str | None:
    if scope is None:
        return None
    return " ".join(sorted(set(scope.split()))) or None


# -- a TCP proxy in front of the real redis-server -------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset, as a dead peer or a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Forwards 127.0.0.1:``port`` to the redis-server; ``cut()`` resets every connection,
    ``down()`` also resets every new one as soon as it is accepted, ``up()`` forwards again."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.is_up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    def down(self) -> None:
        self.is_up = False
        self.cut()

    def up(self) -> None:
        self.is_up = True

    async def aclose(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if not self.is_up:
                return
            try:
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                return
            self._writers.add(upstream)
            if not self.is_up or writer.transport.is_closing():  # cut while connecting
                return
            await asyncio.gather(
                self._pipe(reader, upstream, writer), self._pipe(up_reader, writer, upstream)
            )
        finally:
            for one in (writer, upstream):
                if one is not None:
                    self._writers.discard(one)
                    _reset(one)
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:  # one side is gone: so is the other
            writer.transport.abort()
            other.transport.abort()


# -- awaiting changes --------------------------------------------------------------------------


class Signal:
    """Wakes whoever awaits a change of some state: ``until`` re-checks its condition at each
    ``wake()``."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def until(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Whether ``condition()`` held within ``seconds``."""
        with anyio.move_on_after(seconds):
            while not condition():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
            return True
        return False


# -- the authorization server, noting the order it issues grants in --------------------------


class IssuingLog:
    """``auth`` in process; its token endpoint's grants are numbered (by ``jti``) in the order
    they were issued, before the answer reaches the caller ``answer_latency`` seconds later (a
    slow network: an invalidation may land between the issuing and the caching)."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.token_path = urlsplit(auth.token_endpoint).path
        self.order: dict[str, int] = {}
        self.answer_latency = 0.0
        self.changed = Signal()  # woken at each grant issued

    def http_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.token_path:
            await self.auth(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    token = json.loads(b"".join(chunks)).get("access_token")
                    claims = None if token is None else self.auth.verify(token)
                    if claims is not None:
                        self.order[claims["jti"]] = len(self.order)
                        self.changed.wake()
                    if self.answer_latency:
                        await anyio.sleep(self.answer_latency)
            await send(message)

        await self.auth(scope, receive, recording_send)


# -- what a process's cache tells its in-process caches ---------------------------------------


class Probe(Signal):
    """A listener on one process's ``RedisGrantCache``, next to the middleware's in-process
    cache: counts the invalidations it hears of, per user, and its subscription's
    (re)confirmations, which flush every in-process cache."""

    def __init__(self, issuer: str, on_flush: Callable[[], None]) -> None:
        super().__init__()
        self.issuer = issuer
        self.heard: Counter[str] = Counter()
        self.flushes = 0
        self._on_flush = on_flush

    def invalidated(self, matches: Callable[[str], bool]) -> None:
        for user in USERS:
            if matches(user):
                self.heard[user] += 1
        self.wake()

    def flush(self) -> None:
        self.flushes += 1
        self._on_flush()
        self.wake()


# -- the processes ----------------------------------------------------------------------------


@dataclass
class Process:
    n: int
    proxy: Proxy
    cache: RedisGrantCache
    client: httpx.AsyncClient
    middleware: DelegationMiddleware
    probe: Probe
    # Whether its subscription is known to be up: confirmed since the proxy last cut it.
    live: bool = False
    # Invalidations it may have missed, by user: the issuing count when each started. They
    # bind it once its subscription is confirmed again (it flushes then).
    missed: dict[str, int] = field(default_factory=dict)

    def entries_of(self, user: str) -> list[Grant]:
        grants = exchanger_of(self.middleware)._grants
        return [entry.grant for entry in grants._entries.values() if entry.subject == user]


@dataclass(frozen=True)
class Call:
    process: int
    user: str
    token: int  # which of the user's subject tokens
    resource: str
    scope: str | None


@dataclass
class Outcome:
    subject: str | None = None
    grant: Grant | None = None
    error: ExchangeError | None = None
    status: int | None = None


async def exchange_app(scope: Any, receive: Any, send: Any) -> None:
    """Exchanges for ``scope["test.call"]``, into ``scope["test.outcome"]``."""
    ctx = scope["state"]["access_context"]
    call: Call = scope["test.call"]
    outcome: Outcome = scope["test.outcome"]
    outcome.subject = ctx.subject
    try:
        outcome.grant = await ctx.exchange(call.resource, scope=call.scope)
    except ExchangeError as exc:
        outcome.error = exc
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def request(
    middleware: DelegationMiddleware, call: Call, token: str, outcome: Outcome | None = None
) -> Outcome:
    """One request with ``token`` through ``middleware``, exchanging for ``call``."""
    outcome = outcome or Outcome()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/exchange",
        "raw_path": b"/exchange",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "test.call": call,
        "test.outcome": outcome,
    }

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]

    await middleware(scope, receive, send)
    return outcome


CALLS = st.builds(
    Call,
    st.sampled_from(PROCESSES),
    st.sampled_from(USERS),
    st.integers(0, TOKENS_PER_USER - 1),
    st.sampled_from(RESOURCES),
    st.sampled_from(SCOPES),
)
BATCHES = st.lists(CALLS, min_size=2, max_size=6)
YIELDS = st.integers(0, 12)  # how many times a racing task lets the others run before it starts


class RedisInterleavings(RuleBasedStateMachine):
    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        server.cli("FLUSHALL")
        self.runner = asyncio.Runner()
        self.auth = LocalAuthorizationServer(algorithm="ES256")
        self.auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
        self.log = IssuingLog(self.auth)
        self.tokens = {
            user: [
                self.auth.mint(
                    user, audience=RESOURCE, scope="read write", expires_in=USER_TOKEN_LIFETIME
                )
                for _ in range(TOKENS_PER_USER)
            ]
            for user in USERS
        }
        # Per (process, user): grants issued before this count must no longer be handed out.
        self.bound: Counter[tuple[int, str]] = Counter()
        # Per (process, user), after a failed invalidation while its proxy was down: the same,
        # until its proxy is up again.
        self.bound_while_down: dict[tuple[int, str], int] = {}
        self.offset = 0.0
        self.real_now, self.real_monotonic = _clock.now, _clock.monotonic
        _clock.now = lambda: self.real_now() + self.offset
        _clock.monotonic = lambda: self.real_monotonic() + self.offset
        self.processes: list[Process] = []
        key = secrets.token_bytes(32)
        try:
            self.runner.run(self._start(server, key))
        except BaseException:
            self.teardown()
            raise

    async def _start(self, server: RedisServer, key: bytes) -> None:
        for n in PROCESSES:
            proxy = Proxy(server.port)
            await proxy.start()
            cache = RedisGrantCache(
                proxy.url,
                encryption_keys=[key],
                timeout=REDIS_TIMEOUT,
                lease_timeout=LEASE_TIMEOUT,
            )
            client = self.log.http_client()
            middleware = DelegationMiddleware(
                exchange_app,
                issuer=self.auth.issuer,
                resource=RESOURCE,
                http_client=client,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                shared_cache=cache,
            )
            probe = Probe(self.auth.issuer, self._flushed_callback(n))
            cache.attach(probe)
            self.processes.append(Process(n, proxy, cache, client, middleware, probe))
        # Each subscription starts with the cache's first use: an invalidation of nobody (it
        # may time out on a loaded machine: the subscription is started all the same).
        for process in self.processes:
            with suppress(SharedCacheUnavailable):
                await process.middleware.invalidate_grants("nobody")
        for process in self.processes:
            assert await self._subscribed(process), f"process {process.n} did not subscribe"

    @staticmethod
    async def _subscribed(process: Process) -> bool:
        return await process.probe.until(lambda: process.live, RESUBSCRIPTION)

    def _flushed_callback(self, n: int) -> Callable[[], None]:
        def flushed() -> None:
            """Its subscription is confirmed: it dropped every in-process grant, so what it
            missed binds it from now on. (Runs in the cache's listener: must not raise.)"""
            process = self.processes[n]
            process.live = True
            for user, count in process.missed.items():
                key = (n, user)
                self.bound[key] = max(self.bound[key], count)
            process.missed.clear()

        return flushed

    def teardown(self) -> None:
        try:
            self.runner.run(self._close())
        finally:
            self.runner.close()
            _clock.now, _clock.monotonic = self.real_now, self.real_monotonic

    async def _close(self) -> None:
        try:
            # Closed while its subscription is being re-established, a cache may hang on
            # Python 3.11 (see test_closing_while_subscribing_returns): each one is closed
            # with Redis back and its subscription up, its listener then only reading.
            for process in self.processes:
                self._redis_back(process.n)
            for process in self.processes:
                assert await self._subscribed(process), f"process {process.n} did not resubscribe"
            # The flushes just awaited bound what the processes missed: checked once more.
            self.in_process_caches_hold_only_what_they_may()
        finally:
            try:
                with anyio.fail_after(10):
                    for process in self.processes:
                        await process.middleware.aclose()
            finally:
                for process in self.processes:
                    await process.client.aclose()
                    await process.proxy.aclose()

    # -- the model --------------------------------------------------------------------------

    def watermark(self, n: int, user: str) -> int:
        """Grants of ``user`` issued before this count must not come out of process ``n``."""
        return max(self.bound[n, user], self.bound_while_down.get((n, user), 0))

    @staticmethod
    def miss(process: Process, user: str, count: int) -> None:
        process.missed[user] = max(process.missed.get(user, 0), count)

    # -- rules ------------------------------------------------------------------------------

    @rule(call=CALLS)
    def exchange(self, call: Call) -> None:
        self._batch([call])

    @rule(calls=BATCHES)
    def exchange_concurrently(self, calls: list[Call]) -> None:
        self._batch(calls)

    @rule(call=CALLS)
    def exchange_in_every_process(self, call: Call) -> None:
        """The same exchange in every process at once: one asks, the others wait for it."""
        self._batch([replace(call, process=n) for n in PROCESSES])

    @rule(n=st.sampled_from(PROCESSES), user=st.sampled_from(USERS))
    def invalidate(self, n: int, user: str) -> None:
        self.runner.run(self._invalidate(n, user))

    @rule(
        calls=BATCHES,
        delays=st.lists(YIELDS, min_size=6, max_size=6),
        n=st.sampled_from(PROCESSES),
        victim=st.integers(0, 5),
        at=st.one_of(YIELDS, st.just("issued")),
        latency=st.sampled_from(ANSWER_LATENCIES),
    )
    def exchange_racing_an_invalidation(
        self,
        calls: list[Call],
        delays: list[int],
        n: int,
        victim: int,
        at: int | str,
        latency: float,
    ) -> None:
        """Exchanges under way while the user of one of them is invalidated: they may get
        anything the earlier invalidations allow; what they leave behind must not outlive
        this one. The invalidation starts after ``at`` turns of the loop, or once the
        authorization server has issued a grant to one of them, which is still on its way
        for ``latency`` seconds."""
        user = calls[victim % len(calls)].user
        self.log.answer_latency = latency
        issued = len(self.log.order)

        async def invalidation(done: Callable[[], bool]) -> None:
            if at == "issued":
                await self.log.changed.until(
                    lambda: len(self.log.order) > issued or done(), BATCH_DEADLINE
                )
            else:
                for _ in range(int(at)):
                    await asyncio.sleep(0)
            await self._invalidate(n, user, racing=True)

        try:
            self._batch(calls, delays, invalidation)
        finally:
            self.log.answer_latency = 0.0

    @rule(n=st.sampled_from(PROCESSES))
    def cut_connections(self, n: int) -> None:
        """Every connection of that process to Redis is reset; new ones go through."""
        process = self.processes[n]
        process.proxy.cut()
        process.live = False

    @precondition(lambda self: any(p.proxy.is_up for p in self.processes))
    @rule(data=st.data())
    def take_redis_away(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from([p.n for p in self.processes if p.proxy.is_up]))
        process = self.processes[n]
        process.proxy.down()
        process.live = False

    @precondition(lambda self: any(not p.proxy.is_up for p in self.processes))
    @rule(data=st.data())
    def bring_redis_back(self, data: st.DataObject) -> None:
        self._redis_back(
            data.draw(st.sampled_from([p.n for p in self.processes if not p.proxy.is_up]))
        )

    def _redis_back(self, n: int) -> None:
        self.processes[n].proxy.up()
        for user in USERS:  # it can read Redis again, which may still hold the old grants
            self.bound_while_down.pop((n, user), None)

    @rule(n=st.sampled_from(PROCESSES))
    def await_resubscription(self, n: int) -> None:
        """Until the process's subscription is confirmed again, if its proxy is up. (Whether
        it already is changes in the background: no precondition may depend on it.)"""
        process = self.processes[n]
        if not process.proxy.is_up or process.live:
            return
        ok = self.runner.run(self._subscribed(process))
        assert ok, f"process {process.n} did not resubscribe within {RESUBSCRIPTION} s"
        assert not process.missed

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance_clock(self, seconds: float) -> None:
        self.offset += seconds

    @rule()
    def advance_clock_into_the_refresh_margin(self) -> None:
        """Of the grants obtained lately: halfway between the start of the refresh margin and
        the expiry skew, so that the next hit refreshes in the background."""
        lifetime = self.auth.exchange_expires_in
        margin = min(REFRESH_MARGIN, lifetime / 2)
        self.offset += lifetime - (margin + EXPIRY_SKEW) / 2

    @rule(lifetime=st.sampled_from(LIFETIMES))
    def set_grant_lifetime(self, lifetime: float) -> None:
        self.auth.exchange_expires_in = lifetime

    @invariant()
    def in_process_caches_hold_only_what_they_may(self) -> None:
        """No process keeps a grant that the invalidations binding it retired."""
        for process in self.processes:
            for user in USERS:
                floor = self.watermark(process.n, user)
                for grant in process.entries_of(user):
                    assert self._issued(grant) >= floor, (
                        f"process {process.n} keeps a grant of {user} issued before "
                        "an invalidation that binds it"
                    )

    # -- invalidations ----------------------------------------------------------------------

    async def _invalidate(self, n: int, user: str, racing: bool = False) -> None:
        process = self.processes[n]
        count = len(self.log.order)  # grants issued before this must go
        live = {p.n: p.live for p in self.processes}
        flushes = {p.n: p.probe.flushes for p in self.processes}
        heard = {p.n: p.probe.heard[user] for p in self.processes}
        try:
            await process.middleware.invalidate_grants(user)
        except SharedCacheUnavailable:
            event("invalidation failed")
            # Its in-process grants are gone; Redis still holds the old ones, which it cannot
            # read while its own proxy is down; nobody else was told.
            if not process.proxy.is_up:
                self.bound_while_down[n, user] = count
                for grant in process.entries_of(user):
                    assert self._issued(grant) >= count, (
                        "a failed invalidation left the caller's in-process grant"
                    )
            return
        event("invalidation succeeded")
        # Checked before any other task runs, so before anyone hears the announcement.
        flushed = {p.n: p.probe.flushes for p in self.processes}
        if racing:
            # An exchange that started in this process after its grants were dropped, and
            # read Redis before the generation was bumped, put the old grant back (see
            # test_an_exchange_racing_an_invalidation_in_its_process_does_not_outlive_it):
            # it is bound once it hears its own announcement, like the others.
            others = list(self.processes)
        else:  # at once in the calling process
            for grant in process.entries_of(user):
                assert self._issued(grant) >= count, (
                    f"process {n} still holds a grant of {user} issued before the "
                    "invalidation that just returned"
                )
            self.bound[n, user] = max(self.bound[n, user], count)
            others = [p for p in self.processes if p is not process]
        waiting: list[Awaitable[None]] = []
        for other in others:
            m = other.n
            if not other.proxy.is_up:
                self.miss(other, user, count)  # it flushes once it resubscribes
            elif flushed[m] == flushes[m]:
                if live[m]:  # subscribed before the announcement: must hear it
                    waiting.append(self._hears(other, user, heard[m], flushed[m], count, True))
                else:  # its flush, still to come, is after the announcement
                    self.miss(other, user, count)
            else:
                # It resubscribed while the invalidation was under way: it heard the
                # announcement, or flushed after it, which cannot be told from here.
                event("resubscribed during an invalidation")
                waiting.append(self._hears(other, user, heard[m], flushed[m], count, False))
        await asyncio.gather(*waiting)

    async def _hears(
        self, other: Process, user: str, before: int, flushes: int, count: int, must: bool
    ) -> None:
        """Until ``other`` hears of the invalidation of ``user`` (``before`` heard so far), or
        flushes everything (its subscription broke and came back: a flush after the
        announcement, which had seen ``flushes``, binds it too); for at most ``PROPAGATION``
        seconds, which is a failure when ``must``."""
        probe = other.probe
        done = await probe.until(
            lambda: probe.heard[user] > before or probe.flushes > flushes, PROPAGATION
        )
        assert done or not must, (
            f"process {other.n} did not drop {user}'s grants within {PROPAGATION} s"
        )
        if not done:
            return
        for grant in other.entries_of(user):
            assert self._issued(grant) >= count, (
                f"process {other.n} heard of the invalidation of {user} yet kept a grant "
                "issued before it"
            )
        key = (other.n, user)
        self.bound[key] = max(self.bound[key], count)

    # -- exchanges --------------------------------------------------------------------------

    def _batch(
        self,
        calls: list[Call],
        delays: list[int] | None = None,
        also: Callable[[Callable[[], bool]], Awaitable[None]] | None = None,
    ) -> None:
        floors = [self.watermark(call.process, call.user) for call in calls]
        outcomes = [Outcome() for _ in calls]
        start = _clock.now()
        self.runner.run(self._run(calls, outcomes, delays or [0] * len(calls), also))
        for call, outcome, floor in zip(calls, outcomes, floors, strict=True):
            self._check(call, outcome, floor, start)

    async def _run(
        self,
        calls: list[Call],
        outcomes: list[Outcome],
        delays: list[int],
        also: Callable[[Callable[[], bool]], Awaitable[None]] | None,
    ) -> None:
        """The exchanges at once, and ``also(done)`` beside them (``done()``: whether every
        exchange is over)."""
        finished = False

        async def exchanges() -> None:
            nonlocal finished
            jobs = [self._call(*job) for job in zip(calls, outcomes, delays, strict=False)]
            try:
                await asyncio.gather(*jobs)
            finally:
                finished = True
                self.log.changed.wake()

        with anyio.fail_after(BATCH_DEADLINE):
            await asyncio.gather(exchanges(), *([also(lambda: finished)] if also else []))

    async def _call(self, call: Call, outcome: Outcome, delay: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        token = self.tokens[call.user][call.token]
        await request(self.processes[call.process].middleware, call, token, outcome)

    def _issued(self, grant: Grant) -> int:
        claims = self.auth.verify(grant.access_token)
        assert claims is not None, "a grant whose token does not verify"
        issued = self.log.order.get(claims["jti"])
        assert issued is not None, "a grant the authorization server never issued"
        return issued

    def _check(self, call: Call, outcome: Outcome, floor: int, start: float) -> None:
        """What one exchange of a batch that started at ``start`` got: a grant for its caller,
        not retired by an invalidation that binds its process (``floor``), not expiring."""
        assert outcome.status == 200, f"{call} was answered {outcome.status}"
        assert outcome.error is None, f"{call} failed: {outcome.error.error}"
        assert outcome.subject == call.user
        grant = outcome.grant
        assert grant is not None
        claims = self.auth.verify(grant.access_token)
        assert claims is not None, "the grant's token does not verify"
        assert claims["sub"] == call.user, f"{call.user} got {claims['sub']}'s grant"
        assert claims["aud"] == call.resource, f"{call} got a grant for {claims['aud']}"
        assert claims.get("scope") == normalized(call.scope), f"{call} got another scope"
        assert claims["act"] == {"sub": CLIENT_ID}
        assert grant.resource == call.resource
        assert grant.scope == normalized(call.scope)
        # Handed out only while more than the expiry skew is left (give or take the batch).
        assert grant.expires_at is not None
        assert grant.expires_at > start + EXPIRY_SKEW - 1, f"{call} got an expiring grant"
        assert self._issued(grant) >= floor, (
            f"{call} got a grant issued before an invalidation of {call.user} that binds "
            f"process {call.process}"
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as running:
        yield running


def test_random_interleavings_never_leak_a_grant(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broken subscription is retried after 0.2 s, doubling to 2 s: real time, which would
    # make each resubscription cost seconds. The same loop, sooner.
    monkeypatch.setattr(shared_module, "_LISTEN_FIRST", 0.01)
    monkeypatch.setattr(shared_module, "_LISTEN_MAX", 0.05)
    run_state_machine_as_test(
        lambda: RedisInterleavings(server),  # type: ignore[arg-type]  # a factory will do
        settings=settings(
            # About 4 s. Mutants of the library (no generation bump, no flush on resubscribing,
            # no epoch check, announcements ignored, users' keys merged...) fail within it.
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# -- defects found while writing the machine, shown deterministically ------------------------


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Any]:
    """A plain client of the redis-server, for what a test does to it (pauses, kills)."""
    client: Any = redis.asyncio.Redis.from_url(server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()


def same_grant(one: Grant | None, other: Grant) -> bool:
    """Whether ``one`` is ``other`` (compared here, so that no assertion shows a token)."""
    return one is not None and secrets.compare_digest(one.access_token, other.access_token)


async def exchange_once(middleware: DelegationMiddleware, call: Call, token: str) -> Outcome:
    outcome = await request(middleware, call, token)
    assert outcome.grant is not None, "the exchange failed"
    return outcome


async def test_an_exchange_racing_an_invalidation_in_its_process_does_not_outlive_it(
    server: RedisServer, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race, made wide: Redis pauses writes (as for a failover: CLIENT PAUSE WRITE), so the
    # invalidation's INCR waits while reads go on; and the process's subscription is off (it
    # was killed, and is retried only after 15 s), so it does not hear its own announcement.
    monkeypatch.setattr(shared_module, "_LISTEN_FIRST", 30.0)
    auth = LocalAuthorizationServer(algorithm="ES256")
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    log = IssuingLog(auth)
    token = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=3600)
    cache = RedisGrantCache(server.url, encryption_keys=[secrets.token_bytes(32)], timeout=2.0)
    subscribed = asyncio.Event()
    probe = Probe(auth.issuer, subscribed.set)
    cache.attach(probe)
    async with log.http_client() as client:
        middleware = DelegationMiddleware(
            exchange_app,
            issuer=auth.issuer,
            resource=RESOURCE,
            http_client=client,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            shared_cache=cache,
        )
        try:
            call = Call(0, "alice", 0, GITHUB, "read")
            old = (await exchange_once(middleware, call, token)).grant
            assert old is not None
            with anyio.fail_after(5):
                await subscribed.wait()
            if cache.stats()["write"] != 1:
                raise RuntimeError("the grant was not written to Redis")
            await admin.client_kill_filter(_type="pubsub")
            await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            invalidation = asyncio.create_task(middleware.invalidate_grants("alice"))
            await asyncio.sleep(0)  # it dropped alice's grants here, and waits on Redis
            if invalidation.done():
                raise RuntimeError("the invalidation did not wait for Redis")
            racing = await exchange_once(middleware, call, token)
            await admin.execute_command("CLIENT", "UNPAUSE")
            await invalidation  # succeeded: Redis was told
            if probe.heard["alice"] or probe.flushes != 1:
                raise RuntimeError("the process heard its own announcement: no race left")
            after = await exchange_once(middleware, call, token)
            # While its invalidation is on its way, the process does not read the subject's
            # grants from Redis (where the old one still is): the racing exchange asked the
            # authorization server, and nothing issued before the invalidation comes back.
            assert not same_grant(racing.grant, old)
            handed_out_again = same_grant(after.grant, old)
            assert not handed_out_again, (
                "a grant issued before invalidate_grants was handed out after it returned, "
                "in the process that called it"
            )
        finally:
            await middleware.aclose()


async def test_closing_while_subscribing_returns(
    server: RedisServer, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = RedisGrantCache(server.url, encryption_keys=[secrets.token_bytes(32)], timeout=0.25)
    closing: list[asyncio.Task[None]] = []
    started = asyncio.Event()
    write = redis.asyncio.connection.AbstractConnection._send_packed_command

    async def writing(self: Any, command: Any) -> None:
        """Writes, then (the first time SUBSCRIBE is written) starts closing the cache: the
        shutdown lands just as the subscription is sent, as it may when Redis flaps."""
        await write(self, command)
        if not closing and any(b"SUBSCRIBE" in bytes(part) for part in command):
            closing.append(asyncio.ensure_future(cache.aclose()))
            started.set()

    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection, "_send_packed_command", writing
    )
    # Starts the subscription; the closing may break the invalidation's own connection.
    with suppress(SharedCacheUnavailable):
        await cache.invalidate(["https://issuer.example"], "nobody")
    with anyio.fail_after(5):
        await started.wait()
    done, _ = await asyncio.wait(closing, timeout=1)  # never cancels it
    if not done:  # rescue the listener so that nothing is left running
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ == "RedisGrantCache._listen":  # type: ignore[union-attr]
                task.cancel()
        rescued, _ = await asyncio.wait(closing, timeout=5)
        if not rescued:
            raise RuntimeError("the listener went on even after a second cancellation")
    closing[0].result()
    assert done, "RedisGrantCache.aclose() did not return"


@pytest.mark.usefixtures("admin")
async def test_a_failed_invalidation_keeps_the_old_grant_out_of_its_process(
    server: RedisServer,
) -> None:
    auth = LocalAuthorizationServer(algorithm="ES256")
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    token = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=3600)
    proxy = Proxy(server.port)
    await proxy.start()
    cache = RedisGrantCache(proxy.url, encryption_keys=[secrets.token_bytes(32)], timeout=0.5)
    probe = Probe(auth.issuer, lambda: None)
    cache.attach(probe)
    async with IssuingLog(auth).http_client() as client:
        middleware = DelegationMiddleware(
            exchange_app,
            issuer=auth.issuer,
            resource=RESOURCE,
            http_client=client,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            shared_cache=cache,
        )
        try:
            call = Call(0, "alice", 0, GITHUB, "read")
            old = (await exchange_once(middleware, call, token)).grant
            assert old is not None
            if cache.stats()["write"] != 1:
                raise RuntimeError("the grant was not written to Redis")
            if not await probe.until(lambda: probe.flushes == 1, RESUBSCRIPTION):
                raise RuntimeError("the cache did not subscribe")
            proxy.down()
            with pytest.raises(SharedCacheUnavailable):
                await middleware.invalidate_grants("alice")
            proxy.up()  # one failure: the circuit breaker is still closed
            after = await exchange_once(middleware, call, token)
            handed_out_again = same_grant(after.grant, old)
            assert not handed_out_again, (
                "after invalidate_grants raised SharedCacheUnavailable, the calling process "
                "handed out the grant it had dropped"
            )
        finally:
            # Closed once subscribed again (see test_closing_while_subscribing_returns).
            await probe.until(lambda: probe.flushes >= 2, RESUBSCRIPTION)
            await middleware.aclose()
            await proxy.aclose()
