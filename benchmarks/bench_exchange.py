"""Token exchange benchmarks of DelegationMiddleware, measured side by side in one run.

1. Cache hit: ``await ctx.exchange(R)`` on a warm grant cache, against an empty ``async def``
   awaited the same way. Target: at most 3 µs per hit. Also the first hit of a fresh request
   (a new ``AccessContext``, same user token): a request through the middleware whose app
   exchanges, minus the same request whose app does not.
2. Burst: 1,000 concurrent identical requests (same user token, same resource, cold grant
   cache) through the middleware, against ``LocalAuthorizationServer`` on a loopback port with
   20 ms of simulated token-endpoint latency. Targets: one token-endpoint request per burst,
   and a burst wall time at most 1.5x that of one cold exchange.
3. Cold exchange against a bare ``httpx.AsyncClient.post`` of the same form (same client
   authentication header) to the same loopback token endpoint, no simulated latency. Target:
   at most 1.2x the bare POST.
4. Memory: the bytes ``tracemalloc`` sees held per cached grant after filling the grant cache
   with 100,000 grants (through the real ``exchange`` code path, the token endpoint replaced by
   an instant scripted answer). Target: at most the grant's token size + 600 bytes.

The ASGI callables are awaited directly (hand-made scopes) in one asyncio event loop. The
loopback server is uvicorn on its own thread (``LocalAuthorizationServer.serve``), so it shares
the process, and the GIL, with the middleware; its listening socket gets TCP_NODELAY, which
``serve()`` as shipped leaves off (see ``served``: a 40 ms stall per kept-alive request, also
measured). Batches are interleaved round by round; each figure is the median over rounds of
the per-call mean of one batch (bursts: of the wall time). The garbage collector is paused
while a batch is timed, as ``timeit`` does.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_exchange            # ~30 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_exchange --quick    # ~6 s
    .venv/bin/python -m benchmarks.bench_exchange --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import os
import platform
import socket
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from asgi_delegation import AccessContext, DelegationMiddleware, Grant
from asgi_delegation._exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE
from asgi_delegation._fetch import HEADERS
from asgi_delegation._token_response import grant_from
from asgi_delegation._types import ASGIApp, Message, Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket, serve_on

RESOURCE = "http://127.0.0.1:8000/mcp"  # this server, the audience of the user's token
UPSTREAM = "https://api.upstream.example/v1"  # what the grants are for
CLIENT_ID, CLIENT_SECRET = "app", "s"
EXCHANGE_PATH, PLAIN_PATH = "/exchange", "/plain"

TARGET_HIT_US = 3.0
TARGET_BURST_TOKEN_CALLS = 1
TARGET_BURST_RATIO = 1.5
TARGET_COLD_RATIO = 1.2
TARGET_MEMORY_OVERHEAD = 600
BURST_LATENCY = 0.02
# The issue's cases: keycardai-starlette, with no cache, made 200 token-endpoint calls for 200
# concurrent identical requests and 10 for 10 sequential ones.
ISSUE_CONCURRENT, ISSUE_SEQUENTIAL = 200, 10

_BASE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"python-httpx/0.28.1 mcp-client/1.0"),
    (b"accept", b"application/json, text/event-stream"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"application/json"),
    (b"content-length", b"87"),
    (b"mcp-protocol-version", b"2025-06-18"),
    (b"mcp-session-id", b"4f0c2b9e7d1a4c3b8e6f5a2d1c0b9a87"),
]
_REQUEST: Message = {
    "type": "http.request",
    "body": b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}',
    "more_body": False,
}


@dataclass(frozen=True)
class Config:
    rounds: int
    hit_calls: int
    burst_rounds: int
    burst_size: int
    cold_rounds: int
    cold_calls: int
    shipped_rounds: int
    shipped_calls: int
    grants: int


DEFAULT = Config(
    rounds=30,
    hit_calls=5000,
    burst_rounds=15,
    burst_size=1000,
    cold_rounds=30,
    cold_calls=20,
    shipped_rounds=6,
    shipped_calls=4,
    grants=100_000,
)
QUICK = Config(
    rounds=7,
    hit_calls=2000,
    burst_rounds=3,
    burst_size=1000,
    cold_rounds=7,
    cold_calls=10,
    shipped_rounds=2,
    shipped_calls=3,
    grants=20_000,
)


# -- the ASGI pieces ---------------------------------------------------------------------------


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """On ``/exchange``: one ``await ctx.exchange(UPSTREAM)``, the grant kept in the scope's
    state for the checks. Any other path: nothing. Then answers 200 with a tiny body."""
    if scope["path"] == EXCHANGE_PATH:
        state = scope["state"]
        state["grant"] = await state["access_context"].exchange(UPSTREAM)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def receive() -> Message:
    return _REQUEST


async def discard(message: Message) -> None:
    pass


async def empty() -> None:
    pass


def headers_for(token: str) -> list[tuple[bytes, bytes]]:
    authorization = (b"authorization", b"Bearer " + token.encode())
    return [*_BASE_HEADERS[:6], authorization, *_BASE_HEADERS[6:]]


def http_scope(headers: list[tuple[bytes, bytes]], path: str) -> Scope:
    """A fresh scope per call: the middleware writes ``scope["state"]``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


