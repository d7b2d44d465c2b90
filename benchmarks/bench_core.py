"""Core benchmarks of DelegationMiddleware, measured side by side in one run.

1. Warm request overhead: the same valid token on every call (validation cache hit), through a
   bare ASGI app and through ``DelegationMiddleware`` around that same app. Target: the
   middleware adds at most 5 µs per request.
2. First-seen token validation: a distinct, never-seen token on every call (JWKS already
   fetched), through the middleware, against joserfc's own ``jwt.decode`` plus
   ``JWTClaimsRegistry.validate`` with a pre-imported public key. Target: at most 1.2x joserfc.

The ASGI callables are awaited directly in one asyncio event loop (no HTTP client, no server).
Batches are interleaved round by round; each figure is the median over rounds of the per-call
mean of one batch. The garbage collector is paused while a batch is timed, as ``timeit`` does.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_core            # ~15 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_core --quick    # ~2 s
    .venv/bin/python -m benchmarks.bench_core --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from joserfc import jwk, jwt

from asgi_delegation import DelegationMiddleware
from asgi_delegation._types import ASGIApp, Message, Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer

RESOURCE = "http://127.0.0.1:8000/mcp"
TARGET_ADDED_US = 5.0
TARGET_FIRST_SEEN_RATIO = 1.2

# What an MCP client sends with each request, minus the Authorization header added per token.
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
    "body": b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
    "more_body": False,
}


@dataclass(frozen=True)
class Config:
    rounds: int
    warm_calls: int
    first_seen_tokens: int


DEFAULT = Config(rounds=30, warm_calls=2000, first_seen_tokens=2000)
QUICK = Config(rounds=7, warm_calls=1000, first_seen_tokens=300)


# -- the ASGI pieces ---------------------------------------------------------------------------


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with a tiny body, whatever the request."""
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


def headers_for(token: str) -> list[tuple[bytes, bytes]]:
    authorization = (b"authorization", b"Bearer " + token.encode())
    return [*_BASE_HEADERS[:6], authorization, *_BASE_HEADERS[6:]]


def http_scope(headers: list[tuple[bytes, bytes]]) -> Scope:
    """A fresh scope per call: the middleware writes ``scope["state"]``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


def fail(message: str) -> None:
    print(f"bench_core: ABORTED: {message}", file=sys.stderr)
    raise SystemExit(1)


async def check_answers_200(app: ASGIApp, token: str, what: str) -> None:
    """One request that must be answered 200 and reach the app authenticated as alice."""
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = http_scope(headers_for(token))
    await app(scope, receive, record)
    if statuses != [200]:
        fail(f"{what}: the warm-up request was answered {statuses}, not [200]")
    context = scope.get("state", {}).get("access_context")
    if context is None or context.subject != "alice":
        fail(f"{what}: the warm-up request reached the app without alice's access context")


def check_authenticated(scopes: Sequence[Scope], what: str) -> None:
    """Every call of a timed batch must have reached the app with an access context."""
    if not all("access_context" in scope.get("state", {}) for scope in scopes):
        fail(f"{what}: some timed requests were not authenticated")


# -- timing ------------------------------------------------------------------------------------


async def time_calls(app: ASGIApp, scopes: Sequence[Scope]) -> float:
    """Per-call mean of awaiting ``app`` once per scope, in µs."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for scope in scopes:
            await app(scope, receive, discard)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(scopes) / 1000


