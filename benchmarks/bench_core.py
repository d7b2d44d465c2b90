"""Core benchmarks of DelegationMiddleware, measured side by side in one run.

1. Warm request overhead: the same valid token on every call (validation cache hit), through a
   bare ASGI app and through ``DelegationMiddleware`` around that same app, also with auditing
   on: (a) the ``asgi_delegation.audit`` logger at INFO with a handler attached, (b) an
   ``on_audit`` callback set. Target: the middleware adds at most 5 µs per request, in all three
   cases. Case (b) builds and queues an event per request; the audit worker delivers the batch's
   events once the batch is timed (the queue holds 10,000 events: batches stay below that), and
   that delivery is timed on its own and reported as well.
2. Warm request, caches full: 10,000 distinct tokens validated and a grant cached for each
   (tokens minted with the ``LocalAuthorizationServer``'s key, one request each through the
   middleware, one exchange each against the in-process token endpoint), then requests cycling
   through those tokens, through a real Starlette app with one route, bare and wrapped.
   Targets: the middleware adds at most 4 µs, and at most 0.45x the Starlette app's own cost.
3. First-seen token validation: a distinct, never-seen token on every call (JWKS already
   fetched), through the middleware, against joserfc's own ``jwt.decode`` plus
   ``JWTClaimsRegistry.validate`` of the same tokens with a pre-imported public key; as the
   median over rounds, and counting every token (all the time of every batch, the collections
   that came due in them included, over all the tokens). (a) Without the MCP SDK (this
   process: the target is at most 1.2x). (b) With ``mcp`` and its bearer-auth middleware
   imported before the middleware is built, as an MCP server does (so the middleware builds the
   SDK's principal), and an app that reads the principal as the SDK's streamable-HTTP transport
   does on every request. Targets: at most 1.1x (median) and 1.2x (every token). (c) The same,
   once the SDK's ``MCPServer`` is built, which turns INFO logging on for the whole process
   (a Rich handler on the root logger, writing to stderr). Target: at most 1.2x. Importing the
   SDK is for the whole process: (b) and (c) run in a second interpreter (``--sdk``), launched
   by the main run, so that (a) and sections 1-2 stay without it.

The ASGI callables are awaited directly in one asyncio event loop (no HTTP client, no server),
with scopes built before the batch and each freed when its request is over. Batches are
interleaved round by round (the warm cases in an order that rotates from round to round); each
figure is the median over rounds of the per-call mean of one batch. The garbage collector is ON
in every timed batch, as users run the package; rows labelled "best case: GC paused" repeat a
figure with it collected and paused while the batch is timed, as ``timeit`` does, and are never
the headline.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_core            # ~80 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_core --quick    # ~15 s
    .venv/bin/python -m benchmarks.bench_core --json     # the figures as JSON
    .venv/bin/python -m benchmarks.bench_core --sdk      # sections 3b and 3c alone
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import logging
import statistics
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from joserfc import jwk, jwt

from asgi_delegation import AccessContext, DelegationMiddleware
from asgi_delegation._audit import AuditEvent, AuthenticationEvent
from asgi_delegation._types import ASGIApp, Scope
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import (
    BEST_CASE,
    RESOURCE,
    GcWatch,
    PrincipalReader,
    bare_app,
    discard,
    handed_out,
    headers_for,
    http_scope,
    summary,
    timed_gc,
    verdict,
)

TARGET_ADDED_US = 5.0
TARGET_FULL_ADDED_US = 4.0
TARGET_FULL_RATIO = 0.45  # added / the bare Starlette app's own cost
TARGET_FIRST_SEEN_RATIO = 1.2  # (a), median
TARGET_SDK_RATIO = 1.1  # (b), median
TARGET_EVERY_TOKEN_RATIO = 1.2  # (a) and (b), counting every token
TARGET_SERVER_RATIO = 1.2  # (c), median and every token
AUDIT_LOGGER = "asgi_delegation.audit"
AUDIT_QUEUE_SIZE = 10_000  # the on_audit queue: a batch larger than this would drop events
UPSTREAM = "https://api.upstream.example/v1"  # what section 2's grants are for
CLIENT_ID, CLIENT_SECRET = "app", "s"
SUBJECT = "alice"


@dataclass(frozen=True)
class Config:
    rounds: int
    warm_calls: int
    full_tokens: int  # section 2: tokens validated and grants cached
    first_seen_tokens: int
    server_rounds: int  # section 3c: every first-seen token is logged at INFO there
    server_tokens: int


DEFAULT = Config(
    rounds=30,
    warm_calls=2000,
    full_tokens=10_000,
    first_seen_tokens=2000,
    server_rounds=10,
    server_tokens=500,
)
QUICK = Config(
    rounds=7,
    warm_calls=1000,
    full_tokens=2000,
    first_seen_tokens=300,
    server_rounds=3,
    server_tokens=100,
)


# -- the ASGI pieces ---------------------------------------------------------------------------


receive = _common.receiver("tools/list")


def fail(message: str) -> NoReturn:
    _common.abort("bench_core", message)


def middleware(
    app: Callable[..., Any], auth: LocalAuthorizationServer, **options: Any
) -> DelegationMiddleware:
    return DelegationMiddleware(app, issuer=auth.issuer, resource=RESOURCE, **options)


async def check_answers_200(app: ASGIApp, token: str, what: str) -> Scope:
    """One request that must be answered 200 and reach the app authenticated as alice; its
    scope, for more checks."""
    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token))
    await app(scope, receive, record)
    if statuses != [200]:
        fail(f"{what}: the warm-up request was answered {statuses}, not [200]")
    context = scope.get("state", {}).get("access_context")
    if context is None or context.subject != SUBJECT:
        fail(f"{what}: the warm-up request reached the app without alice's access context")
    return scope


def requests_of(wrapped: DelegationMiddleware) -> tuple[int, int, int, int]:
    """Requests accepted and refused, validation-cache hits and misses, so far."""
    stats = wrapped.stats()
    tokens = stats["caches"]["tokens"]
    return (
        stats["requests"]["accepted"],
        sum(stats["requests"]["rejected"].values()),
        tokens["hits"],
        tokens["misses"],
    )


def check_batch(
    wrapped: DelegationMiddleware,
    before: tuple[int, int, int, int],
    calls: int,
    what: str,
    *,
    hits: bool,
) -> None:
    """Every call of a timed batch was accepted, all of them cache hits or all misses."""
    accepted, refused, hit, missed = (
        a - b for a, b in zip(requests_of(wrapped), before, strict=True)
    )
    expected = (calls, 0, calls, 0) if hits else (calls, 0, 0, calls)
    if (accepted, refused, hit, missed) != expected:
        fail(
            f"{what}: {accepted} of {calls} timed requests accepted, {refused} refused, "
            f"{hit} cache hits and {missed} misses"
        )


def starlette_app() -> ASGIApp:
    """A real Starlette application with one route, ``POST /mcp``, answering a tiny body."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app: ASGIApp = Starlette(routes=[Route("/mcp", endpoint, methods=["POST"])])
    return app


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
) -> int:
    """Lets the audit worker run until ``sink`` has received ``expected`` events in all, less
    any dropped or failed; returns the time that took, in ns."""

    def drained() -> bool:
        audit: dict[str, int] = middleware.stats()["audit"]  # dropped, failed: will never come
        return sink.received + audit["dropped"] + audit["callback_errors"] >= expected

    with timed_gc():
        start = time.perf_counter_ns()
        if not await until(drained):
            fail(f"{what}: the audit worker never delivered the batch's events")
        return time.perf_counter_ns() - start