def middleware(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, **options: Any
) -> DelegationMiddleware:
    return DelegationMiddleware(
        app,
        issuer=auth.issuer,
        resource=RESOURCE,
        http_client=client,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        **options,
    )


@dataclass
class Timeline:
    """``perf_counter`` instants of token requests: the client starting one (an httpx request
    hook), the server receiving it, the client receiving the answer's head (a response hook)."""

    posted: list[float]
    received: list[float]
    answered: list[float]

    def clear(self) -> None:
        self.posted.clear()
        self.received.clear()
        self.answered.clear()

    async def on_request(self, request: httpx.Request) -> None:
        if request.url.path == "/token":
            self.posted.append(time.perf_counter())

    async def on_response(self, response: httpx.Response) -> None:
        if response.request.url.path == "/token":
            self.answered.append(time.perf_counter())

    def recording(self, server: ASGIApp) -> ASGIApp:
        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/token":
                self.received.append(time.perf_counter())
            await server(scope, receive, send)

        return recorded


@asynccontextmanager
async def served(
    auth: LocalAuthorizationServer, *, nodelay: bool, timeline: Timeline | None = None
) -> AsyncIterator[str]:
    """``auth`` on a loopback port: ``auth.serve()`` as shipped, or (``nodelay``) the same with
    TCP_NODELAY set on the listening socket, which accepted connections inherit on Linux.

    ``loopback_socket`` makes its socket with ``socket.socket(family)``, whose ``proto`` is 0,
    and asyncio sets TCP_NODELAY only on sockets whose ``proto`` is ``IPPROTO_TCP``: the
    server's connections keep Nagle's algorithm, uvicorn writes a response's head and body
    separately, the body waits for the client's delayed ACK, and every request after the first
    on a kept-alive connection takes some 40 ms more. The main figures are measured without
    that stall; the shipped ``serve()`` is measured too, separately.
    """
    if not nodelay:
        async with auth.serve() as issuer:
            yield issuer
        return
    with loopback_socket() as (sock, origin):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth.issuer = origin  # as serve() does, for an issuer without a path
        async with serve_on(auth if timeline is None else timeline.recording(auth), sock):
            yield auth.issuer


def fail(message: str) -> None:
    print(f"bench_exchange: ABORTED: {message}", file=sys.stderr)
    raise SystemExit(1)


async def request(wrapped: ASGIApp, token: str, path: str) -> Scope:
    """One request that must be answered 200 and reach the app as alice; its scope."""
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = http_scope(headers_for(token), path)
    await wrapped(scope, receive, record)
    if statuses != [200]:
        fail(f"a request to {path} was answered {statuses}, not [200]")
    context = scope.get("state", {}).get("access_context")
    if context is None or context.subject != "alice":
        fail(f"a request to {path} reached the app without alice's access context")
    return scope


async def capture(wrapped: ASGIApp, token: str) -> AccessContext:
    """The access context of one request that exchanges nothing."""
    context: AccessContext = (await request(wrapped, token, PLAIN_PATH))["state"]["access_context"]
    return context