def time_joserfc(
    tokens: Sequence[str], key: jwk.RSAKey, claims_registry: jwt.JWTClaimsRegistry
) -> float:
    """Per-token mean of joserfc's decode + claims validation, in µs."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for token in tokens:
            decoded = jwt.decode(token, key, algorithms=["RS256"])
            claims_registry.validate(decoded.claims)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(tokens) / 1000


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


# -- the two benchmarks ------------------------------------------------------------------------


async def warm_overhead(auth: LocalAuthorizationServer, config: Config) -> dict[str, Any]:
    client = auth.http_client()
    try:
        wrapped = DelegationMiddleware(
            bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client
        )
        token = auth.mint("alice", audience=RESOURCE, scope="read")
        await check_answers_200(wrapped, token, "warm overhead")
        headers = headers_for(token)
        bare_us: list[float] = []
        wrapped_us: list[float] = []
        for _ in range(config.rounds):
            scopes = [http_scope(headers) for _ in range(config.warm_calls)]
            bare_us.append(await time_calls(bare_app, scopes))
            scopes = [http_scope(headers) for _ in range(config.warm_calls)]
            wrapped_us.append(await time_calls(wrapped, scopes))
            check_authenticated(scopes, "warm overhead")
    finally:
        await client.aclose()
    bare, wrapped_s = summary(bare_us), summary(wrapped_us)
    added = wrapped_s["median"] - bare["median"]
    return {
        "bare_us": bare,
        "wrapped_us": wrapped_s,
        "added_us": added,
        "ratio_wrapped_to_bare": wrapped_s["median"] / bare["median"],
        "target_added_us": TARGET_ADDED_US,
        "target_met": added <= TARGET_ADDED_US,
    }


async def first_seen(auth: LocalAuthorizationServer, config: Config) -> dict[str, Any]:
    tokens = [
        auth.mint("alice", audience=RESOURCE, scope="read") for _ in range(config.first_seen_tokens)
    ]
    headers = [headers_for(token) for token in tokens]
    warm_token = auth.mint("alice", audience=RESOURCE, scope="read")
    public_key = jwk.RSAKey.import_key(auth.signing_key.as_dict(private=False))
    claims_registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": auth.issuer},
        aud={"essential": True, "value": RESOURCE},
        exp={"essential": True},
        sub={"essential": True},
    )
    client = auth.http_client()
    bare_us: list[float] = []
    wrapped_us: list[float] = []
    joserfc_us: list[float] = []
    try:
        for _ in range(config.rounds):
            # A fresh middleware each round, so that every timed token is one it has never seen
            # (its validation cache is empty); one warm-up request fetches metadata and JWKS.
            wrapped = DelegationMiddleware(
                bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client
            )
            await check_answers_200(wrapped, warm_token, "first-seen")
            bare_us.append(await time_calls(bare_app, [http_scope(h) for h in headers]))
            scopes = [http_scope(h) for h in headers]
            wrapped_us.append(await time_calls(wrapped, scopes))
            check_authenticated(scopes, "first-seen")
            joserfc_us.append(time_joserfc(tokens, public_key, claims_registry))
    finally:
        await client.aclose()
    bare, wrapped_s, baseline = summary(bare_us), summary(wrapped_us), summary(joserfc_us)
    ratio = wrapped_s["median"] / baseline["median"]
    return {
        "bare_us": bare,
        "wrapped_us": wrapped_s,
        "joserfc_us": baseline,
        "ratio_wrapped_to_joserfc": ratio,
        "ratio_wrapped_minus_bare_to_joserfc": (wrapped_s["median"] - bare["median"])
        / baseline["median"],
        "target_ratio": TARGET_FIRST_SEEN_RATIO,
        "target_met": ratio <= TARGET_FIRST_SEEN_RATIO,
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
        "joserfc": version("joserfc"),
        "cryptography": version("cryptography"),
        "asgi_delegation": version("asgi-delegation"),
        "machine": f"{platform.platform()}, {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs",
    }


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    warm, first = results["warm"], results["first_seen"]
    lines = [
        "asgi_delegation core benchmark",
        *(f"  {name:<16}{value}" for name, value in env.items()),
        f"  {'mode':<16}{mode}: {config.rounds} interleaved rounds; "
        f"{config.warm_calls} warm calls and {config.first_seen_tokens} first-seen tokens "
        "per round",
        "  figures: per-call µs, median over rounds (min-max of the per-round means)",
        "",
    ]
    row = "  {:<58}{:>9}  {:<17}{}"

    def timed(label: str, stats: dict[str, float]) -> str:
        spread = f"({stats['min']:.2f}-{stats['max']:.2f})"
        return row.format(label, f"{stats['median']:.2f}", spread, "")

    lines += [
        "1. Warm request overhead (same valid token every call: validation cache hit)",
        row.format("", "µs/req", "range", "target"),
        timed("bare app", warm["bare_us"]),
        timed("DelegationMiddleware(bare app)", warm["wrapped_us"]),
        row.format(
            "added by the middleware",
            f"{warm['added_us']:.2f}",
            "",
            f"<= {TARGET_ADDED_US:g} µs: {verdict(warm['target_met'])}",
        ),
        row.format("ratio wrapped / bare", f"{warm['ratio_wrapped_to_bare']:.1f}x", "", ""),
        "",
        "2. First-seen token validation (a distinct new token every call, JWKS warm)",
        row.format("", "µs/req", "range", "target"),
        timed("bare app (the ASGI call alone)", first["bare_us"]),
        timed("DelegationMiddleware(bare app), first-seen token", first["wrapped_us"]),
        timed("joserfc jwt.decode + JWTClaimsRegistry.validate", first["joserfc_us"]),
        row.format(
            "ratio wrapped / joserfc",
            f"{first['ratio_wrapped_to_joserfc']:.2f}x",
            "",
            f"<= {TARGET_FIRST_SEEN_RATIO:g}x: {verdict(first['target_met'])}",
        ),
        row.format(
            "ratio (wrapped - bare) / joserfc",
            f"{first['ratio_wrapped_minus_bare_to_joserfc']:.2f}x",
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
        prog="python -m benchmarks.bench_core",
        description="Warm request overhead and first-seen token validation of "
        "DelegationMiddleware, against a bare ASGI app and against joserfc.",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        help=f"interleaved rounds (default {DEFAULT.rounds}; {QUICK.rounds} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller batches: {QUICK.warm_calls} warm calls and {QUICK.first_seen_tokens} "
        f"first-seen tokens per round (default {DEFAULT.warm_calls} and "
        f"{DEFAULT.first_seen_tokens})",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


async def run(config: Config) -> dict[str, Any]:
    auth = LocalAuthorizationServer()
    return {
        "warm": await warm_overhead(auth, config),
        "first_seen": await first_seen(auth, config),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(args.rounds or base.rounds, base.warm_calls, base.first_seen_tokens)
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