# -- timing ------------------------------------------------------------------------------------


async def time_calls(
    app: ASGIApp, scopes: list[Scope], *, paused: bool = False, watch: GcWatch | None = None
) -> int:
    """ns taken awaiting ``app`` once per scope (the list ends empty, each scope freed when
    its request is over)."""
    with timed_gc(paused=paused, watch=watch):
        start = time.perf_counter_ns()
        for scope in handed_out(scopes):
            await app(scope, receive, discard)
        return time.perf_counter_ns() - start


def time_joserfc(
    tokens: Sequence[str],
    key: jwk.RSAKey,
    claims_registry: jwt.JWTClaimsRegistry,
    *,
    paused: bool = False,
    watch: GcWatch | None = None,
) -> int:
    """ns taken by joserfc's decode + claims validation of every token."""
    with timed_gc(paused=paused, watch=watch):
        start = time.perf_counter_ns()
        for token in tokens:
            decoded = jwt.decode(token, key, algorithms=["RS256"])
            claims_registry.validate(decoded.claims)
        return time.perf_counter_ns() - start


def per_call_us(nanoseconds: int, calls: int) -> float:
    return nanoseconds / calls / 1000


# -- 1. warm request ---------------------------------------------------------------------------


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
        wrapped = middleware(bare_app, auth, http_client=client)
        logged = middleware(bare_app, auth, http_client=client)
        with_callback = middleware(bare_app, auth, http_client=client, on_audit=sink)
        token = auth.mint(SUBJECT, audience=RESOURCE, scope="read")
        await check_answers_200(wrapped, token, "warm overhead")
        with audit_logged_at_info(stream):
            await check_answers_200(logged, token, "warm overhead, audit logger at INFO")
        # Its records: the fetches of metadata and JWKS (INFO), perhaps the first acceptance.
        if not stream.getvalue():
            fail("warm overhead: the audit handler received nothing from the warm-up request")
        await check_answers_200(with_callback, token, "warm overhead, on_audit")
        # The warm-up's events: two fetches, then the acceptance.
        if not await until(lambda: first_acceptance(sink)):
            fail("warm overhead: on_audit did not receive the first acceptance")
        logged_before = stream.getvalue().count("\n")
        delivered_before = with_callback.stats()["audit"]["delivered"]
        headers = headers_for(token)
        n = config.warm_calls
        samples: dict[str, list[float]] = {
            "bare": [],
            "wrapped": [],
            "logged": [],
            "callback": [],
            "bare_gc_paused": [],
            "wrapped_gc_paused": [],
        }
        delivery_us: list[float] = []
        apps = {"wrapped": wrapped, "logged": logged, "callback": with_callback}

        async def timed_batch(case: str) -> None:
            scopes = [http_scope(headers) for _ in range(n)]
            paused = case.endswith("_gc_paused")
            name = case.removesuffix("_gc_paused")
            if name == "bare":
                samples[case].append(
                    per_call_us(await time_calls(bare_app, scopes, paused=paused), n)
                )
                return
            app = apps[name]
            before = requests_of(app)
            if name == "logged":
                with audit_logged_at_info(stream):
                    samples[case].append(per_call_us(await time_calls(app, scopes), n))
            elif name == "callback":
                expected = sink.received + n
                samples[case].append(per_call_us(await time_calls(app, scopes), n))
                nanoseconds = await drain_audit(with_callback, sink, expected, "warm overhead")
                delivery_us.append(per_call_us(nanoseconds, n))
                last = sink.last[-1]
                if not (isinstance(last, AuthenticationEvent) and last.cached):
                    fail("warm overhead: on_audit did not receive the cache-hit events")
            else:
                nanoseconds = await time_calls(app, scopes, paused=paused)
                samples[case].append(per_call_us(nanoseconds, n))
            check_batch(app, before, n, f"warm overhead ({case})", hits=True)

        cases = list(samples)
        for round_ in range(config.rounds):
            # The order of the batches rotates from round to round.
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
    paused_bare, paused_wrapped = (
        summary(samples["bare_gc_paused"]),
        summary(samples["wrapped_gc_paused"]),
    )
    return {
        "bare_us": bare,
        "wrapped_us": plain,
        "added_us": plain_added,
        "ratio_wrapped_to_bare": plain["median"] / bare["median"],
        "target_added_us": TARGET_ADDED_US,
        "target_met": plain_added <= TARGET_ADDED_US,
        "gc_paused": {
            "bare_us": paused_bare,
            "wrapped_us": paused_wrapped,
            "added_us": paused_wrapped["median"] - paused_bare["median"],
        },
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


# -- 2. warm request, caches full --------------------------------------------------------------


async def full_caches(auth: LocalAuthorizationServer, config: Config) -> dict[str, Any]:
    """Section 2: ``full_tokens`` validated tokens and as many grants cached (the default
    sizes of both caches), then requests cycling through those tokens, bare and wrapped."""
    n, calls = config.full_tokens, config.warm_calls
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    client = auth.http_client()  # the token endpoint in process: filling the caches is fast
    bare = starlette_app()
    try:
        wrapped = middleware(
            bare, auth, http_client=client, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
        )
        started = time.perf_counter()
        tokens = [auth.mint(f"user{i}", audience=RESOURCE, scope="read") for i in range(n)]
        headers = [headers_for(token) for token in tokens]
        minted = time.perf_counter() - started
        statuses, record = _common.status_recorder()
        for header in headers:
            scope = http_scope(header)
            await wrapped(scope, receive, record)
            context = scope.get("state", {}).get("access_context")
            if not isinstance(context, AccessContext):
                fail("caches full: a request to fill the caches reached the app unauthenticated")
            grant = await context.exchange(UPSTREAM)
            if not grant.access_token:
                fail("caches full: an exchange gave no token")
        filled = time.perf_counter() - started - minted
        stats = wrapped.stats()
        if (
            statuses != [200] * n
            or stats["caches"]["tokens"]["misses"] != n
            or stats["caches"]["grants"]["miss"] != n
            or auth.requests["/token"] != n
        ):
            fail(f"caches full: {n} requests and exchanges did not validate {n} tokens, once each")
        del scope, context, grant
        samples: dict[str, list[float]] = defaultdict(list)
        totals: dict[str, int] = defaultdict(int)
        watches = {"bare": GcWatch(), "wrapped": GcWatch()}
        cursor = 0

        async def timed_batch(case: str, scopes: list[Scope]) -> None:
            paused = case.endswith("_gc_paused")
            name = case.removesuffix("_gc_paused")
            app = wrapped if name == "wrapped" else bare
            before = requests_of(wrapped)
            watch = None if paused else watches[name]
            nanoseconds = await time_calls(app, scopes, paused=paused, watch=watch)
            samples[case].append(per_call_us(nanoseconds, calls))
            if not paused:
                totals[case] += nanoseconds
            if name == "wrapped":
                check_batch(wrapped, before, calls, f"caches full ({case})", hits=True)

        cases = ["bare", "wrapped", "bare_gc_paused", "wrapped_gc_paused"]
        for round_ in range(config.rounds):
            shift = round_ % len(cases)
            for case in cases[shift:] + cases[:shift]:
                # The next `calls` tokens of the cycle (every batch its own).
                scopes = [http_scope(headers[(cursor + i) % n]) for i in range(calls)]
                cursor = (cursor + calls) % n
                await timed_batch(case, scopes)
        exchanger = wrapped._exchanger
        assert exchanger is not None
        if len(wrapped._tokens._entries) != n or len(exchanger._grants) != n:
            fail(f"caches full: the caches no longer hold {n} tokens and {n} grants")
    finally:
        await wrapped.aclose()
        await client.aclose()
    results: dict[str, Any] = {name: summary(values) for name, values in samples.items()}
    bare_us, wrapped_us = results["bare"]["median"], results["wrapped"]["median"]
    added = wrapped_us - bare_us
    every = (totals["wrapped"] - totals["bare"]) / (config.rounds * calls) / 1000
    return {
        "tokens": n,
        "grants": n,
        "bare_us": results["bare"],
        "wrapped_us": results["wrapped"],
        "added_us": added,
        "added_to_bare": added / bare_us,
        "added_every_request_us": every,
        "target_added_us": TARGET_FULL_ADDED_US,
        "target_ratio": TARGET_FULL_RATIO,
        "added_target_met": added <= TARGET_FULL_ADDED_US,
        "ratio_target_met": added / bare_us <= TARGET_FULL_RATIO,
        "gc": {name: watch.figures(config.rounds * calls) for name, watch in watches.items()},
        "gc_paused": {
            "bare_us": results["bare_gc_paused"],
            "wrapped_us": results["wrapped_gc_paused"],
            "added_us": results["wrapped_gc_paused"]["median"]
            - results["bare_gc_paused"]["median"],
        },
        "mint_seconds": minted,
        "fill_seconds": filled,
    }


# -- 3. first-seen token -----------------------------------------------------------------------


async def first_seen(
    auth: LocalAuthorizationServer,
    *,
    rounds: int,
    tokens: int,
    app: ASGIApp,
    check: Callable[[Scope], str | None],
    best_case: bool,
    time_bare: bool,
) -> dict[str, Any]:
    """A fresh middleware around ``app`` each round (empty validation cache; metadata and JWKS
    fetched by one checked warm-up request, whose scope ``check`` vets), then ``tokens``
    never-seen tokens through it, and joserfc on the same tokens, the order alternating by
    round. With ``best_case``, both again on another fresh middleware, the GC paused; with
    ``time_bare``, ``app`` alone too. Between rounds, untimed, the round's middleware is
    dropped and the garbage collector run: a server keeps one middleware, whose cache evicts."""
    minted = [auth.mint(SUBJECT, audience=RESOURCE, scope="read") for _ in range(tokens)]
    headers = [headers_for(token) for token in minted]
    warm_token = auth.mint(SUBJECT, audience=RESOURCE, scope="read")
    public_key = jwk.RSAKey.import_key(auth.signing_key.as_dict(private=False))
    claims_registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": auth.issuer},
        aud={"essential": True, "value": RESOURCE},
        exp={"essential": True},
        sub={"essential": True},
    )
    client = auth.http_client()
    samples: dict[str, list[float]] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    watches = {"wrapped": GcWatch(), "joserfc": GcWatch()}

    async def batch(case: str, paused: bool) -> None:
        watch = None if paused else watches[case]
        if case == "joserfc":
            nanoseconds = time_joserfc(
                minted, public_key, claims_registry, paused=paused, watch=watch
            )
        else:
            wrapped = middleware(app, auth, http_client=client)
            problem = check(await check_answers_200(wrapped, warm_token, "first-seen"))
            if problem:
                fail(f"first-seen: {problem}")
            before = requests_of(wrapped)
            scopes = [http_scope(h) for h in headers]
            nanoseconds = await time_calls(wrapped, scopes, paused=paused, watch=watch)
            check_batch(wrapped, before, tokens, "first-seen", hits=False)
            await wrapped.aclose()
        name = f"{case}_gc_paused" if paused else case
        samples[name].append(per_call_us(nanoseconds, tokens))
        totals[name] += nanoseconds

    try:
        for round_ in range(rounds):
            order = ("wrapped", "joserfc")[:: 1 if round_ % 2 else -1]
            for case in order:
                await batch(case, paused=False)
            if best_case:
                for case in order:
                    await batch(case, paused=True)
            if time_bare:
                scopes = [http_scope(h) for h in headers]
                samples["bare"].append(per_call_us(await time_calls(app, scopes), tokens))
            gc.collect()
    finally:
        await client.aclose()
    results: dict[str, Any] = {f"{name}_us": summary(values) for name, values in samples.items()}
    wrapped_us, joserfc_us = results["wrapped_us"]["median"], results["joserfc_us"]["median"]
    results["tokens_per_round"] = tokens
    results["rounds"] = rounds
    results["ratio_wrapped_to_joserfc"] = wrapped_us / joserfc_us
    # Counting every token: all the time of all the batches, over all the tokens.
    results["every_token_wrapped_us"] = per_call_us(totals["wrapped"], rounds * tokens)
    results["every_token_joserfc_us"] = per_call_us(totals["joserfc"], rounds * tokens)
    results["every_token_ratio"] = totals["wrapped"] / totals["joserfc"]
    results["gc"] = {name: watch.figures(rounds * tokens) for name, watch in watches.items()}
    if time_bare:
        results["ratio_wrapped_minus_bare_to_joserfc"] = (
            wrapped_us - results["bare_us"]["median"]
        ) / joserfc_us
    if best_case:
        results["gc_paused_ratio"] = (
            results["wrapped_gc_paused_us"]["median"] / results["joserfc_gc_paused_us"]["median"]
        )
    return results


