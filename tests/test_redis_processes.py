"""The shared grant cache across real OS processes: real redis-server (and Redis Cluster), the
local authorization server on a real loopback port in this process, and child processes that
each run a ``DelegationMiddleware`` with a ``RedisGrantCache`` (tests/_redis_worker.py) or are
the workers of a real ``uvicorn --workers 4`` (tests/_redis_app.py).

Tokens are minted here and handed to the children on stdin; the children answer counts,
status codes, claims and short digests of grants, never a token. Every child is killed at the
end of its test, whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_delegation.testing import LocalAuthorizationServer

from ._redis import RedisServer, free_port, redis_cluster, redis_server, require_redis
from .conftest import CLIENT_ID, CLIENT_SECRET, RESOURCE

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the virtualenv's python, which runs these tests
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*")


def _redacted(text: str) -> str:
    """A child's stderr, fit for an assertion message: no token, no client secret."""
    return _JWT.sub("<token>", text).replace(CLIENT_SECRET, "<secret>")


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


class Child:
    """One tests/_redis_worker.py process: commands on stdin, JSON answers on stdout."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [PYTHON, "-m", "tests._redis_worker"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.pid = self.process.pid
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._answers: dict[int, dict[str, Any]] = {}
        self._ids = iter(range(1, 1 << 30))
        self._reader = threading.Thread(target=self._read_all, daemon=True)
        self._reader.start()
        self._write(config)

    def _read_all(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _write(self, document: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(document).encode() + b"\n")
        self.process.stdin.flush()

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"worker {self.pid} did not answer in time") from None
        if line is None:
            self._lines.put(None)
            code = self.process.wait(10)
            raise AssertionError(f"worker {self.pid} exited ({code}):\n{_tail(self.log)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ready(self, timeout: float = 30) -> None:
        answer = self._next(time.monotonic() + timeout)
        assert answer.get("ready") is True

    def send(self, op: str, **arguments: Any) -> int:
        ident = next(self._ids)
        self._write({"op": op, "id": ident, **arguments})
        return ident

    def answer(self, ident: int, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while ident not in self._answers:
            answer = self._next(deadline)
            self._answers[answer.pop("id")] = answer
        answer = self._answers.pop(ident)
        assert "crashed" not in answer, answer
        return answer

    def call(self, op: str, timeout: float = 30, **arguments: Any) -> dict[str, Any]:
        return self.answer(self.send(op, **arguments), timeout)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def stop(self) -> None:
        """Let it close its middleware and connections; kill it if it does not."""
        if self.process.poll() is None:
            try:
                self._write({"op": "exit"})
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()
        self._reader.join(10)


Spawn = Callable[..., list[Child]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(*configs)``: a worker per configuration, started together, returned once all
    are ready (subscribed to Redis). Every worker is stopped, or killed, at teardown."""
    children: list[Child] = []

    def start(*configs: dict[str, Any]) -> list[Child]:
        started = [
            Child(config, tmp_path / f"worker{len(children) + i}.log")
            for i, config in enumerate(configs)
        ]
        children.extend(started)
        for child in started:
            child.ready()
        return started

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def served(auth: LocalAuthorizationServer) -> Iterator[LocalAuthorizationServer]:
    """The authorization server on a real loopback port, in a thread of this process."""
    require_redis()
    with auth.running():
        yield auth


def _config(auth: LocalAuthorizationServer, redis: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "issuer": auth.issuer,
        "resource": RESOURCE,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "key": _key(),
        "redis": redis,
        **extra,
    }


