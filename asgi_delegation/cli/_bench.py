"""Measure inbound validation and token exchange, end to end, and print a report.

With no arguments it starts LocalAuthorizationServer on a loopback port (real HTTP, with a
simulated network latency on its token endpoint), wraps a small ASGI app in
DelegationMiddleware, and drives it in process: the cost of validating a first-seen and a
cached token, exchange latency cold and cached, bursts of concurrent identical requests
(token-endpoint calls made vs requests served; the median wall time of ``--bursts`` bursts, each
for a new user so that nothing is cached, against the median cold exchange), throughput, and a
histogram of cold-exchange latency.

Against a real deployment, give --issuer, --resource, --token (a user token for --resource)
and one or more --upstream resources, with the application's client credentials
(--client-id/--client-secret or KEYCARD_CLIENT_ID/KEYCARD_CLIENT_SECRET): the same
measurements, on your authorization server. A failed exchange is explained as `doctor` does.

Exit codes: 0 done, 1 validation or an exchange failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .. import AccessContext, DelegationMiddleware, ExchangeError
from .._types import Message, Scope
from ..testing import LocalAuthorizationServer
from ._args import count, number
from ._diagnosis import explain
from ._report import Progress, facts, histogram, percentiles, table

_RESOURCE = "http://127.0.0.1:8000/mcp"
_CLIENT_ID = "bench-client"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=count, default=20, help="users (default 20)")
    parser.add_argument(
        "--resources", type=count, default=3, help="upstream resources, embedded (default 3)"
    )
    parser.add_argument(
        "--concurrency", type=count, default=50, help="workers in the throughput phase (50)"
    )
    parser.add_argument(
        "--duration", type=number(0, 3600), default=3.0, help="seconds of the throughput phase (3)"
    )
    parser.add_argument(
        "--burst", type=count, help="concurrent identical requests (1000; 50 on a deployment)"
    )
    parser.add_argument(
        "--bursts", type=count, default=5, help="bursts, each for a new user: the median (5)"
    )
    parser.add_argument(
        "--latency",
        type=number(0, 10_000, "ms"),
        default=20.0,
        help="simulated token endpoint latency, ms (20)",
    )
    parser.add_argument(
        "--samples", type=count, default=200, help="first-seen tokens / repeated samples (200)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    real = parser.add_argument_group("against a real deployment")
    real.add_argument("--issuer", help="the authorization server's issuer")
    real.add_argument("--resource", help="this server's resource identifier (the token's aud)")
    real.add_argument("--token", help="a user token (or env ASGI_DELEGATION_TOKEN)")
    real.add_argument("--client-id", help="default: env KEYCARD_CLIENT_ID")
    real.add_argument("--client-secret", help="default: env KEYCARD_CLIENT_SECRET")
    real.add_argument("--upstream", action="append", default=[], help="resource to exchange for")


@dataclass
class _Target:
    """What is measured: a middleware, the user tokens, and how to count upstream calls."""

    middleware: DelegationMiddleware
    resources: list[str]
    tokens: list[str]
    mint: Callable[[], str] | None = None  # a new user's token (embedded only)
    token_calls: Callable[[], int] | None = None  # token-endpoint requests so far
    failures: list[ExchangeError] = field(default_factory=list)

    def calls(self) -> int | None:
        return None if self.token_calls is None else self.token_calls()

    def calls_since(self, before: int | None) -> int | None:
        now = self.calls()
        return None if now is None or before is None else now - before


def _app(resources: list[str], failures: list[ExchangeError]) -> Any:
    paths = {f"/x/{i}": resource for i, resource in enumerate(resources)}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        status = 200
        resource = paths.get(scope["path"])
        if resource is not None:
            context: AccessContext = scope["state"]["access_context"]
            try:
                await context.exchange(resource)
            except ExchangeError as exc:
                failures.append(exc)
                status = 502
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _call(middleware: DelegationMiddleware, token: str, path: str = "/") -> int:
    status = 0
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {token}".encode())],
    }  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await middleware(scope, receive, send)
    return status


async def _timed(middleware: DelegationMiddleware, token: str, path: str = "/") -> float:
    """Seconds one request took; raises if it was refused."""
    start = time.perf_counter()
    status = await _call(middleware, token, path)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise _Refused(status)
    return elapsed


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@asynccontextmanager
async def _embedded(args: argparse.Namespace, progress: Progress) -> AsyncIterator[_Target]:
    auth = LocalAuthorizationServer()
    secret = secrets.token_urlsafe(24)
    resources = [f"https://api{i}.example.com" for i in range(args.resources)]
    auth.register_client(_CLIENT_ID, secret=secret, allowed_resources=resources)
    auth.token_latency = args.latency / 1000
    auth.exchange_expires_in = 3600
    async with auth.serve() as issuer:  # tokens name the issuer: mint them once it is known
        progress.show("minting user tokens", 0)
        count = max(args.users, args.samples + 1)
        tokens = [auth.mint(f"user{n % args.users}", audience=_RESOURCE) for n in range(count)]
        burst_users = itertools.count(1)
        failures: list[ExchangeError] = []
        middleware = DelegationMiddleware(
            _app(resources, failures), issuer=issuer, resource=_RESOURCE,
            client_id=_CLIENT_ID, client_secret=secret,
        )  # fmt: skip
        try:
            yield _Target(
                middleware, resources, tokens,
                mint=lambda: auth.mint(f"burst-user{next(burst_users)}", audience=_RESOURCE),
                token_calls=lambda: auth.requests["/token"], failures=failures,
            )  # fmt: skip
        finally:
            await middleware.aclose()


@asynccontextmanager
async def _deployment(args: argparse.Namespace) -> AsyncIterator[_Target]:
    failures: list[ExchangeError] = []
    middleware = DelegationMiddleware(
        _app(args.upstream, failures), issuer=args.issuer, resource=args.resource,
        client_id=args.client_id, client_secret=args.client_secret,
    )  # fmt: skip
    try:
        yield _Target(middleware, list(args.upstream), [args.token], failures=failures)
    finally:
        await middleware.aclose()


async def _measure(target: _Target, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    mw = target.middleware
    embedded = target.mint is not None
    exchanger = mw._exchanger  # one issuer here
    assert exchanger is not None
    progress.show("discovery and keys", 0.05)
    await _timed(mw, target.tokens[0])  # discovery, JWKS, first validation: not measured

    progress.show("validating first-seen tokens", 0.1)
    first_seen = []
    if embedded:
        first_seen = [await _timed(mw, token) for token in target.tokens[1:]]
    else:  # one token: forget it each time
        for _ in range(args.samples):
            mw._tokens._entries.clear()
            first_seen.append(await _timed(mw, target.tokens[0]))
    cached = [await _timed(mw, target.tokens[n % len(target.tokens)]) for n in range(args.samples)]

    progress.show("exchanging, cold", 0.25)
    cold, warm = [], []
    paths = [f"/x/{i}" for i in range(len(target.resources))]
    pairs = [(t, p) for t in target.tokens[: args.users] for p in paths]
    rounds = 1 if embedded else max(1, min(args.samples, 20))
    for i in range(rounds):
        for j, (token, path) in enumerate(pairs):
            if not embedded:
                exchanger._grants.flush()
            cold.append(await _timed(mw, token, path))
            progress.show(
                "exchanging, cold", 0.25 + 0.35 * (i * len(pairs) + j) / (rounds * len(pairs))
            )
    for _ in range(max(1, args.samples // len(pairs))):
        for token, path in pairs:
            warm.append(await _timed(mw, token, path))

    progress.show("bursts of identical requests", 0.6)
    burst = args.burst or (1000 if embedded else 50)
    walls: list[float] = []
    served = 0
    calls: list[int | None] = []
    for n in range(args.bursts):
        if target.mint is not None:  # a new user: nothing cached for it
            token = target.mint()
            await _timed(mw, token)  # validated: the burst measures the exchange alone
        else:  # the one user token: forget its grants
            token = target.tokens[0]
            exchanger._grants.flush()
        calls_before = target.calls()
        start = time.perf_counter()
        statuses = await asyncio.gather(*(_call(mw, token, paths[0]) for _ in range(burst)))
        walls.append((time.perf_counter() - start) * 1000)
        served += sum(1 for s in statuses if s == 200)
        calls.append(target.calls_since(calls_before))
        progress.show("bursts of identical requests", 0.6 + 0.1 * (n + 1) / args.bursts)
    per_burst = [c for c in calls if c is not None] if None not in calls else None

    progress.show("throughput", 0.7)
    for token, path in pairs:  # every grant cached again (the burst may have dropped them)
        await _timed(mw, token, path)
    done = 0
    stop_at = time.perf_counter() + args.duration
    calls_before = target.calls()

    async def worker(offset: int) -> None:
        nonlocal done
        n = offset
        while time.perf_counter() < stop_at:
            token, path = pairs[n % len(pairs)]
            if await _call(mw, token, path) == 200:
                done += 1
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    throughput_calls = target.calls_since(calls_before)
    progress.clear()

    cold_ms = [s * 1000 for s in cold]
    cold_median = statistics.median(cold_ms)
    wall_median = statistics.median(walls)
    return {
        "mode": "embedded" if embedded else "deployment",
        "latency_ms": args.latency if embedded else None,
        "validation_us": {
            "first_seen": percentiles([s * 1e6 for s in first_seen]),
            "cached": percentiles([s * 1e6 for s in cached]),
        },
        "exchange": {
            "cold_ms": percentiles(cold_ms),
            "cached_us": percentiles([s * 1e6 for s in warm]),
        },
        "burst": {
            "requests": burst,  # in each burst
            "bursts": args.bursts,
            "served": served,  # in all the bursts
            "token_endpoint_calls": None if per_burst is None else sum(per_burst),
            "token_endpoint_calls_per_burst": per_burst,
            "wall_ms": wall_median,  # the median of the bursts
            "wall_ms_samples": walls,
            "cold_exchange_ms": cold_median,  # one cold exchange: the median
            "ratio_to_cold_exchange": wall_median / cold_median,
        },
        "throughput": {
            "requests_per_second": done / elapsed,
            "concurrency": args.concurrency,
            "seconds": elapsed,
            "token_endpoint_calls": throughput_calls,
        },
        "cold_exchange_samples_ms": cold_ms,
    }


def _render(figures: dict[str, Any]) -> str:
    validation, exchange = figures["validation_us"], figures["exchange"]
    burst, throughput = figures["burst"], figures["throughput"]
    walls, total = burst["wall_ms_samples"], burst["requests"] * burst["bursts"]
    each = "a new user each" if figures["mode"] == "embedded" else "the grants flushed before each"
    where = (
        f"embedded LocalAuthorizationServer on loopback, {figures['latency_ms']:g} ms token "
        "endpoint latency"
        if figures["mode"] == "embedded"
        else "your deployment"
    )
    return "\n\n".join(
        [
            f"asgi-delegation bench: {where}",
            table(
                "Inbound validation (one request through the middleware)",
                "µs",
                [
                    ("first-seen token", validation["first_seen"]),
                    ("cached token", validation["cached"]),
                ],
            ),
            table("Token exchange, cold (token endpoint)", "ms", [("cold", exchange["cold_ms"])]),
            table("Token exchange, cached", "µs", [("cached", exchange["cached_us"])]),
            facts(
                f"Burst: {burst['requests']} concurrent identical requests, cold grant cache, "
                f"{burst['bursts']} bursts ({each})",
                [
                    ("requests served", f"{burst['served']} of {total}"),
                    ("token endpoint calls", _calls_per_burst(burst)),
                    (
                        f"wall time (median of {burst['bursts']})",
                        f"{burst['wall_ms']:.1f} ms (min {min(walls):.1f}, max {max(walls):.1f})",
                    ),
                    ("one cold exchange (median)", f"{burst['cold_exchange_ms']:.1f} ms"),
                    ("burst / one cold exchange", f"{burst['ratio_to_cold_exchange']:.2f}x"),
                ],
            ),
            facts(
                "Throughput (cached tokens and grants)",
                [
                    ("requests per second", f"{throughput['requests_per_second']:,.0f}"),
                    ("concurrency", str(throughput["concurrency"])),
                    ("token endpoint calls", _count_or_dash(throughput["token_endpoint_calls"])),
                ],
            ),
            "Cold exchange latency\n" + histogram(figures["cold_exchange_samples_ms"], "ms"),
        ]
    )


def _calls_per_burst(burst: dict[str, Any]) -> str:
    per_burst: list[int] | None = burst["token_endpoint_calls_per_burst"]
    if per_burst is None:
        return "-"  # a deployment's token endpoint cannot be counted
    each = str(per_burst[0]) if len(set(per_burst)) == 1 else ", ".join(map(str, per_burst))
    return f"{sum(per_burst)} ({each} per burst)"


def _count_or_dash(n: int | None) -> str:
    return "-" if n is None else str(n)  # a deployment's token endpoint cannot be counted


def _explain_failure(target: _Target, refused: _Refused | None) -> str:
    if target.failures:
        error = target.failures[0]
        what, fix = explain(error)
        return (
            f"the exchange for {error.resource} failed: {error.error}"
            + (f" ({error.error_description})" if error.error_description else "")
            + f"\n  points to: {what}\n  fix: {fix}"
        )
    status = refused.status if refused else "?"
    return (
        f"the user token was refused (HTTP {status}): run `asgi-delegation doctor` with the "
        "same --issuer, --resource and --token to see why"
    )


async def _bench(args: argparse.Namespace) -> int:
    progress = Progress(not args.json and not args.no_progress)
    source = _deployment(args) if args.issuer else _embedded(args, progress)
    async with source as target:
        try:
            figures = await _measure(target, args, progress)
        except _Refused as refused:
            progress.clear()
            print(f"asgi-delegation bench: {_explain_failure(target, refused)}", file=sys.stderr)
            return 1
    print(json.dumps(figures, indent=2) if args.json else _render(figures))
    return 0


def run(args: argparse.Namespace) -> int:
    args.token = args.token or os.environ.get("ASGI_DELEGATION_TOKEN")
    deployment = [args.issuer, args.resource, args.token]
    if any(deployment) or args.upstream:
        missing = [
            name
            for name, value in zip(("--issuer", "--resource", "--token"), deployment, strict=True)
            if not value
        ]
        if missing or not args.upstream:
            missing_text = ", ".join(missing) or "--upstream"
            print(
                "asgi-delegation bench: against a deployment, give --issuer, --resource, "
                f"--token and at least one --upstream (missing: {missing_text})",
                file=sys.stderr,
            )
            return 2
    elif importlib.util.find_spec("uvicorn") is None:
        print(
            "asgi-delegation bench: the embedded server needs uvicorn: "
            "pip install 'asgi-delegation[serve]'",
            file=sys.stderr,
        )
        return 1
    return asyncio.run(_bench(args))
