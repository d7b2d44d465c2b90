"""Token exchange benchmarks of DelegationMiddleware, measured side by side in one run.

1. Cache hit: ``await ctx.exchange(R)`` on a warm grant cache, against an empty ``async def``
   awaited the same way. Target: at most 3 µs per hit. Also the first hit of a fresh request:
   a request through the middleware whose app exchanges, minus one whose app does not.
2. Burst: 1,000 concurrent identical requests (same user token and resource, grant cache cold:
   a new user each burst, the token validated by one request first) against
   ``LocalAuthorizationServer.serve()`` with 20 ms of token-endpoint latency, all on one
   middleware, as a server has. Targets: one token-endpoint request per burst, and a wall time
   at most 1.5x one cold exchange (a new user's one request), the median of at least 5 bursts
   against the median of as many cold exchanges. Also the issue's cases: 200 concurrent and 10
   sequential identical requests. Where the time goes: the event loop thread's CPU time, and
   when the token request was posted and answered (httpx event hooks), from the burst's start.
3. Cold exchange against a bare ``httpx.AsyncClient.post`` of the same form and client
   authentication to the same loopback token endpoint, no latency. Target: at most 1.2x.
4. Memory, by ``tracemalloc``: (a) per cached user, a validated token and its grant, filled by
   one request per user through the middleware (its app exchanging once), beyond the two token
   strings (the user's and the grant's); without the MCP SDK (this process) and with it
   imported before the middleware is built and the principal read by the app as the SDK's
   transport does (a second interpreter, ``--sdk``, launched by the main run: importing the SDK
   is for the whole process). Target: at most 1,200 bytes, in both. (b) Per cached grant, the
   grant cache filled through ``AccessContext.exchange``. Target: at most the grant's token
   size + 600 bytes. The token endpoint is replaced by an instant scripted answer (a real
   token's size, made unique) for both.

The ASGI callables are awaited directly (hand-made scopes, built before a batch and each freed
when its request is over) in one asyncio event loop; the loopback server is uvicorn on its own
thread of the same process. Each figure is the median over rounds of a batch's per-call mean
(bursts: of the wall time). The garbage collector is ON in every timed batch, as users run the
package; rows labelled "best case: GC paused" repeat a figure with it collected and paused while
the batch is timed, as ``timeit`` does, and are never the headline.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_exchange            # ~1 min on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_exchange --quick    # ~20 s
    .venv/bin/python -m benchmarks.bench_exchange --json     # the figures as JSON
    .venv/bin/python -m benchmarks.bench_exchange --sdk      # section 4a with the SDK, alone
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import itertools
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
from asgi_delegation._types import ASGIApp, Message, Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import (
    BEST_CASE,
    RESOURCE,
    discard,
    handed_out,
    headers_for,
    http_scope,
    summary,
    timed_gc,
    verdict,
)

UPSTREAM = "https://api.upstream.example/v1"  # what the grants are for
CLIENT_ID, CLIENT_SECRET = "app", "s"
EXCHANGE_PATH, PLAIN_PATH = "/exchange", "/plain"

TARGET_HIT_US = 3.0
TARGET_BURST_CALLS = 1
TARGET_BURST_RATIO = 1.5
TARGET_COLD_RATIO = 1.2
TARGET_MEMORY_OVERHEAD = 600
TARGET_USER_MEMORY = 1200
BURST_LATENCY = 0.02
MIN_BURSTS = 5
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
    users: int  # section 4a: validated tokens and grants cached


DEFAULT = Config(
    rounds=30,
    hit_calls=5000,
    bursts=15,
    burst_size=1000,
    cold_calls=20,
    grants=100_000,
    users=10_000,
)
QUICK = Config(
    rounds=7, hit_calls=2000, bursts=5, burst_size=1000, cold_calls=10, grants=20_000, users=2000
)


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
    auth: LocalAuthorizationServer,
    client: httpx.AsyncClient,
    application: ASGIApp = app,
    **options: Any,
) -> DelegationMiddleware:
    return DelegationMiddleware(
        application,
        issuer=auth.issuer,
        resource=RESOURCE,
        http_client=client,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        **options,
    )


def fail(message: str) -> NoReturn:
    _common.abort("bench_exchange", message)


async def capture(
    wrapped: DelegationMiddleware, token: str, subject: str = "alice"
) -> AccessContext:
    """The access context of one checked request that exchanges nothing (it warms the
    metadata, the JWKS and the token's validation)."""
    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token), PLAIN_PATH)
    await wrapped(scope, receive, record)
    context = scope.get("state", {}).get("access_context")
    if statuses != [200] or context is None or context.subject != subject:
        fail(f"a warm-up request was answered {statuses}, or reached the app without {subject}")
    assert isinstance(context, AccessContext)
    return context


