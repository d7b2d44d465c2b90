"""Token exchange benchmarks of DelegationMiddleware, measured side by side in one run.

1. Cache hit: ``await ctx.exchange(R)`` on a warm grant cache, against an empty ``async def``
   awaited the same way. Target: at most 3 µs per hit. Also the first hit of a fresh request:
   a request through the middleware whose app exchanges, minus one whose app does not.
2. Burst: 1,000 concurrent identical requests (same user token and resource, cold grant cache)
   against ``LocalAuthorizationServer.serve()`` with 20 ms of token-endpoint latency. Targets:
   one token-endpoint request per burst, and a wall time at most 1.5x one cold exchange. Also
   the issue's cases: 200 concurrent and 10 sequential identical requests. Where the time goes:
   the event loop thread's CPU time, and when the token request was posted and answered (httpx
   event hooks), from the burst's start.
3. Cold exchange against a bare ``httpx.AsyncClient.post`` of the same form and client
   authentication to the same loopback token endpoint, no latency. Target: at most 1.2x.
4. Memory: the bytes ``tracemalloc`` sees held per cached grant, the grant cache filled through
   ``AccessContext.exchange`` with the token endpoint replaced by an instant scripted answer.
   Target: at most the grant's token size + 600 bytes.

The ASGI callables are awaited directly (hand-made scopes) in one asyncio event loop; the
loopback server is uvicorn on its own thread of the same process. Each figure is the median over
rounds of a batch's per-call mean (bursts: of the wall time). The garbage collector is paused
while a batch is timed, as ``timeit`` does.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_exchange            # ~40 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_exchange --quick    # ~10 s
    .venv/bin/python -m benchmarks.bench_exchange --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import httpx

from asgi_delegation import AccessContext, DelegationMiddleware, Grant
from asgi_delegation._exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE
from asgi_delegation._fetch import HEADERS
from asgi_delegation._token_response import grant_from
from asgi_delegation._types import Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import RESOURCE, discard, gc_paused, headers_for, http_scope, summary, verdict

UPSTREAM = "https://api.upstream.example/v1"  # what the grants are for
CLIENT_ID, CLIENT_SECRET = "app", "s"
EXCHANGE_PATH, PLAIN_PATH = "/exchange", "/plain"

TARGET_HIT_US = 3.0
TARGET_BURST_CALLS = 1
TARGET_BURST_RATIO = 1.5
TARGET_COLD_RATIO = 1.2
TARGET_MEMORY_OVERHEAD = 600
BURST_LATENCY = 0.02
# The issue's cases: keycardai-starlette, with no cache, made 200 token-endpoint calls for 200
# concurrent identical requests and 10 for 10 sequential ones.
ISSUE_CONCURRENT, ISSUE_SEQUENTIAL = 200, 10


@dataclass(frozen=True)
class Config:
    rounds: int
    hit_calls: int
    bursts: int
    burst_size: int
    cold_calls: int
    grants: int


DEFAULT = Config(
    rounds=30, hit_calls=5000, bursts=15, burst_size=1000, cold_calls=20, grants=100_000
)
QUICK = Config(rounds=7, hit_calls=2000, bursts=3, burst_size=1000, cold_calls=10, grants=20_000)


# -- the ASGI pieces ---------------------------------------------------------------------------


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """On ``/exchange``: one ``await ctx.exchange(UPSTREAM)``, the grant kept in the scope's
    state for the checks; any other path: nothing. Then answers 200 with a tiny body."""
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


receive = _common.receiver("tools/call")


async def empty() -> None:
    pass


def authorization_server() -> LocalAuthorizationServer:
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    return auth


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


def fail(message: str) -> NoReturn:
    _common.abort("bench_exchange", message)


async def capture(wrapped: DelegationMiddleware, token: str) -> AccessContext:
    """The access context of one checked request that exchanges nothing (it warms the
    metadata, the JWKS and the token's validation)."""
    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token), PLAIN_PATH)
    await wrapped(scope, receive, record)
    context = scope.get("state", {}).get("access_context")
    if statuses != [200] or context is None or context.subject != "alice":
        fail(f"a warm-up request was answered {statuses}, or reached the app without alice")
    assert isinstance(context, AccessContext)
    return context


