"""Core benchmarks of DelegationMiddleware, measured side by side in one run.

1. Warm request overhead: the same valid token on every call (validation cache hit), through a
   bare ASGI app and through ``DelegationMiddleware`` around that same app, also with auditing
   on: (a) the ``asgi_delegation.audit`` logger at INFO with a handler attached, (b) an
   ``on_audit`` callback set. Target: the middleware adds at most 5 µs per request, in all three
   cases. Case (b) builds and queues an event per request; the audit worker delivers the batch's
   events once the batch is timed (the queue holds 10,000 events: batches stay below that), and
   that delivery is timed on its own and reported as well.
2. First-seen token validation: a distinct, never-seen token on every call (JWKS already
   fetched), through the middleware, against joserfc's own ``jwt.decode`` plus
   ``JWTClaimsRegistry.validate`` with a pre-imported public key. Target: at most 1.2x joserfc.

The ASGI callables are awaited directly in one asyncio event loop (no HTTP client, no server).
Batches are interleaved round by round (the four warm cases in an order that rotates from
round to round); each figure is the median over rounds of the per-call mean of one batch. The
garbage collector is paused while a batch is timed, as ``timeit`` does.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_core            # ~15 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_core --quick    # ~2 s
    .venv/bin/python -m benchmarks.bench_core --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from joserfc import jwk, jwt

from asgi_delegation import DelegationMiddleware
from asgi_delegation._audit import AuditEvent, AuthenticationEvent
from asgi_delegation._types import ASGIApp, Scope
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import (
    RESOURCE,
    bare_app,
    discard,
    gc_paused,
    headers_for,
    http_scope,
    summary,
    verdict,
)

TARGET_ADDED_US = 5.0
TARGET_FIRST_SEEN_RATIO = 1.2
AUDIT_LOGGER = "asgi_delegation.audit"
AUDIT_QUEUE_SIZE = 10_000  # the on_audit queue: a batch larger than this would drop events


@dataclass(frozen=True)
class Config:
    rounds: int
    warm_calls: int
    first_seen_tokens: int


DEFAULT = Config(rounds=30, warm_calls=2000, first_seen_tokens=2000)
QUICK = Config(rounds=7, warm_calls=1000, first_seen_tokens=300)


# -- the ASGI pieces ---------------------------------------------------------------------------


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


# -- auditing ----------------------------------------------------------------------------------


class AuditSink:
    """The ``on_audit`` callback of case (b): synchronous, counts the events and keeps the
    last few."""

    def __init__(self) -> None:
        self.received = 0
        self.last: deque[AuditEvent] = deque(maxlen=64)

    def __call__(self, event: AuditEvent) -> None:
        self.received += 1
        self.last.append(event)


@contextmanager
def audit_logged_at_info(stream: io.StringIO) -> Iterator[None]:
    """The audit logger at INFO with a ``StreamHandler`` (formatter included) writing to
    ``stream``, and not propagating; its level, handlers and propagation restored afterwards."""
    logger = logging.getLogger(AUDIT_LOGGER)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def first_acceptance(sink: AuditSink) -> bool:
    """Whether ``sink`` has received the event of a token's first acceptance."""
    return any(
        isinstance(event, AuthenticationEvent) and event.outcome == "accepted" and not event.cached
        for event in sink.last
    )


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether ``condition`` came to hold within ``seconds``. A sync callback gets its events
    in a worker thread, which needs the GIL: the loop sleeps between looks, never spins."""
    give_up_at = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= give_up_at:
            return False
        await asyncio.sleep(0.0002)
    return True


async def drain_audit(
    middleware: DelegationMiddleware, sink: AuditSink, expected: int, what: str
) -> float:
    """Lets the audit worker run until ``sink`` has received ``expected`` events in all, less
    any dropped or failed; returns the time that took, in ns."""

    def drained() -> bool:
        audit: dict[str, int] = middleware.stats()["audit"]  # dropped, failed: will never come
        return sink.received + audit["dropped"] + audit["callback_errors"] >= expected

    with gc_paused():
        start = time.perf_counter_ns()
        if not await until(drained):
            fail(f"{what}: the audit worker never delivered the batch's events")
        return time.perf_counter_ns() - start


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


def _audited(
    bare_median: float, samples: Sequence[float], plain: Sequence[float]
) -> dict[str, Any]:
    """The summary of an audited case's samples, what it adds to the bare app, its ratio, and
    what auditing adds to the plain middleware: the median of the per-round differences."""
    figures = summary(samples)
    added = figures["median"] - bare_median
    return {
        "wrapped_us": figures,
        "added_us": added,
        "ratio_to_bare": figures["median"] / bare_median,
        "target_met": added <= TARGET_ADDED_US,
        "added_over_plain_us": statistics.median(
            a - b for a, b in zip(samples, plain, strict=True)
        ),
    }


async def warm_overhead(auth: LocalAuthorizationServer, config: Config) -> dict[str, Any]:
    if logging.getLogger(AUDIT_LOGGER).isEnabledFor(logging.INFO):
        fail(f"the {AUDIT_LOGGER} logger is already enabled: the plain case would be audited")
    if config.warm_calls >= AUDIT_QUEUE_SIZE:
        fail(f"batches of {config.warm_calls} calls would overflow the on_audit queue")
    client = auth.http_client()
    stream = io.StringIO()
    sink = AuditSink()
    try:
        wrapped = DelegationMiddleware(
            bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client
        )
        logged = DelegationMiddleware(
            bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client
        )
        with_callback = DelegationMiddleware(
            bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client, on_audit=sink
        )
        token = auth.mint("alice", audience=RESOURCE, scope="read")
        await check_answers_200(wrapped, token, "warm overhead")
        with audit_logged_at_info(stream):
            await check_answers_200(logged, token, "warm overhead, audit logger at INFO")
        if "authentication accepted" not in stream.getvalue():
            fail("warm overhead: the audit handler did not receive the first acceptance")
        await check_answers_200(with_callback, token, "warm overhead, on_audit")
        # The warm-up's events: two fetches, then the acceptance.
        if not await until(lambda: first_acceptance(sink)):
            fail("warm overhead: on_audit did not receive the first acceptance")
        logged_before = stream.getvalue().count("\n")
        delivered_before = with_callback.stats()["audit"]["delivered"]
        headers = headers_for(token)
        samples: dict[str, list[float]] = {"bare": [], "wrapped": [], "logged": [], "callback": []}
        delivery_us: list[float] = []

        async def timed_batch(case: str) -> None:
            scopes = [http_scope(headers) for _ in range(config.warm_calls)]
            if case == "bare":
                samples[case].append(await time_calls(bare_app, scopes))
                return
            if case == "wrapped":
                samples[case].append(await time_calls(wrapped, scopes))
            elif case == "logged":
                with audit_logged_at_info(stream):
                    samples[case].append(await time_calls(logged, scopes))
            else:
                expected = sink.received + len(scopes)
                samples[case].append(await time_calls(with_callback, scopes))
                nanoseconds = await drain_audit(with_callback, sink, expected, "warm overhead")
                delivery_us.append(nanoseconds / len(scopes) / 1000)
                last = sink.last[-1]
                if not (isinstance(last, AuthenticationEvent) and last.cached):
                    fail("warm overhead: on_audit did not receive the cache-hit events")
            check_authenticated(scopes, f"warm overhead ({case})")

        cases = list(samples)
        for round_ in range(config.rounds):
            # The order of the four batches rotates from round to round.
            shift = round_ % len(cases)
            for case in cases[shift:] + cases[:shift]:
                await timed_batch(case)
        audit = with_callback.stats()["audit"]
        logged_during = stream.getvalue().count("\n") - logged_before
    finally:
        await with_callback.aclose()
        await client.aclose()
    bare = summary(samples["bare"])
    plain = summary(samples["wrapped"])
    plain_added = plain["median"] - bare["median"]
    callback = _audited(bare["median"], samples["callback"], samples["wrapped"])
    delivery = summary(delivery_us)
    with_delivery = callback["wrapped_us"]["median"] + delivery["median"] - bare["median"]
    return {
        "bare_us": bare,
        "wrapped_us": plain,
        "added_us": plain_added,
        "ratio_wrapped_to_bare": plain["median"] / bare["median"],
        "target_added_us": TARGET_ADDED_US,
        "target_met": plain_added <= TARGET_ADDED_US,
        "audit_logger_info": {
            **_audited(bare["median"], samples["logged"], samples["wrapped"]),
            "records_logged_by_timed_requests": logged_during,
        },
        "on_audit_callback": {
            **callback,
            "delivery_us_per_event": delivery,
            "added_with_delivery_us": with_delivery,
            "ratio_with_delivery_to_bare": (with_delivery + bare["median"]) / bare["median"],
            "target_met_with_delivery": with_delivery <= TARGET_ADDED_US,
            "delivered": audit["delivered"] - delivered_before,
            "dropped": audit["dropped"],
            "callback_errors": audit["callback_errors"],
        },
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

    def added(label: str, microseconds: float, met: bool) -> str:
        target = f"<= {TARGET_ADDED_US:g} µs: {verdict(met)}"
        return row.format(label, f"{microseconds:.2f}", "", target)

    def over_plain(case: dict[str, Any]) -> str:
        label = "added by auditing (vs the plain middleware)"
        return row.format(label, f"{case['added_over_plain_us']:.2f}", "", "(per-round diff.)")

    logged, callback = warm["audit_logger_info"], warm["on_audit_callback"]
    lines += [
        "1. Warm request overhead (same valid token every call: validation cache hit)",
        row.format("", "µs/req", "range", "target"),
        timed("bare app", warm["bare_us"]),
        timed("DelegationMiddleware(bare app)", warm["wrapped_us"]),
        added("added by the middleware", warm["added_us"], warm["target_met"]),
        row.format("ratio wrapped / bare", f"{warm['ratio_wrapped_to_bare']:.1f}x", "", ""),
        "",
        "   a. auditing on: the asgi_delegation.audit logger at INFO, a StreamHandler attached",
        timed("DelegationMiddleware(bare app)", logged["wrapped_us"]),
        added("added by the middleware", logged["added_us"], logged["target_met"]),
        row.format("ratio wrapped / bare", f"{logged['ratio_to_bare']:.1f}x", "", ""),
        over_plain(logged),
        row.format(
            "records logged by the timed requests",
            str(logged["records_logged_by_timed_requests"]),
            "",
            "(cache hits are DEBUG)",
        ),
        "",
        "   b. auditing on: an on_audit callback (sync, counts into a deque)",
        timed("DelegationMiddleware(bare app, on_audit=callback)", callback["wrapped_us"]),
        added(
            "added by the middleware (request path)", callback["added_us"], callback["target_met"]
        ),
        row.format("ratio wrapped / bare", f"{callback['ratio_to_bare']:.1f}x", "", ""),
        over_plain(callback),
        timed(
            "audit worker's delivery, per event (after the batch)",
            callback["delivery_us_per_event"],
        ),
        added(
            "added, delivery included",
            callback["added_with_delivery_us"],
            callback["target_met_with_delivery"],
        ),
        row.format(
            "ratio (wrapped + delivery) / bare",
            f"{callback['ratio_with_delivery_to_bare']:.1f}x",
            "",
            "",
        ),
        row.format(
            "events delivered / dropped / callback errors",
            f"{callback['delivered']} / {callback['dropped']} / {callback['callback_errors']}",
            "",
            "",
        ),
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