def token_calls(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


# -- timing ------------------------------------------------------------------------------------


async def timed_loop(n: int, call: Callable[[], Awaitable[object]]) -> float:
    """Per-call mean of awaiting ``call()`` ``n`` times, in µs."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            await call()
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / n / 1000


async def time_hits(context: AccessContext, n: int) -> float:
    """Per-call mean of ``await context.exchange(UPSTREAM)``, in µs (the loop written out, so
    that it costs what the baseline's loop costs)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            await context.exchange(UPSTREAM)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / n / 1000


async def time_empty(n: int) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            await empty()
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / n / 1000


async def time_requests(wrapped: ASGIApp, scopes: Sequence[Scope]) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for scope in scopes:
            await wrapped(scope, receive, discard)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(scopes) / 1000


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


# -- 1. cache hit ------------------------------------------------------------------------------


async def cache_hit(config: Config) -> dict[str, Any]:
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    client = auth.http_client()
    try:
        wrapped = middleware(auth, client)
        token = auth.mint("alice", audience=RESOURCE, scope="read")
        context = await capture(wrapped, token)
        first = await context.exchange(UPSTREAM)
        calls = token_calls(auth)
        if calls != 1 or auth.verify(first.access_token) is None:
            fail(f"cache hit: the warm-up exchange made {calls} token requests, not 1")
        if await context.exchange(UPSTREAM) is not first:
            fail("cache hit: a second exchange did not return the cached grant")
        headers = headers_for(token)
        empty_us: list[float] = []
        hit_us: list[float] = []
        plain_us: list[float] = []
        exchanging_us: list[float] = []
        for _ in range(config.rounds):
            empty_us.append(await time_empty(config.hit_calls))
            hit_us.append(await time_hits(context, config.hit_calls))
            scopes = [http_scope(headers, PLAIN_PATH) for _ in range(config.hit_calls)]
            plain_us.append(await time_requests(wrapped, scopes))
            scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(config.hit_calls)]
            exchanging_us.append(await time_requests(wrapped, scopes))
            if not all(scope["state"]["grant"] is first for scope in scopes):
                fail("cache hit: a fresh request did not get the cached grant")
        if token_calls(auth) != 1:
            fail("cache hit: the timed hits reached the token endpoint")
    finally:
        await client.aclose()
    hit, baseline = summary(hit_us), summary(empty_us)
    plain, exchanging = summary(plain_us), summary(exchanging_us)
    return {
        "empty_await_us": baseline,
        "hit_us": hit,
        "hit_minus_empty_us": hit["median"] - baseline["median"],
        "request_without_exchange_us": plain,
        "request_with_exchange_us": exchanging,
        "fresh_request_first_hit_us": exchanging["median"] - plain["median"],
        "target_us": TARGET_HIT_US,
        "target_met": hit["median"] <= TARGET_HIT_US,
    }


# -- 2. burst ----------------------------------------------------------------------------------


async def run_requests(wrapped: ASGIApp, token: str, n: int) -> tuple[float, float]:
    """``n`` concurrent requests to ``/exchange`` (checked): their start and wall seconds."""
    headers = headers_for(token)
    scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(n)]
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        await asyncio.gather(*(wrapped(scope, receive, record) for scope in scopes))
        wall = time.perf_counter() - start
    finally:
        gc.enable()
    if statuses != [200] * n:
        fail(f"burst: {n - statuses.count(200)} of {n} requests were not answered 200")
    grants = {id(scope["state"]["grant"]) for scope in scopes}
    if len(grants) != 1:
        fail(f"burst: {n} identical requests got {len(grants)} different grants")
    return start, wall


PHASES = ("posted", "received", "answered")


def phases(timeline: Timeline, start: float, into: dict[str, list[float]]) -> None:
    """Append the ms from ``start`` to the one token request's three instants."""
    instants = (timeline.posted, timeline.received, timeline.answered)
    if any(len(instant) != 1 for instant in instants):
        fail(f"burst: the timeline recorded {[len(i) for i in instants]} token requests")
    for phase, instant in zip(PHASES, instants, strict=True):
        into[phase].append((instant[0] - start) * 1000)