def token_calls(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


# -- timing ------------------------------------------------------------------------------------


async def mean_us(awaitables: Iterable[Awaitable[object]]) -> float:
    """Per-call mean of awaiting each of ``awaitables`` in turn, in µs."""
    with gc_paused():
        n = 0
        start = time.perf_counter_ns()
        for awaitable in awaitables:
            await awaitable
            n += 1
        elapsed = time.perf_counter_ns() - start
    return elapsed / n / 1000


def summaries(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {name: summary(values) for name, values in samples.items()}


# -- 1. cache hit ------------------------------------------------------------------------------


async def cache_hit(config: Config) -> dict[str, Any]:
    auth = authorization_server()
    async with auth.http_client() as client:
        wrapped = middleware(auth, client)
        token = auth.mint("alice", audience=RESOURCE, scope="read")
        context = await capture(wrapped, token)
        first = await context.exchange(UPSTREAM)
        if token_calls(auth) != 1 or await context.exchange(UPSTREAM) is not first:
            fail("cache hit: the warm-up did not make one exchange and then hit the cache")
        headers, n = headers_for(token), config.hit_calls
        samples: dict[str, list[float]] = defaultdict(list)
        for _ in range(config.rounds):
            samples["empty_await_us"].append(await mean_us(empty() for _ in range(n)))
            samples["hit_us"].append(await mean_us(context.exchange(UPSTREAM) for _ in range(n)))
            scopes = [http_scope(headers, PLAIN_PATH) for _ in range(n)]
            samples["plain_request_us"].append(
                await mean_us(wrapped(s, receive, discard) for s in scopes)
            )
            scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(n)]
            samples["hit_request_us"].append(
                await mean_us(wrapped(s, receive, discard) for s in scopes)
            )
            if not all(scope["state"]["grant"] is first for scope in scopes):
                fail("cache hit: a fresh request did not get the cached grant")
        if token_calls(auth) != 1:
            fail("cache hit: the timed hits reached the token endpoint")
    results: dict[str, Any] = summaries(samples)
    hit = results["hit_us"]["median"]
    results["hit_minus_empty_us"] = hit - results["empty_await_us"]["median"]
    results["fresh_request_first_hit_us"] = (
        results["hit_request_us"]["median"] - results["plain_request_us"]["median"]
    )
    results["target_met"] = hit <= TARGET_HIT_US
    return results


# -- 2. burst ----------------------------------------------------------------------------------


class Timeline:
    """``perf_counter`` instants of token requests: the client starting one (an httpx request
    hook), and receiving the head of its answer (a response hook)."""

    def __init__(self) -> None:
        self.posted: list[float] = []
        self.answered: list[float] = []

    async def on_request(self, request: httpx.Request) -> None:
        if request.url.path == "/token":
            self.posted.append(time.perf_counter())

    async def on_response(self, response: httpx.Response) -> None:
        if response.request.url.path == "/token":
            self.answered.append(time.perf_counter())


async def concurrent(
    wrapped: DelegationMiddleware, token: str, n: int
) -> tuple[float, float, float]:
    """``n`` concurrent requests to ``/exchange``, checked: the ``perf_counter`` at their start,
    their wall time and the event loop thread's CPU time, in ms."""
    headers = headers_for(token)
    scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(n)]
    statuses, record = _common.status_recorder()
    with gc_paused():
        cpu, start = time.thread_time(), time.perf_counter()
        await asyncio.gather(*(wrapped(scope, receive, record) for scope in scopes))
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    if statuses != [200] * n:
        fail(f"burst: {n - statuses.count(200)} of {n} requests were not answered 200")
    if len({id(scope["state"]["grant"]) for scope in scopes}) != 1:
        fail(f"burst: {n} identical requests did not all get the same grant")
    return start, wall * 1000, cpu * 1000