def targets(results: dict[str, Any], median: float, every: float) -> dict[str, Any]:
    met_median = results["ratio_wrapped_to_joserfc"] <= median
    met_every = results["every_token_ratio"] <= every
    return {
        **results,
        "target_ratio": median,
        "target_every_token_ratio": every,
        "target_met": met_median,
        "every_token_target_met": met_every,
    }


def no_sdk_principal(scope: Scope) -> str | None:
    return "the middleware set an SDK principal" if "user" in scope else None


async def first_seen_plain(auth: LocalAuthorizationServer, config: Config) -> dict[str, Any]:
    """Section 3a, in this process: no MCP SDK."""
    if "mcp" in sys.modules:
        fail("the MCP SDK is imported in the main run: section 3a would build its principal")
    results = await first_seen(
        auth,
        rounds=config.rounds,
        tokens=config.first_seen_tokens,
        app=bare_app,
        check=no_sdk_principal,
        best_case=True,
        time_bare=True,
    )
    return targets(results, TARGET_FIRST_SEEN_RATIO, TARGET_EVERY_TOKEN_RATIO)


async def first_seen_sdk(config: Config) -> dict[str, Any]:
    """Sections 3b and 3c (``--sdk``, a process of their own): the MCP SDK imported before
    the middleware is built, the principal read by the app; then the ``MCPServer`` built."""
    if "mcp" in sys.modules:
        fail("--sdk: the MCP SDK was imported before the benchmark imported it")
    # As an MCP server does: the SDK imported before the middleware is built.
    import mcp
    import mcp.server.auth.middleware.bearer_auth  # noqa: F401

    auth = LocalAuthorizationServer()
    reader = PrincipalReader()

    def principal_read(scope: Scope) -> str | None:
        if reader.wrong:
            return f"{reader.wrong} requests reached the app without alice's SDK principal"
        return None

    imported = await first_seen(
        auth,
        rounds=config.rounds,
        tokens=config.first_seen_tokens,
        app=reader.app,
        check=principal_read,
        best_case=False,
        time_bare=False,
    )
    if reader.wrong:
        fail(f"--sdk: {reader.wrong} timed requests read no principal of alice's")
    from mcp.server import MCPServer

    audit = logging.getLogger(AUDIT_LOGGER)
    if audit.isEnabledFor(logging.INFO):
        fail("--sdk: the audit logger was enabled before the MCPServer was built")
    server = MCPServer("bench")  # its default log_level, INFO: for the whole process
    handlers = [type(handler).__name__ for handler in logging.getLogger().handlers]
    if not audit.isEnabledFor(logging.INFO):
        fail("--sdk: building the MCPServer did not turn INFO logging on")
    built = await first_seen(
        auth,
        rounds=config.server_rounds,
        tokens=config.server_tokens,
        app=reader.app,
        check=principal_read,
        best_case=False,
        time_bare=False,
    )
    if reader.wrong:
        fail(f"--sdk: {reader.wrong} timed requests read no principal of alice's")
    del server
    return {
        "sdk_imported": targets(imported, TARGET_SDK_RATIO, TARGET_EVERY_TOKEN_RATIO),
        "mcp_server_built": {
            **targets(built, TARGET_SERVER_RATIO, TARGET_SERVER_RATIO),
            "root_handlers": handlers,
        },
    }