def token_calls(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


def grant_hits(wrapped: DelegationMiddleware) -> int:
    hits: int = wrapped.stats()["caches"]["grants"]["hit"]
    return hits


# -- timing ------------------------------------------------------------------------------------


async def mean_us(awaitables: Iterable[Awaitable[object]], *, paused: bool = False) -> float:
    """Per-call mean of awaiting each of ``awaitables`` in turn, in µs."""
    with timed_gc(paused=paused):
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
            samples["hit_gc_paused_us"].append(
                await mean_us((context.exchange(UPSTREAM) for _ in range(n)), paused=True)
            )
            scopes = [http_scope(headers, PLAIN_PATH) for _ in range(n)]
            samples["plain_request_us"].append(
                await mean_us(wrapped(s, receive, discard) for s in handed_out(scopes))
            )
            scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(n)]
            hits = grant_hits(wrapped)
            samples["hit_request_us"].append(
                await mean_us(wrapped(s, receive, discard) for s in handed_out(scopes))
            )
            if grant_hits(wrapped) - hits != n:
                fail("cache hit: not every fresh request got the cached grant")
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
    wrapped: DelegationMiddleware, token: str, n: int, *, paused: bool = False
) -> tuple[float, float, float]:
    """``n`` concurrent requests to ``/exchange``, checked: the ``perf_counter`` at their start,
    their wall time and the event loop thread's CPU time, in ms."""
    headers = headers_for(token)
    scopes = [http_scope(headers, EXCHANGE_PATH) for _ in range(n)]
    statuses, record = _common.status_recorder()
    with timed_gc(paused=paused):
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
    users = itertools.count()

    def new_user() -> tuple[str, str]:
        subject = f"user{next(users)}"
        return subject, auth.mint(subject, audience=RESOURCE, scope="read")

    # One middleware for every cold exchange and burst, as a server has; metadata and JWKS
    # warmed by one request.
    wrapped = middleware(auth, client)
    await capture(wrapped, *reversed(new_user()))
    samples: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)

    async def cold(name: str, size: int, *, paused: bool = False) -> str:
        """``size`` concurrent requests of a new user, whose token one request validated
        first: nothing cached for their grant. Returns the token."""
        subject, token = new_user()
        await capture(wrapped, token, subject)
        before = token_calls(auth)
        timeline.posted.clear()
        timeline.answered.clear()
        start, wall, cpu = await concurrent(wrapped, token, size, paused=paused)
        counts[f"{name}_token_calls"].append(token_calls(auth) - before)
        if len(timeline.posted) != 1 or len(timeline.answered) != 1:
            fail(f"burst: the timeline holds {len(timeline.posted)} token requests, not 1")
        samples[f"{name}_ms"].append(wall)
        samples[f"{name}_cpu_ms"].append(cpu)
        samples[f"{name}_posted_ms"].append((timeline.posted[0] - start) * 1000)
        samples[f"{name}_answered_ms"].append((timeline.answered[0] - start) * 1000)
        return token

    for _ in range(config.bursts):
        await cold("single", 1)
        token = await cold("burst", config.burst_size)
        # The same requests again, the grant cached: what the burst costs besides waiting.
        samples["cached_burst_ms"].append((await concurrent(wrapped, token, config.burst_size))[1])
        await cold("single_gc_paused", 1, paused=True)
        await cold("burst_gc_paused", config.burst_size, paused=True)
        # Informational: everything cold (metadata, JWKS, the token's validation, the grant).
        before_counts = auth.requests.copy()
        _, wall, cpu = await concurrent(middleware(auth, client), new_user()[1], config.burst_size)
        samples["cold_burst_ms"].append(wall)
        samples["cold_burst_cpu_ms"].append(cpu)
        for path, count in (auth.requests - before_counts).items():
            counts[f"cold_burst {path}"].append(count)
        # The issue's cases: identical requests, concurrent, and one after the other.
        before = token_calls(auth)
        await concurrent(middleware(auth, client), new_user()[1], ISSUE_CONCURRENT)
        counts["issue_concurrent_token_calls"].append(token_calls(auth) - before)
        issue, token = middleware(auth, client), new_user()[1]
        before = token_calls(auth)
        for _ in range(ISSUE_SEQUENTIAL):
            await concurrent(issue, token, 1)
        counts["issue_sequential_token_calls"].append(token_calls(auth) - before)
    auth.token_latency = 0.0
    if max(counts["single_token_calls"]) != 1 or min(counts["single_token_calls"]) != 1:
        fail("burst: one cold exchange did not make exactly one token request")
    results: dict[str, Any] = summaries(samples)
    results.update({name: max(values) for name, values in counts.items()})
    results["bursts"] = len(samples["burst_ms"])
    ratio = results["burst_ms"]["median"] / results["single_ms"]["median"]
    results["ratio_burst_to_single"] = ratio
    results["gc_paused_ratio"] = (
        results["burst_gc_paused_ms"]["median"] / results["single_gc_paused_ms"]["median"]
    )
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