async def burst(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, timeline: Timeline, config: Config
) -> dict[str, Any]:
    auth.token_latency = BURST_LATENCY
    token = auth.mint("alice", audience=RESOURCE, scope="read")
    samples: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)
    for _ in range(config.bursts):
        # One request, then the burst, each on a fresh middleware (empty grant cache) whose
        # metadata, JWKS and validation of the user's token are warmed by one request.
        for size, name in ((1, "single"), (config.burst_size, "burst")):
            wrapped = middleware(auth, client)
            await capture(wrapped, token)
            before = token_calls(auth)
            timeline.posted.clear()
            timeline.answered.clear()
            start, wall, cpu = await concurrent(wrapped, token, size)
            counts[f"{name}_token_calls"].append(token_calls(auth) - before)
            if len(timeline.posted) != 1 or len(timeline.answered) != 1:
                fail(f"burst: the timeline holds {len(timeline.posted)} token requests, not 1")
            samples[f"{name}_ms"].append(wall)
            samples[f"{name}_cpu_ms"].append(cpu)
            samples[f"{name}_posted_ms"].append((timeline.posted[0] - start) * 1000)
            samples[f"{name}_answered_ms"].append((timeline.answered[0] - start) * 1000)
        # The same requests again, the grant cached: what the burst costs besides waiting.
        samples["cached_burst_ms"].append((await concurrent(wrapped, token, config.burst_size))[1])
        # Informational: everything cold (metadata, JWKS, the token's validation, the grant).
        before_counts = auth.requests.copy()
        wrapped = middleware(auth, client)
        _, wall, cpu = await concurrent(wrapped, token, config.burst_size)
        samples["cold_burst_ms"].append(wall)
        samples["cold_burst_cpu_ms"].append(cpu)
        for path, count in (auth.requests - before_counts).items():
            counts[f"cold_burst {path}"].append(count)
        # The issue's cases: identical requests, concurrent, and one after the other.
        before = token_calls(auth)
        await concurrent(middleware(auth, client), token, ISSUE_CONCURRENT)
        counts["issue_concurrent_token_calls"].append(token_calls(auth) - before)
        wrapped, before = middleware(auth, client), token_calls(auth)
        for _ in range(ISSUE_SEQUENTIAL):
            await concurrent(wrapped, token, 1)
        counts["issue_sequential_token_calls"].append(token_calls(auth) - before)
    auth.token_latency = 0.0
    if max(counts["single_token_calls"]) != 1:
        fail("burst: one cold exchange did not make exactly one token request")
    results: dict[str, Any] = summaries(samples)
    results.update({name: max(values) for name, values in counts.items()})
    ratio = results["burst_ms"]["median"] / results["single_ms"]["median"]
    results["ratio_burst_to_single"] = ratio
    results["calls_target_met"] = results["burst_token_calls"] <= TARGET_BURST_CALLS
    results["ratio_target_met"] = ratio <= TARGET_BURST_RATIO
    return results


# -- 3. cold exchange against a bare POST ------------------------------------------------------


async def cold_exchange(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, config: Config
) -> dict[str, Any]:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    headers = {**HEADERS, "Authorization": f"Basic {basic}"}
    wrapped = middleware(auth, client)
    await capture(wrapped, auth.mint("alice", audience=RESOURCE))  # metadata and JWKS

    async def bare_post(subject_token: str) -> None:
        # The form the middleware sends with its defaults (exchange_target="resource").
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "resource": UPSTREAM,
        }
        response = await client.post(auth.token_endpoint, data=form, headers=headers)
        if response.status_code != 200:
            fail(f"cold exchange: the bare POST was answered {response.status_code}")

    samples: dict[str, list[float]] = defaultdict(list)
    for round_number in range(config.rounds):
        # Distinct tokens, so that every exchange misses the cache; each validated by a request
        # that exchanges nothing, before the timed batch. The order alternates by round.
        tokens = [auth.mint("alice", audience=RESOURCE) for _ in range(config.cold_calls)]
        contexts = [await capture(wrapped, token) for token in tokens]
        before = token_calls(auth)
        order = ("exchange_us", "bare_post_us")
        for batch in order[:: 1 if round_number % 2 else -1]:
            if batch == "exchange_us":
                mean = await mean_us(c.exchange(UPSTREAM) for c in contexts)
            else:
                mean = await mean_us(bare_post(token) for token in tokens)
            samples[batch].append(mean)
        if token_calls(auth) - before != 2 * len(tokens):
            fail("cold exchange: not one token request per exchange and per bare POST")
        if not all(auth.verify(c.access(UPSTREAM).access_token) for c in contexts):
            fail("cold exchange: a grant is not a token of the authorization server")
    results: dict[str, Any] = summaries(samples)
    exchange, bare = results["exchange_us"]["median"], results["bare_post_us"]["median"]
    results["added_us"] = exchange - bare
    results["ratio_exchange_to_bare"] = exchange / bare
    results["target_met"] = exchange / bare <= TARGET_COLD_RATIO
    return results


# -- 4. memory per cached grant ----------------------------------------------------------------


