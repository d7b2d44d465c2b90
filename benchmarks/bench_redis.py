"""Shared grant cache (``RedisGrantCache``) benchmarks of DelegationMiddleware, side by side in
one run, against a redis-server this script starts on a free loopback port.

1. Token-endpoint calls per 1,000 requests across 4 worker OS processes, each with its own
   middleware: 50 users x 2 upstream resources (100 distinct pairs), each pair asked 10 times,
   the 1,000 requests shuffled and dealt to the processes, each process running its share 25 at
   a time; the token endpoint (``LocalAuthorizationServer.serve()`` on a loopback port, in this
   process) waits 20 ms per request. In-process caches only, against the same with one shared
   ``RedisGrantCache``. Goal: one token-endpoint call per distinct pair with the shared cache,
   against up to 4 per pair (one per process) without. Also how many calls the plan predicts
   without sharing: the (process, pair) combinations it holds.
2. A Redis hit against an in-process hit: ``await ctx.exchange(R)`` with the grant (a) in the
   in-process cache, (b) only in Redis (the in-process cache flushed before each call), and the
   same as requests through the middleware beside (c) the bare app. Goal: (b) - (a) at most one
   loopback round trip (about 100 µs); the round trip measured beside it (``PING`` through
   redis-py asyncio), and the MGET a lookup makes.
3. Redis down, the breaker open: a request whose exchange misses the in-process cache (flushed
   before each call) with ``shared_cache`` pointing to the stopped redis-server, against the
   same request with no shared cache; the authorization server reached in process
   (``auth.http_client()``), and again with the token endpoint replaced by an instant scripted
   answer (so the difference is not lost in the exchange's own noise). Goal: under 5 µs added.
   A control pair, two middlewares without a shared cache timed the same way, shows what the
   method reads when nothing differs. Also a request whose grant is cached in process (should
   be about 0 added).

Measured the way users run it: the garbage collector is ON while timing. Sections 2 and 3 time
each call on its own (``perf_counter_ns`` around the ``await``, whatever is prepared before it
outside the timing), in batches interleaved round by round in an order that rotates (section
3's pairs alternate call by call within a batch); figures are the median and 90th percentile
of every call of every round, each "added" figure the difference of the medians, and "per
round" the median and range of the rounds' differences. Section 1's figures are the median over
trials, the two modes taking turns on the same shuffled plan.
The authorization server signs with ES256 (its signing is the bulk of an exchange's cost, and
a smaller baseline lets a few µs stand out of the noise).

Checked: every request is answered 200 with a grant the authorization server verifies as its
user's, for its resource; section 1's grants are as many as the token-endpoint calls; section
2's timed in-process hits made no Redis lookup and its timed Redis hits were all served from
Redis; no timed call reached the token endpoint unless it had to (then exactly once); section
3's breaker stayed open. Figures that miss their goal are reported, not treated as errors.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_redis            # ~50-65 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_redis --quick    # ~13 s
    .venv/bin/python -m benchmarks.bench_redis --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import httpx
import redis
import redis.asyncio as aioredis

from asgi_delegation import AccessContext, DelegationMiddleware, Grant
from asgi_delegation._exchange import ACCESS_TOKEN_TYPE
from asgi_delegation._token_response import grant_from
from asgi_delegation._types import ASGIApp, Receive, Scope, Send
from asgi_delegation.redis import RedisGrantCache
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import RESOURCE, bare_app, discard, headers_for, http_scope, summary, verdict

UPSTREAMS = ("https://api.github.example/v1", "https://api.slack.example/v1")
CLIENT_ID, CLIENT_SECRET = "mcp-server", "s3cret"
ALGORITHM = "ES256"
NAMESPACE = "bench"
PLAIN_PATH = "/plain"
TOKEN_LIFETIME = 3600  # user tokens and grants outlive the run: nothing expires or refreshes

TARGET_ADDED_DOWN_US = 5.0
ISSUE_ROUND_TRIP_US = 100.0  # the issue's "about 100 µs" for one loopback round trip
TOKEN_LATENCY = 0.02  # section 1's token endpoint, as bench_exchange's burst
READY = b"Ready to accept connections"
KEY = secrets.token_bytes(32)  # this run's encryption key for the shared caches, never shown


@dataclass(frozen=True)
class Config:
    rounds: int  # sections 2 and 3
    hit_calls: int  # per batch, section 2
    exchange_calls: int  # per batch, section 3, real exchanges
    calls: int  # per batch, section 3, scripted exchanges and cached requests
    trials: int  # per mode, section 1
    workers: int
    users: int
    requests: int
    lanes: int  # concurrent requests per worker process


DEFAULT = Config(
    rounds=30,
    hit_calls=400,
    exchange_calls=200,
    calls=1000,
    trials=10,
    workers=4,
    users=50,
    requests=1000,
    lanes=25,
)
QUICK = Config(
    rounds=8,
    hit_calls=200,
    exchange_calls=80,
    calls=400,
    trials=3,
    workers=4,
    users=50,
    requests=1000,
    lanes=25,
)


def fail(message: str) -> NoReturn:
    _common.abort("bench_redis", message)


# -- redis-server ------------------------------------------------------------------------------


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, its output drained by a thread."""

    def __init__(self, directory: Path) -> None:
        program = shutil.which("redis-server")
        if program is None:
            fail("redis-server is not installed (Debian: apt-get install redis-server)")
        self.program = program
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run(  # noqa: S603 - our own command, fixed arguments
            [self.program, "--version"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("v", out.strip())

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            [
                self.program,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        stdout = self.process.stdout
        assert stdout is not None
        seen = b""
        for line in stdout:  # blocks until the server says it is ready
            seen += line
            if READY in line:
                break
        else:
            self.process.wait(10)
            fail(f"redis-server did not start:\n{seen.decode(errors='replace')}")
        self._drain = threading.Thread(target=stdout.read, daemon=True)  # a full pipe stalls it
        self._drain.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            if self._drain is not None:
                self._drain.join(10)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None


def refused(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (a connection is refused)."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) != 0


# -- the ASGI pieces ---------------------------------------------------------------------------


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """On ``/r/<i>``: one ``await ctx.exchange(UPSTREAMS[i])``, the grant kept in the scope's
    state for the checks; any other path: nothing. Then answers 200 with a tiny body."""
    path = scope["path"]
    if path.startswith("/r/"):
        state = scope["state"]
        state["grant"] = await state["access_context"].exchange(UPSTREAMS[int(path[3:])])
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


receive = _common.receiver("tools/call")


def authorization_server() -> LocalAuthorizationServer:
    auth = LocalAuthorizationServer(algorithm=ALGORITHM)
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    auth.exchange_expires_in = TOKEN_LIFETIME
    return auth


def middleware(issuer: str, client: httpx.AsyncClient, **options: Any) -> DelegationMiddleware:
    return DelegationMiddleware(
        app,
        issuer=issuer,
        resource=RESOURCE,
        http_client=client,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        **options,
    )


def shared_cache(url: str, key: bytes) -> RedisGrantCache:
    return RedisGrantCache(url, encryption_keys=[key], namespace=NAMESPACE)


def path_of(resource: int) -> str:
    return f"/r/{resource}"


async def request(wrapped: ASGIApp, token: str, path: str) -> Scope:
    """One request, which must be answered 200; its scope."""
    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token), path)
    await wrapped(scope, receive, record)
    if statuses != [200]:
        raise RuntimeError(f"a request to {path} was answered {statuses}, not [200]")
    return scope


async def capture(wrapped: DelegationMiddleware, token: str) -> AccessContext:
    """The access context of one request that exchanges nothing (it warms the metadata, the
    JWKS and the token's validation)."""
    context = (await request(wrapped, token, PLAIN_PATH)).get("state", {}).get("access_context")
    if not isinstance(context, AccessContext):
        fail("a warm-up request reached the app without an access context")
    return context


def token_calls(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


def counters(wrapped: DelegationMiddleware) -> Counter[str]:
    """The grant and shared-cache counters, flattened: ``grants.hit``, ``shared.waited``,
    ``breaker.skipped``..."""
    caches = wrapped.stats()["caches"]
    flat: Counter[str] = Counter()
    for name, value in caches["grants"].items():
        flat[f"grants.{name}"] = value
    shared = caches.get("shared") or {}
    for name, value in shared.items():
        if name == "breaker":
            for cause, n in value.items():
                flat[f"breaker.{cause}"] = int(n)
        else:
            flat[f"shared.{name}"] = value
    return flat


def check_grant(auth: LocalAuthorizationServer, token: str, user: str, resource: str) -> None:
    """``token`` (a grant's) is the authorization server's, for ``user`` at ``resource``."""
    claims = auth.verify(token)
    if claims is None or claims.get("sub") != user or claims.get("aud") != resource:
        fail(f"a grant for {resource} is not a token of the authorization server for {user}")


# -- timing ------------------------------------------------------------------------------------


async def timed_calls(
    make: Callable[[int], Awaitable[object]],
    n: int,
    prepare: Callable[[], object] | None = None,
) -> list[float]:
    """µs of each of ``n`` awaits of ``make(i)``; ``prepare()`` runs before each, untimed."""
    samples: list[float] = []
    for i in range(n):
        if prepare is not None:
            prepare()
        awaitable = make(i)
        start = time.perf_counter_ns()
        await awaitable
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def p90(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1]


def described(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "p90": p90(samples), "calls": len(samples)}


Samples = dict[str, list[float]]  # per-call µs of the cases a batch times side by side


def flush(wrapped: DelegationMiddleware) -> None:
    """Empty the middleware's in-process grant cache."""
    exchanger = wrapped._exchanger
    assert exchanger is not None
    exchanger._grants.flush()


class Rounds:
    """Per-call samples of several batches, interleaved round by round. A batch returns its
    samples, or the samples of each case it times (alternating them call by call)."""

    def __init__(self) -> None:
        self.pooled: dict[str, list[float]] = defaultdict(list)
        self.medians: dict[str, list[float]] = defaultdict(list)

    async def run(
        self,
        rounds: int,
        cases: Mapping[str, Callable[[], Awaitable[list[float] | Samples]]],
        *,
        warm: int = 1,
        timing_starts: Callable[[], None] | None = None,
    ) -> None:
        """``warm`` untimed rounds, then ``rounds`` whose order rotates; ``timing_starts()``
        runs between the two."""
        names = list(cases)
        for round_ in range(warm + rounds):
            if round_ == warm and timing_starts is not None:
                timing_starts()
            shift = round_ % len(names)
            for case in names[shift:] + names[:shift]:
                answer = await cases[case]()
                if round_ < warm:
                    continue
                for name, samples in (
                    answer if isinstance(answer, dict) else {case: answer}
                ).items():
                    self.pooled[name].extend(samples)
                    self.medians[name].append(statistics.median(samples))

    def figures(self) -> dict[str, dict[str, float]]:
        return {name: described(samples) for name, samples in self.pooled.items()}

    def added(self, name: str, baseline: str) -> dict[str, Any]:
        """``name`` minus ``baseline``: the difference of the pooled medians, and the per-round
        differences of the rounds' medians."""
        per_round = [a - b for a, b in zip(self.medians[name], self.medians[baseline], strict=True)]
        return {
            "of_medians": statistics.median(self.pooled[name])
            - statistics.median(self.pooled[baseline]),
            "per_round": summary(per_round),
        }


class Warnings(logging.Handler):
    """Counts the records of the ``asgi_delegation.redis`` logger (kept off stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


WARNINGS = Warnings()  # a worker process's


# -- 1. token-endpoint calls across worker processes -------------------------------------------


def worker_main(conn: Connection) -> None:
    """A worker process: runs the trials it is sent until it is sent None."""
    asyncio.run(_worker(conn))


async def _worker(conn: Connection) -> None:
    logger = logging.getLogger("asgi_delegation.redis")  # counted, kept off the run's stderr
    logger.addHandler(WARNINGS)
    logger.propagate = False
    async with httpx.AsyncClient(timeout=30) as client:  # one pool per process, as a server's
        while True:
            job = await asyncio.to_thread(conn.recv)
            if job is None:
                return
            try:
                answer = await _trial(conn, client, job)
            except Exception as exc:  # told to the main process, which aborts the run
                # Only our own messages are quoted: another's text is not known to be secret-free.
                said = f": {exc}" if type(exc) is RuntimeError else ""
                answer = {"error": f"{type(exc).__name__}{said}"}
            conn.send(answer)


async def _trial(
    conn: Connection, client: httpx.AsyncClient, job: dict[str, Any]
) -> dict[str, Any]:
    url = job["redis_url"]
    cache = None if url is None else shared_cache(url, job["key"])
    wrapped = middleware(job["issuer"], client, shared_cache=cache)
    try:
        # The metadata, the JWKS and one exchange (with a shared cache: its subscription).
        await request(wrapped, job["warm_up_token"], path_of(0))
        conn.send("ready")
        if await asyncio.to_thread(conn.recv) != "go":
            raise RuntimeError("the worker was not told to go")
        before, warned = counters(wrapped), WARNINGS.count
        plan: list[tuple[str, int]] = job["plan"]
        grants: list[str] = [""] * len(plan)
        queue = iter(enumerate(plan))

        async def lane() -> None:
            for i, (token, resource) in queue:
                scope = await request(wrapped, token, path_of(resource))
                grants[i] = scope["state"]["grant"].access_token

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(job["lanes"])))
        wall = time.perf_counter() - start
        counts = counters(wrapped) - before
        counts["warnings"] = WARNINGS.count - warned
        return {"grants": grants, "wall_ms": wall * 1000, "counts": counts}
    finally:
        await wrapped.aclose()


class Workers:
    """The worker processes and a pipe to each."""

    def __init__(self, n: int) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, as a server's
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(n):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child,), daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)

    def receive(self, what: str) -> list[Any]:
        answers = []
        for pipe in self.pipes:
            if not pipe.poll(120):
                fail(f"processes: a worker did not answer ({what}) within 120 s")
            try:
                answer = pipe.recv()
            except EOFError:
                fail(f"processes: a worker died ({what})")
            if isinstance(answer, dict) and "error" in answer:
                fail(f"processes: a worker failed ({what}): {answer['error']}")
            answers.append(answer)
        return answers

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a worker that died has closed its end
                pipe.send(None)
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
                process.join(10)
        for pipe in self.pipes:
            pipe.close()


def wait_for_subscribers(client: redis.Redis, channel: str, n: int) -> None:
    # Each worker subscribes from a task of its own event loop, and nothing tells this process
    # when it has: poll the server, with a deadline.
    deadline = time.monotonic() + 10
    while True:
        counts = dict(client.pubsub_numsub(channel))
        if counts.get(channel.encode(), 0) >= n:
            return
        if time.monotonic() > deadline:
            fail(f"processes: the workers did not all subscribe to {channel}")
        time.sleep(0.01)


def processes(config: Config, redis_url: str) -> dict[str, Any]:
    auth = authorization_server()
    auth.token_latency = TOKEN_LATENCY
    key = secrets.token_bytes(32)
    rng = random.Random(8693)  # the same plans every run
    n_pairs = config.users * len(UPSTREAMS)
    if config.requests % n_pairs:
        fail(f"processes: {config.requests} requests do not spread evenly over {n_pairs} pairs")
    samples: dict[str, list[float]] = defaultdict(list)
    workers = Workers(config.workers)
    try:
        with auth.running() as issuer, redis.Redis.from_url(redis_url) as admin:
            users = [f"user-{u:02d}" for u in range(config.users)]
            pairs = [(u, r) for u in users for r in range(len(UPSTREAMS))]
            for trial in range(config.trials):
                # One plan per trial, for both modes: shuffled, then dealt to the processes in turn.
                plan = pairs * (config.requests // n_pairs)
                rng.shuffle(plan)
                shares = [plan[w :: config.workers] for w in range(config.workers)]
                modes = ("local", "shared") if trial % 2 == 0 else ("shared", "local")
                for mode in modes:
                    admin.flushall()
                    # New user tokens, fresh middlewares and an empty Redis: every cache cold.
                    tokens = {
                        u: auth.mint(u, audience=RESOURCE, scope="read", expires_in=TOKEN_LIFETIME)
                        for u in users
                    }
                    for pipe, share in zip(workers.pipes, shares, strict=True):
                        pipe.send(
                            {
                                "redis_url": redis_url if mode == "shared" else None,
                                "key": key,
                                "issuer": issuer,
                                "warm_up_token": auth.mint("warm-up", audience=RESOURCE),
                                "plan": [(tokens[u], r) for u, r in share],
                                "lanes": config.lanes,
                            }
                        )
                    workers.receive("ready")
                    if mode == "shared":
                        wait_for_subscribers(admin, f"{NAMESPACE}:events", config.workers)
                    before = token_calls(auth)
                    for pipe in workers.pipes:
                        pipe.send("go")
                    answers = workers.receive("trial")
                    calls = token_calls(auth) - before
                    distinct: dict[str, tuple[str, int]] = {}
                    for share, answer in zip(shares, answers, strict=True):
                        for (user, resource), grant in zip(share, answer["grants"], strict=True):
                            if distinct.setdefault(grant, (user, resource)) != (user, resource):
                                fail("processes: one grant was handed out for two pairs")
                    for grant, (user, resource) in distinct.items():
                        check_grant(auth, grant, user, UPSTREAMS[resource])
                    if len(distinct) != calls:
                        fail(f"processes: {len(distinct)} distinct grants for {calls} token calls")
                    predicted = len({(w, p) for w, share in enumerate(shares) for p in share})
                    counts: Counter[str] = sum((a["counts"] for a in answers), Counter())
                    samples[f"{mode}_calls"].append(calls)
                    samples[f"{mode}_predicted"].append(predicted)
                    samples[f"{mode}_wall_ms"].append(max(a["wall_ms"] for a in answers))
                    for name in (
                        "grants.hit",
                        "grants.miss",
                        "grants.joined",
                        "grants.shared",
                        "shared.hit",
                        "shared.miss",
                        "shared.waited",
                        "shared.write",
                        "breaker.opened",
                        "warnings",
                    ):
                        samples[f"{mode} {name}"].append(counts[name])
    finally:
        workers.close()
    results: dict[str, Any] = {name: summary(values) for name, values in samples.items()}
    shared, local = results["shared_calls"]["median"], results["local_calls"]["median"]
    results.update(
        {
            "pairs": n_pairs,
            "ratio": local / shared,
            "per_trial": {
                "local_calls": samples["local_calls"],
                "shared_calls": samples["shared_calls"],
            },
            "target_met": max(samples["shared_calls"]) <= n_pairs,
        }
    )
    return results


# -- 2. a Redis hit against an in-process hit --------------------------------------------------


async def redis_hit(config: Config, redis_url: str) -> dict[str, Any]:
    auth = authorization_server()
    n = config.hit_calls
    async with auth.http_client() as client, aioredis.Redis.from_url(redis_url) as probe:
        await probe.flushall()
        wrapped = middleware(auth.issuer, client, shared_cache=shared_cache(redis_url, KEY))
        try:
            token = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=TOKEN_LIFETIME)
            context = await capture(wrapped, token)
            exchanger = wrapped._exchanger
            assert exchanger is not None
            first = await context.exchange(UPSTREAMS[0])
            check_grant(auth, first.access_token, "alice", UPSTREAMS[0])
            exchanger._grants.flush()
            again = await context.exchange(UPSTREAMS[0])
            if token_calls(auth) != 1 or again.access_token != first.access_token:
                fail("redis hit: the warm-up did not exchange once, then find the grant in Redis")
            stored = [k for k in await probe.keys("*") if isinstance(k, bytes) and b":g:" in k]
            if len(stored) != 1:
                fail(f"redis hit: Redis holds {len(stored)} grants, not 1")
            # What a lookup sends: one MGET of the subject's generation and the grant.
            lookup_keys = [stored[0].split(b":g:")[0] + b":v", stored[0]]
            headers = headers_for(token)
            path = path_of(0)

            async def lookup_gets() -> None:
                await probe.mget(lookup_keys)

            async def hits(from_redis: bool) -> list[float]:
                before, calls = counters(wrapped), token_calls(auth)
                grants: list[Grant] = []

                async def one(i: int) -> None:
                    grants.append(await context.exchange(UPSTREAMS[0]))

                samples = await timed_calls(one, n, exchanger._grants.flush if from_redis else None)
                check_hits(before, calls, from_redis, [g.access_token for g in grants])
                return samples

            async def requests(from_redis: bool) -> list[float]:
                before, calls = counters(wrapped), token_calls(auth)
                scopes = [http_scope(headers, path) for _ in range(n)]
                samples = await timed_calls(
                    lambda i: wrapped(scopes[i], receive, discard),
                    n,
                    exchanger._grants.flush if from_redis else None,
                )
                check_hits(
                    before, calls, from_redis, [s["state"]["grant"].access_token for s in scopes]
                )
                return samples

            def check_hits(
                before: Counter[str], calls: int, from_redis: bool, tokens: list[str]
            ) -> None:
                what = "Redis" if from_redis else "in-process"
                delta = counters(wrapped) - before
                expected = (
                    {"grants.shared": n, "shared.hit": n} if from_redis else {"grants.hit": n}
                )
                if token_calls(auth) != calls or dict(delta) != expected:
                    fail(f"redis hit: timed {what} hits counted {dict(delta)}, not {expected}")
                if any(t != first.access_token for t in tokens):
                    fail(f"redis hit: a timed {what} hit did not return the stored grant")

            async def bare_requests() -> list[float]:
                scopes = [http_scope(headers, path) for _ in range(n)]
                return await timed_calls(lambda i: bare_app(scopes[i], receive, discard), n)

            cases: dict[str, Callable[[], Awaitable[list[float] | Samples]]] = {
                "ping_us": lambda: timed_calls(lambda i: probe.ping(), n),
                "lookup_gets_us": lambda: timed_calls(lambda i: lookup_gets(), n),
                "local_hit_us": lambda: hits(False),
                "redis_hit_us": lambda: hits(True),
                "bare_request_us": bare_requests,
                "local_request_us": lambda: requests(False),
                "redis_request_us": lambda: requests(True),
            }
            rounds = Rounds()
            await rounds.run(config.rounds, cases)
            breaker = counters(wrapped)["breaker.opened"]
        finally:
            await wrapped.aclose()
    results: dict[str, Any] = rounds.figures()
    ping = results["ping_us"]["median"]
    added = rounds.added("redis_hit_us", "local_hit_us")
    results.update(
        {
            "added_us": added,
            "added_request_us": rounds.added("redis_request_us", "local_request_us"),
            "added_over_lookup_gets_us": rounds.added("redis_hit_us", "lookup_gets_us"),
            "request_over_bare_us": rounds.added("local_request_us", "bare_request_us"),
            "added_in_round_trips": added["of_medians"] / ping,
            "breaker_opened": breaker,
            "target_met": added["of_medians"] <= ping,
            "issue_target_met": added["of_medians"] <= ISSUE_ROUND_TRIP_US,
        }
    )
    return results


# -- 3. Redis down, the breaker open -----------------------------------------------------------


def scripted(grant: Grant) -> Callable[..., Awaitable[tuple[Grant, float | None]]]:
    """An instant token endpoint: answers every exchange with a copy of ``grant``."""
    body = json.dumps(
        {
            "access_token": grant.access_token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME,
        }
    ).encode()

    async def answer(
        subject_token: str, resource: str, scope: str | None, trace: Any
    ) -> tuple[Grant, float | None]:
        trace.attempts += 1  # as a real request counts itself
        return grant_from(resource, scope, body)

    return answer


async def redis_down(config: Config, stopped_url: str, port: int) -> dict[str, Any]:
    if not refused(port):
        fail(f"redis down: something listens on the stopped redis-server's port {port}")
    auth = authorization_server()
    logger = logging.getLogger("asgi_delegation.redis")
    handler, propagate = Warnings(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    opened: list[DelegationMiddleware] = []
    try:
        async with auth.http_client() as client:
            token = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=TOKEN_LIFETIME)
            headers = headers_for(token)
            path = path_of(0)
            # "twin": a second middleware without a shared cache, the control of "none".
            names = ("none", "down", "twin", "none_scripted", "down_scripted")
            apps: dict[str, DelegationMiddleware] = {}
            for name in names:
                options = (
                    {"shared_cache": shared_cache(stopped_url, KEY)}
                    if name.startswith("down")
                    else {}
                )
                apps[name] = middleware(auth.issuer, client, **options)
                opened.append(apps[name])
            real = (await request(apps["none"], token, path))["state"]["grant"]
            check_grant(auth, real.access_token, "alice", UPSTREAMS[0])
            for name in ("none_scripted", "down_scripted"):
                apps[name]._exchanger._request = scripted(real)  # type: ignore[method-assign,union-attr]
            for name in names:
                await capture(apps[name], token)
                exchanger = apps[name]._exchanger
                assert exchanger is not None
                # Misses until the breaker opens (3 failed lookups; the subscription's failures
                # count too); then one more, so that each middleware has a cached grant.
                for _ in range(10):
                    if not name.startswith("down") or counters(apps[name])["breaker.opened"]:
                        break
                    exchanger._grants.flush()
                    await request(apps[name], token, path)
                else:
                    fail(f"redis down: the breaker of {name} did not open")
                await request(apps[name], token, path)
            timed: Counter[str] = Counter()  # exchanges with Redis down, in the timed rounds
            marks: dict[str, Any] = {}

            def timing_starts() -> None:
                timed.clear()
                marks["before"] = {name: counters(apps[name]) for name in names}
                marks["started"] = time.monotonic()

            def pair(kind: str, left: str, right: str, n: int) -> Callable[[], Awaitable[Samples]]:
                """``n`` requests through the middleware ``left`` and ``n`` through ``right``,
                alternating call by call (so that neither gets the quieter moments), as the
                samples ``<kind>_<left>_us`` and ``<kind>_<right>_us``; ``kind`` "exchange",
                "control" and "scripted" flush the in-process cache before each call,
                "cached" does not."""
                pair_names = (left, right)
                keys = {name: f"{kind}_{name.split('_')[0]}_us" for name in pair_names}
                exchanges = kind != "cached"
                real_ones = kind in ("exchange", "control")

                async def batch() -> Samples:
                    scopes = {
                        name: [http_scope(headers, path) for _ in range(n)] for name in pair_names
                    }
                    calls, hits = (
                        token_calls(auth),
                        {name: counters(apps[name])["grants.hit"] for name in pair_names},
                    )
                    samples: Samples = {key: [] for key in keys.values()}
                    for i in range(n):
                        for name in pair_names[:: 1 if i % 2 else -1]:
                            wrapped = apps[name]
                            if exchanges:
                                flush(wrapped)
                            awaitable = wrapped(scopes[name][i], receive, discard)
                            start = time.perf_counter_ns()
                            await awaitable
                            elapsed = (time.perf_counter_ns() - start) / 1000
                            samples[keys[name]].append(elapsed)
                    if exchanges and right.startswith("down"):
                        timed["down"] += n
                    made = token_calls(auth) - calls
                    for name in pair_names:
                        tokens = [s["state"]["grant"].access_token for s in scopes[name]]
                        hit = counters(apps[name])["grants.hit"] - hits[name]
                        if real_ones:  # a new grant each time, the authorization server's
                            if len(set(tokens)) != n or hit:
                                fail(f"redis down: {name}'s timed exchanges shared a grant")
                            check_grant(auth, tokens[-1], "alice", UPSTREAMS[0])
                        elif kind == "scripted":  # the scripted answer, exchanged each time
                            if any(t != real.access_token for t in tokens) or hit:
                                fail(f"redis down: {name}'s scripted exchanges were not all made")
                        elif len(set(tokens)) != 1 or hit != n:  # "cached": one grant, all hits
                            fail(f"redis down: {name}'s timed cached requests were not all hits")
                    if made != (2 * n if real_ones else 0):
                        fail(f"redis down: timed {kind} requests made {made} token-endpoint calls")
                    return samples

                return batch

            cases = {
                "exchange": pair("exchange", "none", "down", config.exchange_calls),
                "control": pair("control", "none", "twin", config.exchange_calls),
                "scripted": pair("scripted", "none_scripted", "down_scripted", config.calls),
                "cached": pair("cached", "none", "down", config.calls),
            }
            rounds = Rounds()
            await rounds.run(config.rounds, cases, timing_starts=timing_starts)
            seconds = time.monotonic() - marks["started"]
            before = marks["before"]
            after = {name: counters(apps[name]) for name in names}
            for name in ("down", "down_scripted"):
                stats = apps[name].stats()["caches"]["shared"]
                if not stats["breaker"]["open"] or after[name]["breaker.opened"] != 1:
                    fail(f"redis down: {name}'s breaker closed or opened again during the run")
                if stats["hit"] or stats["write"]:
                    fail(f"redis down: {name} read or wrote a grant in Redis")
            skipped = sum(
                after[n]["breaker.skipped"] - before[n]["breaker.skipped"]
                for n in ("down", "down_scripted")
            )
            failures = sum(
                after[n][f"breaker.{cause}"] - before[n][f"breaker.{cause}"]
                for n in ("down", "down_scripted")
                for cause in ("connection", "timeout")
            )
    finally:
        for wrapped in opened:
            await wrapped.aclose()
        logger.removeHandler(handler)
        logger.propagate = propagate
    results: dict[str, Any] = rounds.figures()
    added = rounds.added("exchange_down_us", "exchange_none_us")
    added_scripted = rounds.added("scripted_down_us", "scripted_none_us")
    results.update(
        {
            "added_us": added,
            "added_scripted_us": added_scripted,
            "added_cached_us": rounds.added("cached_down_us", "cached_none_us"),
            "control_us": rounds.added("control_twin_us", "control_none_us"),
            "timed_down_exchanges": timed["down"],
            "probes": timed["down"] - skipped,
            "failed_redis_attempts": failures,
            "timed_seconds": seconds,
            "warnings_logged": handler.count,
            "target_met": added["of_medians"] < TARGET_ADDED_DOWN_US,
            "scripted_target_met": added_scripted["of_medians"] < TARGET_ADDED_DOWN_US,
        }
    )
    return results


# -- report ------------------------------------------------------------------------------------


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    procs, hit, down = results["processes"], results["redis_hit"], results["redis_down"]
    lines = _common.heading(
        "asgi_delegation shared grant cache (Redis) benchmark",
        env,
        f"{mode}: {config.trials} trials per mode of {config.requests} requests over "
        f"{config.workers} processes; {config.rounds} interleaved rounds of {config.hit_calls} "
        f"hits, {config.exchange_calls} exchanges and {config.calls} scripted exchanges or "
        "cached requests per batch; garbage collector ON",
        "section 1: median over trials (min-max); sections 2-3: median and 90th percentile "
        "of every timed call",
    )
    row = "  {:<62}{:>9}  {:<22}{}"

    def spread(stats: dict[str, float], digits: int = 0) -> str:
        return f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    def counted(label: str, stats: dict[str, float], target: str = "", digits: int = 0) -> str:
        return row.format(label, f"{stats['median']:.{digits}f}", spread(stats, digits), target)

    def timed(label: str, stats: dict[str, float], digits: int = 1) -> str:
        return row.format(
            label, f"{stats['median']:.{digits}f}", f"p90 {stats['p90']:.{digits}f}", ""
        )

    def added(label: str, stats: dict[str, Any], target: str = "", digits: int = 1) -> str:
        """Two rows: the difference of the medians (with the target), then the per-round
        differences' median and range."""
        rounds = stats["per_round"]
        spread = f"({rounds['min']:+.{digits}f} to {rounds['max']:+.{digits}f})"
        return "\n".join(
            (
                row.format(label, f"{stats['of_medians']:+.{digits}f}", "", target),
                row.format("    per round", f"{rounds['median']:+.{digits}f}", spread, ""),
            )
        )

    def figure(label: str, value: str, target: str = "") -> str:
        return row.format(label, value, "", target)

    pairs = procs["pairs"]
    lines += [
        f"1. Token-endpoint calls per {config.requests} requests: {config.workers} worker "
        f"processes, {config.users} users x {len(UPSTREAMS)} resources ({pairs} pairs), "
        f"{config.lanes} concurrent requests per process, token endpoint "
        f"{TOKEN_LATENCY * 1000:g} ms",
        row.format("", "calls", "range", "target"),
        counted(
            "in-process caches only",
            procs["local_calls"],
            f"(up to {config.workers} x {pairs} = {config.workers * pairs})",
        ),
        counted("  predicted: (process, pair) combinations in the plan", procs["local_predicted"]),
        counted(
            "with a shared RedisGrantCache",
            procs["shared_calls"],
            f"= {pairs} distinct pairs: {verdict(procs['target_met'])}",
        ),
        figure("  ratio in-process only / shared", f"{procs['ratio']:.2f}x"),
        figure(
            "  per trial, in-process only",
            "",
            " ".join(str(int(v)) for v in procs["per_trial"]["local_calls"]),
        ),
        figure(
            "  per trial, shared",
            "",
            " ".join(str(int(v)) for v in procs["per_trial"]["shared_calls"]),
        ),
        "  shared, summed over the processes (per trial):",
        counted("    in-process hits", procs["shared grants.hit"]),
        counted("    in-process misses", procs["shared grants.miss"]),
        counted("    joined an in-process flight", procs["shared grants.joined"]),
        counted("    served from Redis (no token-endpoint call)", procs["shared grants.shared"]),
        counted("    Redis hits", procs["shared shared.hit"]),
        counted("    Redis misses", procs["shared shared.miss"]),
        counted("    waited for another process's lease", procs["shared shared.waited"]),
        counted("    grants written to Redis", procs["shared shared.write"]),
        counted("    breaker opened", procs["shared breaker.opened"], "(must be 0)"),
        counted("    warnings logged (asgi_delegation.redis)", procs["shared warnings"]),
        counted("  wall time of a trial, in-process only (ms)", procs["local_wall_ms"]),
        counted("  wall time of a trial, shared (ms)", procs["shared_wall_ms"]),
        "",
        "2. A Redis hit against an in-process hit (grant in Redis only: in-process cache "
        "flushed before each call)",
        row.format("", "µs/call", "", "target"),
        timed("loopback round trip: PING, redis-py asyncio", hit["ping_us"]),
        timed("  a lookup's own Redis call: one MGET", hit["lookup_gets_us"]),
        timed("(a) await ctx.exchange(R), in-process hit", hit["local_hit_us"]),
        timed("(b) await ctx.exchange(R), Redis hit", hit["redis_hit_us"]),
        added(
            "  (b) - (a)",
            hit["added_us"],
            f"<= 1 PING ({hit['ping_us']['median']:.0f} µs): {verdict(hit['target_met'])}; "
            f"<= {ISSUE_ROUND_TRIP_US:g} µs: {verdict(hit['issue_target_met'])}",
        ),
        figure("  (b) - (a), in round trips (PING medians)", f"{hit['added_in_round_trips']:.2f}"),
        added("  (b) - the lookup's MGET", hit["added_over_lookup_gets_us"], "(informational)"),
        timed("(c) request, bare app (reference)", hit["bare_request_us"]),
        timed(
            "request through the middleware, app exchanges: in-process hit", hit["local_request_us"]
        ),
        timed("the same request, the grant in Redis only", hit["redis_request_us"]),
        added("  Redis hit - in-process hit, whole requests", hit["added_request_us"]),
        added(
            "  in-process-hit request - bare app", hit["request_over_bare_us"], "(informational)"
        ),
        "",
        "3. Redis down (stopped), breaker open, vs no shared cache; in-process cache flushed "
        "before each exchange",
        row.format("", "µs/call", "", "target"),
        timed("request + exchange, no shared cache (AS in process)", down["exchange_none_us"]),
        timed("request + exchange, Redis down (AS in process)", down["exchange_down_us"]),
        added(
            "  added by the dead Redis",
            down["added_us"],
            f"< {TARGET_ADDED_DOWN_US:g} µs: {verdict(down['target_met'])}",
        ),
        added(
            "  control: a second middleware without one, same batches",
            down["control_us"],
            "(the method's noise: about 0)",
        ),
        timed(
            "request + exchange, no shared cache (instant scripted answer)",
            down["scripted_none_us"],
        ),
        timed("request + exchange, Redis down (instant scripted answer)", down["scripted_down_us"]),
        added(
            "  added by the dead Redis",
            down["added_scripted_us"],
            f"< {TARGET_ADDED_DOWN_US:g} µs: {verdict(down['scripted_target_met'])}",
            2,
        ),
        timed("cached request (in-process hit), no shared cache", down["cached_none_us"], 2),
        timed("cached request (in-process hit), Redis down", down["cached_down_us"], 2),
        added("  added by the dead Redis", down["added_cached_us"], "(about 0)", 2),
        figure(
            "timed exchanges with Redis down / let through as probes",
            f"{down['timed_down_exchanges']} / {down['probes']}",
            f"(over {down['timed_seconds']:.0f} s)",
        ),
        figure(
            "failed Redis attempts meanwhile (probes, resubscriptions)",
            str(down["failed_redis_attempts"]),
            f"({down['warnings_logged']} warnings logged in the section)",
        ),
    ]
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_redis",
        description="The shared grant cache on Redis: token-endpoint calls across worker "
        "processes, a Redis hit against an in-process hit, the cost of a dead Redis.",
        rounds_help=f"interleaved rounds for sections 2 and 3 (default {DEFAULT.rounds}; "
        f"{QUICK.rounds} with --quick)",
        quick_help=f"smaller runs: {QUICK.trials} trials per mode, smaller batches",
    )


async def run(config: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            results = {"processes": await asyncio.to_thread(processes, config, server.url)}
            results["redis_hit"] = await redis_hit(config, server.url)
        finally:
            server.stop()
        results["redis_down"] = await redis_down(config, server.url, server.port)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(**{**asdict(base), "rounds": args.rounds or base.rounds})
    env = _common.environment("httpx", "redis", "uvicorn")
    with tempfile.TemporaryDirectory() as directory:
        env["redis-server"] = RedisServer(Path(directory)).version()
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