async def sdk_in_subprocess(config: Config, quick: bool) -> dict[str, Any]:
    argv = ["--sdk", "--json", "--rounds", str(config.rounds), *(["--quick"] if quick else [])]
    document, logged = await asyncio.to_thread(
        _common.run_worker, "bench_core", "benchmarks.bench_core", argv
    )
    sdk: dict[str, Any] = document["first_seen_sdk"]
    # What the MCPServer's handler wrote: the first acceptances of tokens, if logged at INFO,
    # and everything else logged at INFO (fetches of metadata and JWKS, httpx's requests).
    built = sdk["mcp_server_built"]
    built["acceptances_logged"] = logged.count("authentication accepted")
    built["lines_logged"] = sum(1 for line in logged.splitlines() if line.strip())
    sdk["environment"] = document["environment"]
    return sdk


# -- report ------------------------------------------------------------------------------------


ROW = "  {:<58}{:>9}  {:<17}{}"


def _timed(label: str, stats: dict[str, float]) -> str:
    spread = f"({stats['min']:.2f}-{stats['max']:.2f})"
    return ROW.format(label, f"{stats['median']:.2f}", spread, "")


def _figure(label: str, value: str, target: str = "") -> str:
    return ROW.format(label, value, "", target)


def _ratio_rows(first: dict[str, Any]) -> list[str]:
    median, every = first["target_ratio"], first["target_every_token_ratio"]
    return [
        _figure(
            "ratio wrapped / joserfc (median of rounds)",
            f"{first['ratio_wrapped_to_joserfc']:.2f}x",
            f"<= {median:g}x: {verdict(first['target_met'])}",
        ),
        _figure(
            "counting every token: wrapped, µs/token",
            f"{first['every_token_wrapped_us']:.2f}",
            "(all batches, all collections)",
        ),
        _figure(
            "counting every token: joserfc, µs/token", f"{first['every_token_joserfc_us']:.2f}"
        ),
        _figure(
            "ratio wrapped / joserfc, counting every token",
            f"{first['every_token_ratio']:.2f}x",
            f"<= {every:g}x: {verdict(first['every_token_target_met'])}",
        ),
        _gc_row("GC in the wrapped batches: collections, µs/token", first["gc"]["wrapped"]),
        _gc_row("GC in the joserfc batches: collections, µs/token", first["gc"]["joserfc"]),
    ]