async def fill(template: AccessContext, token: str, n: int, salt: bytes) -> float:
    """Put ``n`` grants in the template's grant cache through ``AccessContext.exchange``, the
    token endpoint replaced by an instant answer (a real token's size, made unique); seconds."""
    exchanger = template._exchanger
    stem = token[:-12]
    bodies = (
        json.dumps(
            {
                "access_token": f"{stem}{i:012d}",
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": 300,
            }
        ).encode()
        for i in range(n)
    )

    async def scripted(
        subject_token: str, resource: str, scope: str | None, trace: object
    ) -> tuple[Grant, float | None]:
        return grant_from(resource, scope, next(bodies))

    exchanger._request = scripted  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        for i in range(n):
            # What the middleware makes per request: the digest of a new user token.
            digest = hashlib.sha256(salt + i.to_bytes(8, "big")).digest()
            await AccessContext(template._valid, template._token, digest, exchanger).exchange(
                UPSTREAM
            )
        return time.perf_counter() - start
    finally:
        del exchanger._request


async def memory(config: Config) -> dict[str, Any]:
    auth = authorization_server()
    n = config.grants
    async with auth.http_client() as client:
        # A real exchange first, for a real grant's token size.
        context = await capture(
            middleware(auth, client, grant_cache_size=n + 1),
            auth.mint("alice", audience=RESOURCE, scope="read"),
        )
        token = (await context.exchange(UPSTREAM)).access_token
        # Untraced, for the time an in-process miss takes (no HTTP).
        seconds = await fill(context, token, n, b"timed")
        cached = len(context._exchanger._grants)
        # Traced, on a fresh middleware.
        context = await capture(
            middleware(auth, client, grant_cache_size=n + 1),
            auth.mint("alice", audience=RESOURCE, scope="read"),
        )
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await fill(context, token, n, b"traced")
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    if cached != n + 1 or len(context._exchanger._grants) != n:
        fail(f"memory: the grant caches do not hold {n + 1} and {n} grants")
    per_grant = (after - before) / n
    overhead = per_grant - len(token)
    return {
        "grants": n,
        "bytes_per_grant": per_grant,
        "token_chars": len(token),
        "token_str_bytes": sys.getsizeof(token),
        "overhead_bytes": overhead,
        "in_process_miss_us": seconds / n * 1e6,
        "target_met": overhead <= TARGET_MEMORY_OVERHEAD,
    }