def _token_calls(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


def _exchanges_of(auth: LocalAuthorizationServer, token: str) -> int:
    """How many token exchanges ``auth`` was asked for with ``token`` as the subject."""
    return sum(1 for form in auth.exchanges if form.get("subject_token") == token)


def _all_granted(result: dict[str, Any], n: int, subject: str) -> None:
    assert result["statuses"] == {"200": n}
    assert result["errors"] == {}
    assert result["subs"] == {subject: n}
    assert result["auds"] == {RESOURCE: n}
    assert len(result["grants"]) == 1


def _burst_together(children: list[Child], token: str, n: int) -> list[dict[str, Any]]:
    """Every child fires ``n`` requests at once; the "go" reaches them all within
    microseconds, since each is already connected, subscribed and waiting on its stdin."""
    idents = [child.send("burst", token=token, n=n) for child in children]
    return [child.answer(ident) for child, ident in zip(children, idents, strict=True)]


def _poll(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
    return value


def _keys(server: RedisServer, pattern: str) -> list[str]:
    return server.cli("--scan", "--pattern", pattern).split()


# 1. One exchange for a burst from four processes; a restarted process asks nobody.


def test_four_processes_bursting_make_one_exchange_and_a_restart_makes_none(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    with redis_server(tmp_path / "redis") as server:
        config = _config(served, {"url": server.url})
        token = served.mint("alice", audience=RESOURCE, scope="read")
        children = spawn(*[config] * 4)
        for child in children:  # fetches the issuer's metadata and keys: no exchange
            assert child.call("warm", token=token) == {"status": 200}
        assert _token_calls(served) == 0
        served.token_latency = 0.5  # the first exchange is still out when the others ask

        results = _burst_together(children, token, 100)

        assert _token_calls(served) == 1
        for result in results:
            _all_granted(result, 100, "alice")
        assert len({grant for result in results for grant in result["grants"]}) == 1
        stats = [child.stats() for child in children]
        for one in stats:
            # One request of each process went past its in-process cache; 99 joined it.
            assert one["grants"]["miss"] + one["grants"]["shared"] == 1
            assert one["grants"]["joined"] + one["grants"]["hit"] == 99
        assert sum(one["grants"]["miss"] for one in stats) == 1  # asked the AS
        assert sum(one["shared"]["write"] for one in stats) == 1
        # The three others found the lease taken (they overlapped) and waited for its grant.
        assert sum(one["shared"]["waited"] for one in stats) == 3
        assert sum(one["shared"]["hit"] for one in stats) == 3
        for child in children:
            child.stop()

        (restarted,) = spawn(config)
        result = restarted.call("burst", token=token, n=1)

        _all_granted(result, 1, "alice")
        assert result["grants"] == results[0]["grants"]
        assert _token_calls(served) == 1
        stats_after = restarted.stats()
        assert stats_after["grants"]["shared"] == 1
        assert stats_after["shared"]["hit"] == 1
        restarted.stop()


# 2. uvicorn --workers 4: one exchange for a burst over many connections.


def test_uvicorn_workers_share_one_exchange(
    tmp_path: Path, served: LocalAuthorizationServer
) -> None:
    with redis_server(tmp_path / "redis") as server:
        token = served.mint("alice", audience=RESOURCE, scope="read")
        env = {
            **os.environ,
            "REDIS_TEST_ISSUER": served.issuer,
            "REDIS_TEST_RESOURCE": RESOURCE,
            "REDIS_TEST_CLIENT_ID": CLIENT_ID,
            "REDIS_TEST_CLIENT_SECRET": CLIENT_SECRET,
            "REDIS_TEST_REDIS_URL": server.url,
            "REDIS_TEST_KEY": _key(),
        }
        log = tmp_path / "uvicorn.log"
        port = free_port()
        with log.open("wb") as stderr:
            uvicorn = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed arguments
                [
                    PYTHON, "-m", "uvicorn", "tests._redis_app:app",
                    "--workers", "4",
                    "--host", "127.0.0.1",
                    "--port", str(port),
                    "--log-level", "warning",
                    "--no-access-log",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its workers are ended with it, as a group
            )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            pids = anyio.run(_all_workers_up, base, uvicorn, 4)
            assert len(pids) == 4, _tail(log)
            served.token_latency = 0.5  # the first exchange is still out when the others ask
            documents = anyio.run(_burst_over_connections, base, token, 200)
        finally:
            _end_group(uvicorn)
        assert uvicorn.returncode == 0, _tail(log)

        assert Counter(d["status"] for d in documents) == {200: 200}
        assert Counter(d.get("sub") for d in documents) == {"alice": 200}
        assert Counter(d.get("aud") for d in documents) == {RESOURCE: 200}
        assert len({d["grant"] for d in documents}) == 1
        assert _token_calls(served) == 1
        answered = {d["pid"] for d in documents}
        assert answered <= pids
        assert len(answered) >= 2, "one worker took the whole burst"


def _tail(log: Path) -> str:
    return _redacted(log.read_text(errors="replace"))[-3000:]


async def _all_workers_up(base: str, uvicorn: subprocess.Popen[bytes], workers: int) -> set[int]:
    """The workers' pids, once each has answered. uvicorn has no readiness signal to await
    (and the port accepts connections before any worker can answer): /health is polled, on
    new connections so that every worker gets its turn, until each one has answered or the
    deadline passes."""
    seen: set[int] = set()
    with anyio.fail_after(30):
        while len(seen) < workers:
            if uvicorn.poll() is not None:
                return seen  # it exited: the caller shows its log
            async with httpx.AsyncClient(base_url=base) as client:
                try:
                    async with anyio.create_task_group() as group:
                        for _ in range(workers * 2):
                            group.start_soon(_health, client, seen)
                except* httpx.TransportError:
                    await anyio.sleep(0.05)
    return seen


async def _health(client: httpx.AsyncClient, seen: set[int]) -> None:
    response = await client.get("/health", headers={"connection": "close"})
    if response.status_code == 200:
        seen.add(response.json()["pid"])


async def _burst_over_connections(base: str, token: str, n: int) -> list[dict[str, Any]]:
    """``n`` requests at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"authorization": f"Bearer {token}"}
    documents: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one() -> None:
            response = await client.get("/exchange", params={"resource": RESOURCE}, headers=headers)
            documents.append({"status": response.status_code, **response.json()})

        async with anyio.create_task_group() as group:
            for _ in range(n):
                group.start_soon(one)
    return documents


def _end_group(process: subprocess.Popen[bytes]) -> None:
    """Stop uvicorn and its workers (SIGTERM: a graceful shutdown); kill the group if that
    takes too long."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # any worker left behind
    process.wait(10)


# 3. The lease holder dies mid-exchange: the others wait out its lease, not the default 12 s.


def test_a_killed_lease_holder_delays_the_others_by_its_lease_only(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    lease_timeout = 2.0
    with redis_server(tmp_path / "redis") as server:
        config = _config(served, {"url": server.url}, lease_timeout=lease_timeout)
        token = served.mint("alice", audience=RESOURCE, scope="read")
        holder, waiter = spawn(config, config)
        for child in (holder, waiter):
            assert child.call("warm", token=token) == {"status": 200}
        served.token_latency = 5  # the holder's exchange outlasts its lease

        holder.send("burst", token=token, n=1)
        # Nothing tells this process when the holder has taken its lease: Redis is polled.
        (lease,) = _poll(lambda: _keys(server, "*:l:*"), 10, "the lease")
        seen_at = time.monotonic()
        holder_token = server.cli("get", lease).strip()
        assert holder_token
        assert 0 < int(server.cli("pttl", lease)) <= lease_timeout * 1000
        ident = waiter.send("burst", token=token, n=1)
        # Polled: the waiter's counters are the only sign that it found the lease taken.
        _poll(lambda: waiter.stats()["shared"]["waited"] == 1, 5, "the waiter to wait")
        holder.kill()
        served.token_latency = 0

        # The dead holder's lease expires by itself (the waiter may take the key over then).
        _poll(lambda: server.cli("get", lease).strip() != holder_token, 5, "the lease to expire")
        assert time.monotonic() - seen_at < lease_timeout + 0.5
        result = waiter.answer(ident)

        _all_granted(result, 1, "alice")
        assert 0.5 < result["elapsed"] < lease_timeout + 1.5  # far below the default 12 s
        assert _token_calls(served) == 2  # the dead holder's, and the waiter's own
        stats = waiter.stats()["shared"]
        assert stats["write"] == 1
        assert _keys(server, "*:l:*") == []  # the waiter released its own lease
        waiter.stop()


# 4. Redis stops and starts again under a steady load.


def _stream(child: Child, served: LocalAuthorizationServer, users: int) -> None:
    """``child`` asks for alice's (cached) grant every 10 ms and, every fifth request, for a
    user it has never seen (an exchange): 20 a second."""
    cached = ["alice", served.mint("alice", audience=RESOURCE, scope="read")]
    fresh = [[f"user{i}", served.mint(f"user{i}", audience=RESOURCE)] for i in range(users)]
    _all_granted(child.call("burst", token=cached[1], n=1), 1, "alice")
    child.call("stream_start", cached=cached, fresh=fresh, interval=0.01, fresh_every=5)
    # Polled here and below: the child's counters are the only sign of its progress.
    _poll(lambda: child.stats()["shared"]["write"] >= 5, 10, "grants written to Redis")


def _outage(server: RedisServer, child: Child, exchanges: int) -> tuple[float, float]:
    """Stop Redis until ``child`` has opened its breaker and made ``exchanges`` exchanges
    without Redis; start it again, empty, on the same port. The times it stopped and was
    back."""
    stopped_at = time.time()
    server.stop()
    misses = child.stats()["grants"]["miss"]
    _poll(lambda: child.stats()["shared"]["breaker"]["open"], 10, "the breaker to open")
    _poll(lambda: child.stats()["grants"]["miss"] >= misses + exchanges, 10, "exchanges without it")
    server.start()  # returns once the server accepts connections
    return stopped_at, time.time()


def test_redis_stopped_and_restarted_under_load_fails_no_request(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    with redis_server(tmp_path / "redis") as server:
        config = _config(served, {"url": server.url})
        (child,) = spawn(config)
        _stream(child, served, 400)
        stopped_at, restarted_at = _outage(server, child, 20)
        writes = child.stats()["shared"]["write"]

        # Once Redis is back after an outage of D seconds, the process that stayed up writes
        # to it again within D + 2 s: its resubscription closes the breaker, and its probes
        # alone (after 1 s, then doubling: opened at t, probes at t+1, t+3, t+7...) would come
        # within D + 1 s. What failed while Redis was away (the subscription's reconnections,
        # calls in flight when the breaker opened) once pushed the probes out to 30 s.
        _poll(
            lambda: child.stats()["shared"]["write"] > writes,
            restarted_at - stopped_at + 2,
            "grants written to Redis again",
            0.05,
        )

        # Processes started after the restart share grants through it again.
        first, second = spawn(config, config)
        bob = served.mint("bob", audience=RESOURCE, scope="read")
        _all_granted(first.call("burst", token=bob, n=1), 1, "bob")
        _all_granted(second.call("burst", token=bob, n=1), 1, "bob")
        assert _exchanges_of(served, bob) == 1  # (the stream's exchanges go on meanwhile)
        assert second.stats()["shared"]["hit"] == 1
        records = child.call("stream_stop")["records"]

        assert [r for r in records if not r["ok"]] == []  # not one failed, before, during, after
        during = [r for r in records if stopped_at <= r["t"] < restarted_at]
        assert len([r for r in during if r["kind"] == "fresh"]) >= 15  # exchanges went on
        assert len([r for r in during if r["kind"] == "cached"]) >= 10
        assert len([r for r in records if r["t"] >= restarted_at]) >= 10
        breaker = child.stats()["shared"]["breaker"]
        assert breaker["opened"] >= 1
        assert breaker["connection"] >= 3
        for one in (child, first, second):
            one.stop()


# 5. A Redis Cluster: the same single flight, and invalidations reach every process.


def test_a_redis_cluster_gives_one_exchange_and_spreads_invalidations(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    with redis_cluster(tmp_path / "cluster") as nodes:
        config = _config(served, {"cluster": ["127.0.0.1", nodes[0].port]})
        token = served.mint("alice", audience=RESOURCE, scope="read")
        children = spawn(*[config] * 3)
        for child in children:
            assert child.call("warm", token=token) == {"status": 200}
        served.token_latency = 0.5

        results = _burst_together(children, token, 50)

        assert _token_calls(served) == 1
        for result in results:
            _all_granted(result, 50, "alice")
        assert len({grant for result in results for grant in result["grants"]}) == 1
        stats = [child.stats()["shared"] for child in children]
        assert sum(one["write"] for one in stats) == 1
        assert sum(one["waited"] for one in stats) == 2
        # Every key of one subject carries the same hash tag, so they share a cluster slot.
        found = [key for node in nodes for key in _keys(node, "*")]
        assert len({key.split("}")[0] for key in found}) == 1, found

        served.token_latency = 0
        first, second, third = children
        watching = [other.send("watch", subject="alice", within=5) for other in (second, third)]
        invalidated = first.call("invalidate", subject="alice")
        assert invalidated["ok"] is True
        assert invalidated["local"] == 0
        for other, ident in zip((second, third), watching, strict=True):
            gone_at = other.answer(ident)["gone_at"]
            assert gone_at is not None
            assert gone_at - invalidated["started"] < 0.5

        _all_granted(second.call("burst", token=token, n=1), 1, "alice")
        assert _token_calls(served) == 2  # asked again: the old grant is retired everywhere
        _all_granted(third.call("burst", token=token, n=1), 1, "alice")
        assert _token_calls(served) == 2  # and the new one is shared
        for child in children:
            child.stop()


# 6. An invalidation in one process empties the others' in-process caches within 0.5 s.


def test_an_invalidation_reaches_another_process_within_half_a_second(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    with redis_server(tmp_path / "redis") as server:
        config = _config(served, {"url": server.url})
        a, b = spawn(config, config)
        alice = served.mint("alice", audience=RESOURCE, scope="read")
        bob = served.mint("bob", audience=RESOURCE, scope="read")
        for child in (a, b):
            for token, user in ((alice, "alice"), (bob, "bob")):
                _all_granted(child.call("burst", token=token, n=1), 1, user)
        assert _token_calls(served) == 2  # one per user: the second process found them
        for child in (a, b):
            assert child.call("local", subject="alice") == {"entries": 1}

        ident = b.send("watch", subject="alice", within=5)
        invalidated = a.call("invalidate", subject="alice")
        gone = b.answer(ident)

        assert invalidated == {"ok": True, "started": invalidated["started"], "local": 0}
        assert gone["gone_at"] is not None
        assert 0 <= gone["gone_at"] - invalidated["started"] < 0.5
        assert b.call("local", subject="bob") == {"entries": 1}  # only alice's went
        _all_granted(b.call("burst", token=alice, n=1), 1, "alice")
        assert _token_calls(served) == 3  # B asked the authorization server again
        _all_granted(b.call("burst", token=bob, n=1), 1, "bob")
        _all_granted(a.call("burst", token=alice, n=1), 1, "alice")
        assert _token_calls(served) == 3  # bob's grant stayed; A took B's new grant
        for child in (a, b):
            child.stop()


# 7. A process that missed just before the holder stored its grant must not exchange again.


def test_a_process_slow_after_its_lookup_takes_the_stored_grant(
    tmp_path: Path, served: LocalAuthorizationServer, spawn: Spawn
) -> None:
    with redis_server(tmp_path / "redis") as server:
        config = _config(served, {"url": server.url})
        token = served.mint("alice", audience=RESOURCE, scope="read")
        holder, slow = spawn(config, {**config, "stall_after_lookup": 1.0})
        for child in (holder, slow):
            assert child.call("warm", token=token) == {"status": 200}
        served.token_latency = 0.3

        # The slow process looks up (a miss: the holder's exchange is under way) and is then
        # busy for 1 s; meanwhile the holder stores the grant and releases its lease.
        results = _burst_together([holder, slow], token, 1)

        for result in results:
            _all_granted(result, 1, "alice")
        assert _keys(server, "*:l:*") == []
        assert _token_calls(served) == 1
        assert results[0]["grants"] == results[1]["grants"]
        for child in (holder, slow):
            child.stop()