async def burst(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, timeline: Timeline, config: Config
) -> dict[str, Any]:
    auth.token_latency = BURST_LATENCY
    token = auth.mint("alice", audience=RESOURCE, scope="read")
    single_ms: list[float] = []
    burst_ms: list[float] = []
    warm_burst_ms: list[float] = []
    cold_all_ms: list[float] = []
    burst_token_calls: list[int] = []
    cold_all_calls: list[dict[str, int]] = []
    concurrent_calls: list[int] = []
    sequential_calls: list[int] = []
    single_phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    burst_phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    n = config.burst_size
    for _ in range(config.burst_rounds):
        # One cold exchange: a fresh middleware (empty grant cache) whose metadata, JWKS and
        # validation of the user's token are warmed by one request that exchanges nothing.
        wrapped = middleware(auth, client)
        await capture(wrapped, token)
        before = token_calls(auth)
        timeline.clear()
        start, wall = await run_requests(wrapped, token, 1)
        single_ms.append(wall * 1000)
        phases(timeline, start, single_phases)
        if token_calls(auth) - before != 1:
            fail("burst: one cold exchange did not make exactly one token request")
        # The burst: the same, with n concurrent requests.
        wrapped = middleware(auth, client)
        await capture(wrapped, token)
        before = token_calls(auth)
        timeline.clear()
        start, wall = await run_requests(wrapped, token, n)
        burst_ms.append(wall * 1000)
        burst_token_calls.append(token_calls(auth) - before)
        phases(timeline, start, burst_phases)
        # The same n requests again, the grant now cached: what the burst costs besides waiting.
        _, wall = await run_requests(wrapped, token, n)
        warm_burst_ms.append(wall * 1000)
        # Informational: everything cold (metadata, JWKS, token validation and grant).
        wrapped = middleware(auth, client)
        before_counts = dict(auth.requests)
        _, wall = await run_requests(wrapped, token, n)
        cold_all_ms.append(wall * 1000)
        cold_all_calls.append(
            {path: count - before_counts.get(path, 0) for path, count in auth.requests.items()}
        )
        # The issue's cases: identical requests, concurrent, and one after the other.
        wrapped = middleware(auth, client)
        before = token_calls(auth)
        await run_requests(wrapped, token, ISSUE_CONCURRENT)
        concurrent_calls.append(token_calls(auth) - before)
        wrapped = middleware(auth, client)
        before = token_calls(auth)
        for _ in range(ISSUE_SEQUENTIAL):
            await run_requests(wrapped, token, 1)
        sequential_calls.append(token_calls(auth) - before)
    auth.token_latency = 0.0
    single, burst_s = summary(single_ms), summary(burst_ms)
    ratio = burst_s["median"] / single["median"]
    cold_all_totals = {
        path: max(c.get(path, 0) for c in cold_all_calls)
        for path in sorted({p for c in cold_all_calls for p in c})
    }
    return {
        "burst_size": n,
        "token_latency_s": BURST_LATENCY,
        "single_cold_exchange_ms": single,
        "single_token_request_ms": {k: summary(v) for k, v in single_phases.items()},
        "burst_ms": burst_s,
        "burst_token_request_ms": {k: summary(v) for k, v in burst_phases.items()},
        "ratio_burst_to_single": ratio,
        "token_calls_per_burst": {"min": min(burst_token_calls), "max": max(burst_token_calls)},
        "warm_burst_ms": summary(warm_burst_ms),
        "all_cold_burst_ms": summary(cold_all_ms),
        "all_cold_burst_requests_max": cold_all_totals,
        "issue_concurrent_requests": ISSUE_CONCURRENT,
        "issue_concurrent_token_calls_max": max(concurrent_calls),
        "issue_sequential_requests": ISSUE_SEQUENTIAL,
        "issue_sequential_token_calls_max": max(sequential_calls),
        "target_token_calls": TARGET_BURST_TOKEN_CALLS,
        "target_ratio": TARGET_BURST_RATIO,
        "target_met": max(burst_token_calls) <= TARGET_BURST_TOKEN_CALLS
        and ratio <= TARGET_BURST_RATIO,
        "token_calls_target_met": max(burst_token_calls) <= TARGET_BURST_TOKEN_CALLS,
        "ratio_target_met": ratio <= TARGET_BURST_RATIO,
    }


# -- 3. cold exchange against a bare POST ------------------------------------------------------


def bare_form(subject_token: str) -> dict[str, str]:
    """The form the middleware sends with its defaults (``exchange_target="resource"``)."""
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "resource": UPSTREAM,
    }


