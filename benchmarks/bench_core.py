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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from joserfc import jwk, jwt

from asgi_delegation import DelegationMiddleware
from asgi_delegation._types import ASGIApp, Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import RESOURCE, discard, gc_paused, headers_for, http_scope, summary, verdict

TARGET_ADDED_US = 5.0
TARGET_FIRST_SEEN_RATIO = 1.2


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


receive = _common.receiver("tools/list")


def fail(message: str) -> NoReturn:
    _common.abort("bench_core", message)


async def check_answers_200(app: ASGIApp, token: str, what: str) -> None:
    """One request that must be answered 200 and reach the app authenticated as alice."""
    statuses, record = _common.status_recorder()
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
    with gc_paused():
        start = time.perf_counter_ns()
        for scope in scopes:
            await app(scope, receive, discard)
        elapsed = time.perf_counter_ns() - start
    return elapsed / len(scopes) / 1000


def time_joserfc(
    tokens: Sequence[str], key: jwk.RSAKey, claims_registry: jwt.JWTClaimsRegistry
) -> float:
    """Per-token mean of joserfc's decode + claims validation, in µs."""
    with gc_paused():
        start = time.perf_counter_ns()
        for token in tokens:
            decoded = jwt.decode(token, key, algorithms=["RS256"])
            claims_registry.validate(decoded.claims)
        elapsed = time.perf_counter_ns() - start
    return elapsed / len(tokens) / 1000


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


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    warm, first = results["warm"], results["first_seen"]
    lines = _common.heading(
        "asgi_delegation core benchmark",
        env,
        f"{mode}: {config.rounds} interleaved rounds; {config.warm_calls} warm calls and "
        f"{config.first_seen_tokens} first-seen tokens per round",
        "per-call µs, median over rounds (min-max of the per-round means)",
    )
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
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_core",
        description="Warm request overhead and first-seen token validation of "
        "DelegationMiddleware, against a bare ASGI app and against joserfc.",
        rounds_help=f"interleaved rounds (default {DEFAULT.rounds}; {QUICK.rounds} with --quick)",
        quick_help=f"smaller batches: {QUICK.warm_calls} warm calls and {QUICK.first_seen_tokens} "
        f"first-seen tokens per round (default {DEFAULT.warm_calls} and "
        f"{DEFAULT.first_seen_tokens})",
    )


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
    env = _common.environment("joserfc", "cryptography")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