def _gc_row(label: str, gc_figures: dict[str, Any]) -> str:
    collections = "/".join(str(c) for c in gc_figures["collections"])
    return _figure(label, f"{gc_figures['gc_us_per_call']:.2f}", f"(gen0/1/2: {collections})")


def render_sdk(sdk: dict[str, Any]) -> list[str]:
    imported, built = sdk["sdk_imported"], sdk["mcp_server_built"]
    lines = [
        "   b. the MCP SDK imported before the middleware (its principal built), and read by the",
        "      app as the SDK's streamable-HTTP transport does (scope['user'], its principal);",
        "      a process of its own",
        _timed("DelegationMiddleware(app reading the principal)", imported["wrapped_us"]),
        _timed("joserfc jwt.decode + JWTClaimsRegistry.validate", imported["joserfc_us"]),
        *_ratio_rows(imported),
        "",
        "   c. as b, the SDK's MCPServer built (its default log level, INFO, for the process:",
        f"      root handlers {', '.join(built['root_handlers']) or 'none'}, writing to stderr); "
        f"{built['rounds']} rounds of {built['tokens_per_round']} tokens",
        _timed("DelegationMiddleware(app reading the principal)", built["wrapped_us"]),
        _timed("joserfc jwt.decode + JWTClaimsRegistry.validate", built["joserfc_us"]),
        *_ratio_rows(built),
    ]
    if "lines_logged" in built:
        lines.append(
            _figure(
                "the handler's lines: first acceptances, in all",
                f"{built['acceptances_logged']}, {built['lines_logged']}",
                "(informational)",
            )
        )
    return lines


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    if "warm" not in results:  # --sdk alone
        lines = _common.heading(
            "asgi_delegation core benchmark, the MCP SDK imported (--sdk)",
            env,
            f"{mode}: {config.rounds} rounds of {config.first_seen_tokens} first-seen tokens",
            "per-call µs, median over rounds (min-max of the per-round means)",
        )
        lines += ["3. First-seen token validation, the MCP SDK imported", ""]
        return _common.joined(lines + render_sdk(results["first_seen_sdk"]))
    warm, full, first = results["warm"], results["full_caches"], results["first_seen"]
    lines = _common.heading(
        "asgi_delegation core benchmark",
        env,
        f"{mode}: {config.rounds} interleaved rounds; {config.warm_calls} warm calls and "
        f"{config.first_seen_tokens} first-seen tokens per round; {config.full_tokens} tokens "
        "and grants cached in section 2",
        "per-call µs, median over rounds (min-max of the per-round means); the garbage "
        f"collector on, except in the rows labelled '{BEST_CASE}'",
    )

    def added(label: str, microseconds: float, met: bool) -> str:
        target = f"<= {TARGET_ADDED_US:g} µs: {verdict(met)}"
        return ROW.format(label, f"{microseconds:.2f}", "", target)

    def over_plain(case: dict[str, Any]) -> str:
        label = "added by auditing (vs the plain middleware)"
        return ROW.format(label, f"{case['added_over_plain_us']:.2f}", "", "(per-round diff.)")

    logged, callback = warm["audit_logger_info"], warm["on_audit_callback"]
    paused = warm["gc_paused"]
    full_paused = full["gc_paused"]
    lines += [
        "1. Warm request overhead (same valid token every call: validation cache hit)",
        ROW.format("", "µs/req", "range", "target"),
        _timed("bare app", warm["bare_us"]),
        _timed("DelegationMiddleware(bare app)", warm["wrapped_us"]),
        added("added by the middleware", warm["added_us"], warm["target_met"]),
        ROW.format("ratio wrapped / bare", f"{warm['ratio_wrapped_to_bare']:.1f}x", "", ""),
        _timed(f"{BEST_CASE}: bare app", paused["bare_us"]),
        _timed(f"{BEST_CASE}: DelegationMiddleware(bare app)", paused["wrapped_us"]),
        _figure(f"{BEST_CASE}: added", f"{paused['added_us']:.2f}", "(informational)"),
        "",
        "   a. auditing on: the asgi_delegation.audit logger at INFO, a StreamHandler attached",
        _timed("DelegationMiddleware(bare app)", logged["wrapped_us"]),
        added("added by the middleware", logged["added_us"], logged["target_met"]),
        ROW.format("ratio wrapped / bare", f"{logged['ratio_to_bare']:.1f}x", "", ""),
        over_plain(logged),
        ROW.format(
            "records logged by the timed requests",
            str(logged["records_logged_by_timed_requests"]),
            "",
            "(cache hits are DEBUG)",
        ),
        "",
        "   b. auditing on: an on_audit callback (sync, counts into a deque)",
        _timed("DelegationMiddleware(bare app, on_audit=callback)", callback["wrapped_us"]),
        added(
            "added by the middleware (request path)", callback["added_us"], callback["target_met"]
        ),
        ROW.format("ratio wrapped / bare", f"{callback['ratio_to_bare']:.1f}x", "", ""),
        over_plain(callback),
        _timed(
            "audit worker's delivery, per event (after the batch)",
            callback["delivery_us_per_event"],
        ),
        added(
            "added, delivery included",
            callback["added_with_delivery_us"],
            callback["target_met_with_delivery"],
        ),
        ROW.format(
            "ratio (wrapped + delivery) / bare",
            f"{callback['ratio_with_delivery_to_bare']:.1f}x",
            "",
            "",
        ),
        ROW.format(
            "events delivered / dropped / callback errors",
            f"{callback['delivered']} / {callback['dropped']} / {callback['callback_errors']}",
            "",
            "",
        ),
        "",
        f"2. Warm request, caches full: {full['tokens']} validated tokens and {full['grants']} "
        "grants cached, the requests cycling through those tokens, a Starlette app with one route",
        ROW.format("", "µs/req", "range", "target"),
        _timed("Starlette app", full["bare_us"]),
        _timed("DelegationMiddleware(Starlette app)", full["wrapped_us"]),
        _figure(
            "added by the middleware",
            f"{full['added_us']:.2f}",
            f"<= {TARGET_FULL_ADDED_US:g} µs: {verdict(full['added_target_met'])}",
        ),
        _figure(
            "added / the Starlette app's own cost",
            f"{full['added_to_bare']:.2f}x",
            f"<= {TARGET_FULL_RATIO:g}x: {verdict(full['ratio_target_met'])}",
        ),
        _figure(
            "added, counting every request (all batches)",
            f"{full['added_every_request_us']:.2f}",
            "(informational)",
        ),
        _gc_row("GC in the Starlette batches: collections, µs/req", full["gc"]["bare"]),
        _gc_row("GC in the wrapped batches: collections, µs/req", full["gc"]["wrapped"]),
        _timed(f"{BEST_CASE}: Starlette app", full_paused["bare_us"]),
        _timed(f"{BEST_CASE}: DelegationMiddleware(Starlette app)", full_paused["wrapped_us"]),
        _figure(f"{BEST_CASE}: added", f"{full_paused['added_us']:.2f}", "(informational)"),
        _figure(
            "filling the caches: minting, requests + exchanges (s)",
            f"{full['mint_seconds']:.1f}, {full['fill_seconds']:.1f}",
            "(untimed setup)",
        ),
        "",
        "3. First-seen token validation (a distinct new token every call, JWKS warm)",
        ROW.format("", "µs/req", "range", "target"),
        "   a. without the MCP SDK",
        _timed("bare app (the ASGI call alone)", first["bare_us"]),
        _timed("DelegationMiddleware(bare app), first-seen token", first["wrapped_us"]),
        _timed("joserfc jwt.decode + JWTClaimsRegistry.validate", first["joserfc_us"]),
        *_ratio_rows(first),
        _figure(
            "ratio (wrapped - bare) / joserfc",
            f"{first['ratio_wrapped_minus_bare_to_joserfc']:.2f}x",
            "(informational)",
        ),
        _timed(f"{BEST_CASE}: DelegationMiddleware(bare app)", first["wrapped_gc_paused_us"]),
        _timed(f"{BEST_CASE}: joserfc", first["joserfc_gc_paused_us"]),
        _figure(f"{BEST_CASE}: ratio", f"{first['gc_paused_ratio']:.2f}x", "(informational)"),
        "",
        *render_sdk(results["first_seen_sdk"]),
    ]
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_core",
        description="Warm request overhead and first-seen token validation of "
        "DelegationMiddleware, against a bare ASGI app, a Starlette app and joserfc.",
        rounds_help=f"interleaved rounds (default {DEFAULT.rounds}; {QUICK.rounds} with --quick)",
        quick_help=f"smaller batches: {QUICK.warm_calls} warm calls and {QUICK.first_seen_tokens} "
        f"first-seen tokens per round, {QUICK.full_tokens} cached tokens and grants (default "
        f"{DEFAULT.warm_calls}, {DEFAULT.first_seen_tokens} and {DEFAULT.full_tokens})",
        sdk_help="only the first-seen rows with the MCP SDK imported (3b, 3c), in this process: "
        "the main run launches this in a second interpreter",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(**{**asdict(base), "rounds": args.rounds or base.rounds})

    async def run(config: Config) -> dict[str, Any]:
        if args.sdk:
            return {"first_seen_sdk": await first_seen_sdk(config)}
        auth = LocalAuthorizationServer()
        return {
            "warm": await warm_overhead(auth, config),
            "full_caches": await full_caches(auth, config),
            "first_seen": await first_seen_plain(auth, config),
            "first_seen_sdk": await sdk_in_subprocess(config, args.quick),
        }

    env = _common.environment("joserfc", "cryptography", "starlette", "mcp")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