async def cold_exchange(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, rounds: int, k: int
) -> dict[str, Any]:
    auth.token_latency = 0.0
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    headers = {**HEADERS, "Authorization": f"Basic {basic}"}
    endpoint = auth.token_endpoint
    wrapped = middleware(auth, client)
    await capture(wrapped, auth.mint("alice", audience=RESOURCE))  # metadata and JWKS

    async def bare_post(form: dict[str, str]) -> None:
        response = await client.post(endpoint, data=form, headers=headers)
        if response.status_code != 200:
            fail(f"cold exchange: the bare POST was answered {response.status_code}")

    async def timed_exchanges(contexts: list[AccessContext]) -> float:
        before = token_calls(auth)
        iterator = iter(contexts)
        mean = await timed_loop(k, lambda: next(iterator).exchange(UPSTREAM))
        if token_calls(auth) - before != k:
            fail("cold exchange: an exchange did not make exactly one token request")
        return mean

    async def timed_posts(forms: list[dict[str, str]]) -> float:
        iterator = iter(forms)
        return await timed_loop(k, lambda: bare_post(next(iterator)))

    exchange_us: list[float] = []
    bare_us: list[float] = []
    for round_number in range(rounds):
        # Distinct tokens, so that every exchange misses the cache; each validated by a request
        # that exchanges nothing, before the timed batch.
        tokens = [auth.mint("alice", audience=RESOURCE) for _ in range(k)]
        contexts = [await capture(wrapped, token) for token in tokens]
        forms = [bare_form(token) for token in tokens]
        if round_number % 2:
            exchange_us.append(await timed_exchanges(contexts))
            bare_us.append(await timed_posts(forms))
        else:
            bare_us.append(await timed_posts(forms))
            exchange_us.append(await timed_exchanges(contexts))
        if not all(auth.verify(c.access(UPSTREAM).access_token) for c in contexts):
            fail("cold exchange: a grant is not a token of the authorization server")
    exchange, bare = summary(exchange_us), summary(bare_us)
    ratio = exchange["median"] / bare["median"]
    return {
        "rounds": rounds,
        "calls_per_round": k,
        "exchange_us": exchange,
        "bare_post_us": bare,
        "added_us": exchange["median"] - bare["median"],
        "ratio_exchange_to_bare": ratio,
        "target_ratio": TARGET_COLD_RATIO,
        "target_met": ratio <= TARGET_COLD_RATIO,
    }


# -- 4. memory per cached grant ----------------------------------------------------------------


async def fill(
    wrapped: DelegationMiddleware, template: AccessContext, token: str, n: int, salt: bytes
) -> float:
    """Put ``n`` grants in the middleware's grant cache through ``AccessContext.exchange``,
    the token endpoint replaced by an instant answer (a real token's size, made unique); seconds.
    """
    exchanger = template._exchanger
    valid, subject = template._valid, template._token

    def bodies() -> Iterator[bytes]:
        stem = token[:-12]
        for i in range(n):
            document = {
                "access_token": f"{stem}{i:012d}",
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": 300,
            }
            yield json.dumps(document).encode()

    answers = bodies()

    async def scripted(
        subject_token: str, resource: str, scope: str | None
    ) -> tuple[Grant, float | None]:
        return grant_from(resource, scope, next(answers))

    exchanger._request = scripted  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        for i in range(n):
            # What the middleware makes per request: the digest of a new user token.
            digest = hashlib.sha256(salt + i.to_bytes(8, "big")).digest()
            await AccessContext(valid, subject, digest, exchanger).exchange(UPSTREAM)
        return time.perf_counter() - start
    finally:
        del exchanger._request


async def memory(config: Config) -> dict[str, Any]:
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    client = auth.http_client()
    n = config.grants
    try:
        # A real exchange first, for a real grant's token size.
        wrapped = middleware(auth, client, grant_cache_size=n + 1)
        context = await capture(wrapped, auth.mint("alice", audience=RESOURCE, scope="read"))
        token = (await context.exchange(UPSTREAM)).access_token
        token_size = len(token)
        # Untraced, for the time an in-process miss takes (no HTTP).
        seconds = await fill(wrapped, context, token, n, b"timed")
        cached = len(wrapped._exchanger._cache)
        # Traced, on a fresh middleware.
        wrapped = middleware(auth, client, grant_cache_size=n + 1)
        context = await capture(wrapped, auth.mint("alice", audience=RESOURCE, scope="read"))
        gc.collect()
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            await fill(wrapped, context, token, n, b"traced")
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        traced_cached = len(wrapped._exchanger._cache)
    finally:
        await client.aclose()
    if cached != n + 1 or traced_cached != n:
        fail(f"memory: the grant cache holds {cached} and {traced_cached} grants, not {n + 1}")
    per_grant = (after - before) / n
    overhead = per_grant - token_size
    return {
        "grants": n,
        "bytes_per_grant": per_grant,
        "token_chars": token_size,
        "token_str_bytes": sys.getsizeof(token),
        "overhead_bytes": overhead,
        "in_process_miss_us": seconds / n * 1e6,
        "target_overhead_bytes": TARGET_MEMORY_OVERHEAD,
        "target_met": overhead <= TARGET_MEMORY_OVERHEAD,
    }