# -- report ------------------------------------------------------------------------------------


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    hit, bursts = results["cache_hit"], results["burst"]
    cold, mem = results["cold_exchange"], results["memory"]
    n = config.burst_size
    lines = _common.heading(
        "asgi_delegation token exchange benchmark",
        env,
        f"{mode}: {config.rounds} rounds of {config.hit_calls} hits; {config.bursts} bursts "
        f"of {n}; {config.rounds} rounds of {config.cold_calls} cold exchanges; "
        f"{config.grants} cached grants",
        "median over rounds (min-max of the per-round values)",
    )
    row = "  {:<58}{:>9}  {:<19}{}"

    def timed(label: str, stats: dict[str, float], digits: int = 2) -> str:
        spread = f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
        return row.format(label, f"{stats['median']:.{digits}f}", spread, "")

    def figure(label: str, value: str, target: str = "") -> str:
        return row.format(label, value, "", target)

    cold_calls = ", ".join(
        str(bursts.get(f"cold_burst {path}", 0))
        for path in ("/token", "/.well-known/oauth-authorization-server", "/jwks")
    )
    lines += [
        "1. Cache hit (warm grant cache, in process)",
        row.format("", "µs/call", "range", "target"),
        timed("await (empty async def)()", hit["empty_await_us"]),
        timed("await ctx.exchange(R), cache hit", hit["hit_us"]),
        figure("  hit minus the empty await", f"{hit['hit_minus_empty_us']:.2f}"),
        figure(
            "  hit, per call",
            f"{hit['hit_us']['median']:.2f}",
            f"<= {TARGET_HIT_US:g} µs: {verdict(hit['target_met'])}",
        ),
        timed("request through the middleware, app exchanges nothing", hit["plain_request_us"]),
        timed("the same request, app awaits ctx.exchange(R) once", hit["hit_request_us"]),
        figure(
            "  first hit of a fresh request (difference)",
            f"{hit['fresh_request_first_hit_us']:.2f}",
            "(informational)",
        ),
        "",
        f"2. Burst: {n} concurrent identical requests, cold grant cache, loopback token "
        f"endpoint with {BURST_LATENCY * 1000:g} ms latency",
        row.format("", "ms", "range", "target"),
        timed("one cold exchange (one request)", bursts["single_ms"]),
        timed("  its event-loop thread CPU time", bursts["single_cpu_ms"]),
        timed("  its token request posted (ms from the start)", bursts["single_posted_ms"]),
        timed("  its token request answered", bursts["single_answered_ms"]),
        timed(f"{n} concurrent requests, one grant between them", bursts["burst_ms"]),
        figure(
            "  token-endpoint requests per burst",
            str(bursts["burst_token_calls"]),
            f"<= {TARGET_BURST_CALLS}: {verdict(bursts['calls_target_met'])}",
        ),
        figure(
            "  ratio burst / one cold exchange",
            f"{bursts['ratio_burst_to_single']:.2f}x",
            f"<= {TARGET_BURST_RATIO:g}x: {verdict(bursts['ratio_target_met'])}",
        ),
        timed("  its event-loop thread CPU time", bursts["burst_cpu_ms"]),
        timed("  its token request posted (ms from the start)", bursts["burst_posted_ms"]),
        timed("  its token request answered", bursts["burst_answered_ms"]),
        timed(f"the same {n} requests again, grant cached", bursts["cached_burst_ms"]),
        timed(f"{n} concurrent requests, everything cold", bursts["cold_burst_ms"]),
        timed("  its event-loop thread CPU time", bursts["cold_burst_cpu_ms"]),
        figure("  its requests: /token, metadata, /jwks", cold_calls, "(informational)"),
        figure(
            f"{ISSUE_CONCURRENT} concurrent identical requests: token requests",
            str(bursts["issue_concurrent_token_calls"]),
            f"(keycardai-starlette: {ISSUE_CONCURRENT})",
        ),
        figure(
            f"{ISSUE_SEQUENTIAL} sequential identical requests: token requests",
            str(bursts["issue_sequential_token_calls"]),
            f"(keycardai-starlette: {ISSUE_SEQUENTIAL})",
        ),
        "",
        "3. Cold exchange vs a bare httpx POST of the same form (loopback, no latency)",
        row.format("", "µs/call", "range", "target"),
        timed("bare httpx.AsyncClient.post", cold["bare_post_us"], 0),
        timed("await ctx.exchange(R), cache miss", cold["exchange_us"], 0),
        figure("  added by the middleware", f"{cold['added_us']:.0f}"),
        figure(
            "  ratio exchange / bare POST",
            f"{cold['ratio_exchange_to_bare']:.2f}x",
            f"<= {TARGET_COLD_RATIO:g}x: {verdict(cold['target_met'])}",
        ),
        "",
        f"4. Memory per cached grant ({mem['grants']} grants, tracemalloc)",
        row.format("", "bytes", "", "target"),
        figure("held per grant", f"{mem['bytes_per_grant']:.0f}"),
        figure(
            f"  token size (chars; the str object is {mem['token_str_bytes']} bytes)",
            str(mem["token_chars"]),
        ),
        figure(
            "  per grant minus token size",
            f"{mem['overhead_bytes']:.0f}",
            f"<= {TARGET_MEMORY_OVERHEAD}: {verdict(mem['target_met'])}",
        ),
        figure(
            "in-process miss, instant scripted answer (µs/grant)",
            f"{mem['in_process_miss_us']:.1f}",
            "(informational)",
        ),
    ]
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_exchange",
        description="Token exchange through DelegationMiddleware: cache hit cost, a burst of "
        "identical requests, a cold exchange against a bare POST, memory per cached grant.",
        rounds_help=f"rounds for the hit and cold-exchange figures (default {DEFAULT.rounds}; "
        f"{QUICK.rounds} with --quick)",
        quick_help=f"smaller runs: {QUICK.bursts} bursts, {QUICK.grants} cached grants "
        f"(default {DEFAULT.bursts} and {DEFAULT.grants})",
    )


async def run(config: Config) -> dict[str, Any]:
    results = {"cache_hit": await cache_hit(config)}
    auth = authorization_server()
    timeline = Timeline()
    hooks: dict[str, list[Callable[..., Any]]] = {
        "request": [timeline.on_request],
        "response": [timeline.on_response],
    }
    async with auth.serve(), httpx.AsyncClient(timeout=30, event_hooks=hooks) as client:
        results["burst"] = await burst(auth, client, timeline, config)
        results["cold_exchange"] = await cold_exchange(auth, client, config)
    results["memory"] = await memory(config)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(**{**asdict(base), "rounds": args.rounds or base.rounds})
    env = _common.environment("httpx", "anyio", "uvicorn")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