# -- 4. memory ---------------------------------------------------------------------------------


def scripted_answers(exchanger: Any, token: str, n: int) -> None:
    """The token endpoint of ``exchanger`` replaced by ``n`` instant answers, each a grant of
    ``token``'s size made unique (``del exchanger._request`` puts the real one back)."""
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

    exchanger._request = scripted


async def fill(template: AccessContext, token: str, n: int, salt: bytes) -> float:
    """Put ``n`` grants in the template's grant cache through ``AccessContext.exchange``, the
    token endpoint replaced by an instant answer (a real token's size, made unique); seconds."""
    exchanger = template._exchanger
    scripted_answers(exchanger, token, n)
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


async def memory_per_user(config: Config, *, sdk: bool) -> dict[str, Any]:
    """Section 4a: the bytes held per user, a validated token and its grant, filled by one
    request each through the middleware (its app exchanging once). With ``sdk``, the MCP SDK is
    imported before the middleware is built, and the app reads the principal first."""
    if sdk:
        if "mcp" in sys.modules:
            fail("--sdk: the MCP SDK was imported before the benchmark imported it")
        # As an MCP server does: the SDK imported before the middleware is built.
        import mcp
        import mcp.server.auth.middleware.bearer_auth  # noqa: F401
    elif "mcp" in sys.modules:
        fail("the MCP SDK is imported in the main run: section 4a would build its principal")
    reader = _common.PrincipalReader(then=app, subject=None) if sdk else None
    auth = authorization_server()
    n = config.users
    tokens = [auth.mint(f"user{i:06d}", audience=RESOURCE, scope="read") for i in range(n)]
    headers = [headers_for(token) for token in tokens]
    refused = 0

    async def count_refusals(message: Message) -> None:
        nonlocal refused
        if message["type"] == "http.response.start" and message["status"] != 200:
            refused += 1

    async with auth.http_client() as client:
        wrapped = middleware(
            auth,
            client,
            reader.app if reader else app,
            token_cache_size=n + 1,
            grant_cache_size=n + 1,
        )
        # Untraced: metadata, JWKS, and a real exchange, for a real grant's token size.
        context = await capture(wrapped, auth.mint("alice", audience=RESOURCE, scope="read"))
        grant_token = (await context.exchange(UPSTREAM)).access_token
        del context
        exchanger = wrapped._exchanger
        assert exchanger is not None
        scripted_answers(exchanger, grant_token, n)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for header in headers:
                await wrapped(http_scope(header, EXCHANGE_PATH), receive, count_refusals)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            del exchanger._request
        # (The scripted answers count as a shared cache's, not as misses.)
        stats = wrapped.stats()
    if (
        refused
        or stats["caches"]["tokens"]["misses"] != n + 1
        or len(wrapped._tokens._entries) != n + 1
        or len(exchanger._grants) != n + 1
    ):
        fail(f"memory: {n} requests did not leave {n} more validated tokens and grants cached")
    if reader is not None and reader.wrong:
        fail(f"memory: {reader.wrong} requests read no SDK principal")
    per_user = (after - before) / n
    user_chars, grant_chars = len(tokens[0]), len(grant_token)
    return {
        "users": n,
        "sdk": sdk,
        "bytes_per_user": per_user,
        "user_token_chars": user_chars,
        "grant_token_chars": grant_chars,
        "beyond_grant_token_bytes": per_user - grant_chars,
        "overhead_bytes": per_user - user_chars - grant_chars,
        "target_bytes": TARGET_USER_MEMORY,
        "target_met": per_user - user_chars - grant_chars <= TARGET_USER_MEMORY,
    }