# -- report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> dict[str, str]:
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.python_compiler()})",
        "httpx": version("httpx"),
        "anyio": version("anyio"),
        "uvicorn": version("uvicorn"),
        "asgi_delegation": version("asgi-delegation"),
        "machine": f"{platform.platform()}, {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs",
    }


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    hit, bursts = results["cache_hit"], results["burst"]
    cold, mem = results["cold_exchange"], results["memory"]
    shipped = results["cold_exchange_shipped_serve"]
    lines = [
        "asgi_delegation token exchange benchmark",
        *(f"  {name:<16}{value}" for name, value in env.items()),
        f"  {'mode':<16}{mode}: {config.rounds} rounds of {config.hit_calls} hits; "
        f"{config.burst_rounds} bursts of {config.burst_size}; {config.cold_rounds} rounds of "
        f"{config.cold_calls} cold exchanges; {config.grants} cached grants",
        "  figures: median over rounds (min-max of the per-round values)",
        "",
    ]
    row = "  {:<58}{:>9}  {:<19}{}"

    def timed(label: str, stats: dict[str, float], digits: int = 2) -> str:
        spread = f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
        return row.format(label, f"{stats['median']:.{digits}f}", spread, "")

    calls = bursts["token_calls_per_burst"]
    calls_text = (
        str(calls["max"]) if calls["min"] == calls["max"] else f"{calls['min']}-{calls['max']}"
    )
    cold_all = bursts["all_cold_burst_requests_max"]
    n = bursts["burst_size"]
    lines += [
        "1. Cache hit (warm grant cache, in process)",
        row.format("", "µs/call", "range", "target"),
        timed("await (empty async def)()", hit["empty_await_us"]),
        timed("await ctx.exchange(R), cache hit", hit["hit_us"]),
        row.format(
            "  hit, per call",
            f"{hit['hit_us']['median']:.2f}",
            "",
            f"<= {TARGET_HIT_US:g} µs: {verdict(hit['target_met'])}",
        ),
        row.format("  hit minus the empty await", f"{hit['hit_minus_empty_us']:.2f}", "", ""),
        timed(
            "request through the middleware, app exchanges nothing",
            hit["request_without_exchange_us"],
        ),
        timed("the same request, app awaits ctx.exchange(R) once", hit["request_with_exchange_us"]),
        row.format(
            "  first hit of a fresh request (difference)",
            f"{hit['fresh_request_first_hit_us']:.2f}",
            "",
            "(informational)",
        ),
        "",
        f"2. Burst: {n} concurrent identical requests, cold grant cache, loopback token "
        f"endpoint with {bursts['token_latency_s'] * 1000:g} ms latency",
        row.format("", "ms", "range", "target"),
        timed("one cold exchange (one request)", bursts["single_cold_exchange_ms"]),
        timed(f"{n} concurrent requests, one grant between them", bursts["burst_ms"]),
        row.format(
            "  token-endpoint requests per burst",
            calls_text,
            "",
            f"<= {TARGET_BURST_TOKEN_CALLS}: {verdict(bursts['token_calls_target_met'])}",
        ),
        row.format(
            "  ratio burst / one cold exchange",
            f"{bursts['ratio_burst_to_single']:.2f}x",
            "",
            f"<= {TARGET_BURST_RATIO:g}x: {verdict(bursts['ratio_target_met'])}",
        ),
        *(
            timed(f"  ms from its start to its token request being {phase}", stats)
            for phase, stats in bursts["burst_token_request_ms"].items()
        ),
        timed(
            "  the same for one cold exchange: answered",
            bursts["single_token_request_ms"]["answered"],
        ),
        timed(f"the same {n} requests again, grant cached", bursts["warm_burst_ms"]),
        timed(f"{n} concurrent requests, everything cold", bursts["all_cold_burst_ms"]),
        row.format(
            "  its requests: /token, metadata, /jwks",
            f"{cold_all.get('/token', 0)}, "
            f"{cold_all.get('/.well-known/oauth-authorization-server', 0)}, "
            f"{cold_all.get('/jwks', 0)}",
            "",
            "(informational)",
        ),
        row.format(
            f"{ISSUE_CONCURRENT} concurrent identical requests: token requests",
            str(bursts["issue_concurrent_token_calls_max"]),
            "",
            f"(keycardai-starlette: {ISSUE_CONCURRENT})",
        ),
        row.format(
            f"{ISSUE_SEQUENTIAL} sequential identical requests: token requests",
            str(bursts["issue_sequential_token_calls_max"]),
            "",
            f"(keycardai-starlette: {ISSUE_SEQUENTIAL})",
        ),
        "",
        "3. Cold exchange vs a bare httpx POST of the same form (loopback, no latency)",
        row.format("", "µs/call", "range", "target"),
        timed("bare httpx.AsyncClient.post", cold["bare_post_us"], 0),
        timed("await ctx.exchange(R), cache miss", cold["exchange_us"], 0),
        row.format("  added by the middleware", f"{cold['added_us']:.0f}", "", ""),
        row.format(
            "  ratio exchange / bare POST",
            f"{cold['ratio_exchange_to_bare']:.2f}x",
            "",
            f"<= {TARGET_COLD_RATIO:g}x: {verdict(cold['target_met'])}",
        ),
        f"  the same through auth.serve() as shipped (no TCP_NODELAY; {shipped['rounds']} "
        f"rounds of {shipped['calls_per_round']})",
        timed("  bare httpx.AsyncClient.post", shipped["bare_post_us"], 0),
        timed("  await ctx.exchange(R), cache miss", shipped["exchange_us"], 0),
        row.format(
            "    ratio exchange / bare POST",
            f"{shipped['ratio_exchange_to_bare']:.2f}x",
            "",
            "(informational)",
        ),
        "",
        f"4. Memory per cached grant ({mem['grants']} grants, tracemalloc)",
        row.format("", "bytes", "", "target"),
        row.format("held per grant", f"{mem['bytes_per_grant']:.0f}", "", ""),
        row.format(
            f"  token size (chars; the str object is {mem['token_str_bytes']} bytes)",
            str(mem["token_chars"]),
            "",
            "",
        ),
        row.format(
            "  per grant minus token size",
            f"{mem['overhead_bytes']:.0f}",
            "",
            f"<= {TARGET_MEMORY_OVERHEAD}: {verdict(mem['target_met'])}",
        ),
        row.format(
            "in-process miss, instant scripted answer (µs/grant)",
            f"{mem['in_process_miss_us']:.1f}",
            "",
            "(informational)",
        ),
    ]
    return "\n".join(line.rstrip() for line in lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_exchange",
        description="Token exchange through DelegationMiddleware: cache hit cost, a burst of "
        "identical requests, a cold exchange against a bare POST, memory per cached grant.",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        help=f"interleaved rounds for the hit and cold-exchange figures (default "
        f"{DEFAULT.rounds}; {QUICK.rounds} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller runs: {QUICK.burst_rounds} bursts, {QUICK.grants} cached grants "
        f"(default {DEFAULT.burst_rounds} and {DEFAULT.grants})",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


async def run(config: Config) -> dict[str, Any]:
    results = {"cache_hit": await cache_hit(config)}
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    timeline = Timeline([], [], [])
    hooks: dict[str, list[Callable[..., Any]]] = {
        "request": [timeline.on_request],
        "response": [timeline.on_response],
    }
    async with (
        served(auth, nodelay=True, timeline=timeline),
        httpx.AsyncClient(timeout=30, event_hooks=hooks) as client,
    ):
        results["burst"] = await burst(auth, client, timeline, config)
        results["cold_exchange"] = await cold_exchange(
            auth, client, config.cold_rounds, config.cold_calls
        )
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    async with served(auth, nodelay=False), httpx.AsyncClient(timeout=30) as client:
        results["cold_exchange_shipped_serve"] = await cold_exchange(
            auth, client, config.shipped_rounds, config.shipped_calls
        )
    results["memory"] = await memory(config)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(
        **{
            **asdict(base),
            "rounds": args.rounds or base.rounds,
            "cold_rounds": args.rounds or base.cold_rounds,
        }
    )
    mode = "quick" if args.quick else "default"
    env = environment()
    started = time.perf_counter()
    results = asyncio.run(run(config))
    seconds = time.perf_counter() - started
    if args.json:
        document = {"environment": env, "mode": mode, "config": asdict(config), **results}
        document["seconds"] = seconds
        print(json.dumps(document, indent=2))
    else:
        print(render(env, config, mode, results))
        print(f"\n  (ran in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