async def memory_with_sdk(config: Config, quick: bool) -> dict[str, Any]:
    argv = ["--sdk", "--json", *(["--quick"] if quick else [])]
    document, _ = await asyncio.to_thread(
        _common.run_worker, "bench_exchange", "benchmarks.bench_exchange", argv
    )
    result: dict[str, Any] = document["memory_per_user_sdk"]
    return result


# -- report ------------------------------------------------------------------------------------


ROW = "  {:<58}{:>9}  {:<19}{}"


def _timed(label: str, stats: dict[str, float], digits: int = 2) -> str:
    spread = f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
    return ROW.format(label, f"{stats['median']:.{digits}f}", spread, "")


def _figure(label: str, value: str, target: str = "") -> str:
    return ROW.format(label, value, "", target)


def render_user_memory(mem: dict[str, Any], what: str) -> list[str]:
    return [
        f"   {what}",
        _figure("held per user: validated token + grant", f"{mem['bytes_per_user']:.0f}"),
        _figure("  user token size (chars)", str(mem["user_token_chars"])),
        _figure("  grant token size (chars)", str(mem["grant_token_chars"])),
        _figure("  per user minus the grant token", f"{mem['beyond_grant_token_bytes']:.0f}"),
        _figure(
            "  per user beyond both token strings",
            f"{mem['overhead_bytes']:.0f}",
            f"<= {mem['target_bytes']:,}: {verdict(mem['target_met'])}",
        ),
    ]


SDK_MEMORY = "b. the MCP SDK imported, its principal read by the app (a process of its own)"


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    if "cache_hit" not in results:  # --sdk alone
        lines = _common.heading(
            "asgi_delegation token exchange benchmark, the MCP SDK imported (--sdk)",
            env,
            f"{mode}: {config.users} cached users",
            "bytes, tracemalloc",
        )
        lines += [
            f"4a. Memory per cached user ({config.users} users, tracemalloc)",
            *render_user_memory(results["memory_per_user_sdk"], SDK_MEMORY),
        ]
        return _common.joined(lines)
    hit, bursts = results["cache_hit"], results["burst"]
    cold, mem = results["cold_exchange"], results["memory"]
    users, users_sdk = results["memory_per_user"], results["memory_per_user_sdk"]
    n = config.burst_size
    lines = _common.heading(
        "asgi_delegation token exchange benchmark",
        env,
        f"{mode}: {config.rounds} rounds of {config.hit_calls} hits; {config.bursts} bursts "
        f"of {n}; {config.rounds} rounds of {config.cold_calls} cold exchanges; "
        f"{config.users} cached users; {config.grants} cached grants",
        "median over rounds (min-max of the per-round values); the garbage collector on, "
        f"except in the rows labelled '{BEST_CASE}'",
    )
    row = ROW
    timed, figure = _timed, _figure

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
        timed(f"  {BEST_CASE}: hit", hit["hit_gc_paused_us"]),
        timed("request through the middleware, app exchanges nothing", hit["plain_request_us"]),
        timed("the same request, app awaits ctx.exchange(R) once", hit["hit_request_us"]),
        figure(
            "  first hit of a fresh request (difference)",
            f"{hit['fresh_request_first_hit_us']:.2f}",
            "(informational)",
        ),
        "",
        f"2. Burst: {n} concurrent identical requests, cold grant cache (a new user each, its "
        f"token validated first), loopback token endpoint with {BURST_LATENCY * 1000:g} ms "
        f"latency, one middleware; {bursts['bursts']} bursts",
        row.format("", "ms", "range", "target"),
        timed("one cold exchange (a new user's one request)", bursts["single_ms"]),
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
            f"  ratio burst / one cold exchange (medians of {bursts['bursts']})",
            f"{bursts['ratio_burst_to_single']:.2f}x",
            f"<= {TARGET_BURST_RATIO:g}x: {verdict(bursts['ratio_target_met'])}",
        ),
        timed("  its event-loop thread CPU time", bursts["burst_cpu_ms"]),
        timed("  its token request posted (ms from the start)", bursts["burst_posted_ms"]),
        timed("  its token request answered", bursts["burst_answered_ms"]),
        timed(f"  {BEST_CASE}: one cold exchange", bursts["single_gc_paused_ms"]),
        timed(f"  {BEST_CASE}: the burst", bursts["burst_gc_paused_ms"]),
        figure(f"  {BEST_CASE}: ratio", f"{bursts['gc_paused_ratio']:.2f}x", "(informational)"),
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
        f"4a. Memory per cached user: a validated token and its grant ({users['users']} users, "
        "tracemalloc)",
        row.format("", "bytes", "", "target"),
        *render_user_memory(users, "a. without the MCP SDK"),
        *render_user_memory(users_sdk, SDK_MEMORY),
        "",
        f"4b. Memory per cached grant ({mem['grants']} grants, tracemalloc)",
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
        "identical requests, a cold exchange against a bare POST, memory per cached user and "
        "per cached grant.",
        rounds_help=f"rounds for the hit and cold-exchange figures (default {DEFAULT.rounds}; "
        f"{QUICK.rounds} with --quick)",
        quick_help=f"smaller runs: {QUICK.bursts} bursts, {QUICK.users} cached users, "
        f"{QUICK.grants} cached grants (default {DEFAULT.bursts}, {DEFAULT.users} and "
        f"{DEFAULT.grants})",
        sdk_help="only section 4a with the MCP SDK imported, in this process: the main run "
        "launches this in a second interpreter",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(**{**asdict(base), "rounds": args.rounds or base.rounds})
    if config.bursts < MIN_BURSTS:
        fail(f"the burst ratio is the median of at least {MIN_BURSTS} bursts")

    async def run(config: Config) -> dict[str, Any]:
        if args.sdk:
            return {"memory_per_user_sdk": await memory_per_user(config, sdk=True)}
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
        results["memory_per_user"] = await memory_per_user(config, sdk=False)
        results["memory_per_user_sdk"] = await memory_with_sdk(config, args.quick)
        results["memory"] = await memory(config)
        return results

    env = _common.environment("httpx", "anyio", "uvicorn", "mcp")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
