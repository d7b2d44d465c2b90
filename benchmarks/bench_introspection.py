"""Introspection benchmarks of DelegationMiddleware (opaque tokens, RFC 7662), side by side in
one run.

1. Cache hit: the same opaque token on every call, found in the validated-token cache, through
   ``DelegationMiddleware(introspection=True)`` around a bare ASGI app, against the same JWT
   on every call through a JWT-only ``DelegationMiddleware`` around the same app. Target: the
   opaque hit at most 0.5 µs above the JWT hit. Also 10,000 distinct opaque tokens cached (a
   middleware of its own, the default ``token_cache_size``), the calls cycling through them;
   the JWT through the introspection middleware; and the bare app, for reference.
2. First sight: a new opaque token on every call (the cache has never seen it), so one POST to
   the ``/introspect`` endpoint of a ``LocalAuthorizationServer`` served on a loopback port
   (``auth.serve()``), against one bare ``httpx.AsyncClient.post`` of the same form
   (``token=...&token_type_hint=access_token``) with the same client authentication header to
   the same endpoint, through the same client. Target: at most 1.1x.

Measured the way users run it: the garbage collector is ON while the headline batches are
timed. One extra row per section, labelled, times the same batches with the collector paused
(``gc.collect()`` then ``gc.disable()``, as ``timeit`` does); it is informational.

Checked before timing: every token is accepted (200) with alice as its subject, the opaque ones
verified by introspection; a cache hit makes no introspection request (counted on the server,
``auth.requests``), the first sight of a token exactly one; the middleware's POST and the bare
one carry the same headers and the same form but for the token. After each timed batch: every
call reached the app authenticated, and the server counted as many introspection requests as
the batch should have made (none for hits, one per token for first sights).

The ASGI callables are awaited directly (hand-made ``http`` scopes) in one asyncio event loop;
section 1 reaches its authorization server in process (``auth.http_client()``), section 2's is
uvicorn on a loopback port, on a thread of the same process. Batches are interleaved round by
round (section 1 in an order that rotates from round to round; section 2 alternating which goes
first); each figure is the median over rounds of a batch's per-call mean, and each difference
or ratio is of the medians unless it says "per-round".

Run from the project root::

    .venv/bin/python -m benchmarks.bench_introspection            # ~20 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_introspection --quick    # ~7 s
    .venv/bin/python -m benchmarks.bench_introspection --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import base64
import gc
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import httpx

from asgi_delegation import DelegationMiddleware
from asgi_delegation._fetch import HEADERS
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

CLIENT_ID, CLIENT_SECRET = "rs", "s3cret"
SUBJECT = "alice"
TARGET_HIT_DIFF_US = 0.5
TARGET_FIRST_SIGHT_RATIO = 1.1
# Long enough for the cached opaque tokens to outlive the run (the default, 60 s, is shorter
# than a default run); what a hit costs does not depend on it: one comparison with a float.
CACHE_TTL = 900.0
CACHED_TOKENS = 10_000  # the case; also the default token_cache_size


@dataclass(frozen=True)
class Config:
    rounds: int
    hit_calls: int
    cached_tokens: int
    first_sight_calls: int


DEFAULT = Config(rounds=30, hit_calls=2000, cached_tokens=CACHED_TOKENS, first_sight_calls=40)
QUICK = Config(rounds=7, hit_calls=1000, cached_tokens=CACHED_TOKENS, first_sight_calls=20)


# -- the ASGI pieces ---------------------------------------------------------------------------


receive = _common.receiver("tools/list")


def fail(message: str) -> NoReturn:
    _common.abort("bench_introspection", message)


def authorization_server() -> LocalAuthorizationServer:
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    return auth


def jwt_middleware(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient
) -> DelegationMiddleware:
    """A middleware for JWTs only, configured as bench_core's."""
    return DelegationMiddleware(bare_app, issuer=auth.issuer, resource=RESOURCE, http_client=client)


def opaque_middleware(
    auth: LocalAuthorizationServer, client: httpx.AsyncClient, **options: Any
) -> DelegationMiddleware:
    """A middleware that introspects opaque tokens at ``auth`` (client_secret_basic)."""
    return DelegationMiddleware(
        bare_app,
        issuer=auth.issuer,
        resource=RESOURCE,
        http_client=client,
        introspection=True,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        **options,
    )


def introspections(auth: LocalAuthorizationServer) -> int:
    """Requests the server received at its introspection endpoint."""
    return auth.requests[urlsplit(auth.introspection_endpoint).path]


def token_misses(middleware: DelegationMiddleware) -> int:
    misses: int = middleware.stats()["caches"]["tokens"]["misses"]
    return misses


def check_accepted(scope: Scope, statuses: list[int], token: str, by: str, what: str) -> None:
    """The request of ``scope`` was answered 200 and reached the app as alice, with ``token``,
    verified ``by`` "jwt" or "introspection"."""
    if statuses != [200]:
        fail(f"{what}: a request was answered {statuses}, not [200]")
    context = scope.get("state", {}).get("access_context")
    if context is None or context.subject != SUBJECT:
        fail(f"{what}: a request reached the app without {SUBJECT}'s access context")
    if context.subject_token != token or context._valid.verified_by != by:
        fail(f"{what}: a request's access context is not its token's, verified by {by}")


async def request(app: ASGIApp, token: str, by: str, what: str) -> None:
    """One request with ``token``, checked as :func:`check_accepted` says."""
    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token))
    await app(scope, receive, record)
    check_accepted(scope, statuses, token, by, what)


def check_authenticated(scopes: Sequence[Scope], what: str) -> None:
    """Every call of a timed batch must have reached the app with an access context."""
    if not all("access_context" in scope.get("state", {}) for scope in scopes):
        fail(f"{what}: some timed requests were not authenticated")


# -- timing ------------------------------------------------------------------------------------


async def mean_us(awaitables: Iterable[Awaitable[object]], *, paused: bool) -> float:
    """Per-call mean of awaiting each of ``awaitables`` in turn, in µs; the garbage collector
    left on unless ``paused``."""
    with gc_paused() if paused else nullcontext():
        n = 0
        start = time.perf_counter_ns()
        for awaitable in awaitables:
            await awaitable
            n += 1
        elapsed = time.perf_counter_ns() - start
    return elapsed / n / 1000


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """The per-round differences a - b: their median and range."""
    return summary([x - y for x, y in zip(a, b, strict=True)])


# -- 1. cache hit ------------------------------------------------------------------------------


async def cache_hit(config: Config) -> dict[str, Any]:
    auth = authorization_server()
    n, cached = config.hit_calls, config.cached_tokens
    async with auth.http_client() as client:
        plain = jwt_middleware(auth, client)
        opaque = opaque_middleware(auth, client, introspection_cache_ttl=CACHE_TTL)
        # Its own cache (10,000: the default size), filled to the brim with distinct opaque tokens.
        many = opaque_middleware(
            auth, client, introspection_cache_ttl=CACHE_TTL, token_cache_size=cached
        )
        jwt = auth.mint(SUBJECT, audience=RESOURCE, scope="read")
        token = auth.mint_opaque(SUBJECT, audience=RESOURCE, scope="read")
        if token.count(".") or len(token) >= len(jwt):
            fail("cache hit: the opaque token looks like a JWT")
        await request(plain, jwt, "jwt", "cache hit, JWT")
        await request(opaque, jwt, "jwt", "cache hit, JWT through the introspection middleware")
        before = introspections(auth)
        await request(opaque, token, "introspection", "cache hit, opaque (first sight)")
        if introspections(auth) != before + 1:
            fail("cache hit: the opaque token's first sight did not make one introspection")
        await request(opaque, token, "introspection", "cache hit, opaque (second request)")
        await request(plain, jwt, "jwt", "cache hit, JWT (second request)")
        if introspections(auth) != before + 1:
            fail("cache hit: the opaque token's second request reached the endpoint")
        tokens = [auth.mint_opaque(SUBJECT, audience=RESOURCE, scope="read") for _ in range(cached)]
        before = introspections(auth)
        for t in tokens:
            await request(many, t, "introspection", f"cache hit, {cached} opaque tokens")
        if introspections(auth) != before + cached or token_misses(many) != cached:
            fail(f"cache hit: filling the cache did not introspect each of {cached} tokens once")
        for t in tokens[:100]:  # the oldest: none may have been evicted
            await request(many, t, "introspection", f"cache hit, {cached} opaque tokens (again)")
        if introspections(auth) != before + cached:
            fail(f"cache hit: the cache does not hold all {cached} tokens")
        baseline = introspections(auth), token_misses(plain), token_misses(opaque)
        baseline_many = token_misses(many)

        jwt_headers, opaque_headers = headers_for(jwt), headers_for(token)
        many_headers = [headers_for(t) for t in tokens]
        offset = 0

        def many_scopes() -> list[Scope]:
            nonlocal offset
            chosen = [many_headers[(offset + i) % cached] for i in range(n)]
            offset = (offset + n) % cached
            return [http_scope(h) for h in chosen]

        cases: dict[str, tuple[ASGIApp, Callable[[], list[Scope]], bool]] = {
            "bare_us": (bare_app, lambda: [http_scope(jwt_headers) for _ in range(n)], False),
            "jwt_us": (plain, lambda: [http_scope(jwt_headers) for _ in range(n)], False),
            "opaque_us": (opaque, lambda: [http_scope(opaque_headers) for _ in range(n)], False),
            "opaque_many_us": (many, many_scopes, False),
            "jwt_on_opaque_us": (
                opaque,
                lambda: [http_scope(jwt_headers) for _ in range(n)],
                False,
            ),
            "jwt_paused_us": (plain, lambda: [http_scope(jwt_headers) for _ in range(n)], True),
            "opaque_paused_us": (
                opaque,
                lambda: [http_scope(opaque_headers) for _ in range(n)],
                True,
            ),
        }
        samples: dict[str, list[float]] = defaultdict(list)
        names = list(cases)
        for round_ in range(config.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                app, make, paused = cases[name]
                scopes = make()
                samples[name].append(
                    await mean_us((app(s, receive, discard) for s in scopes), paused=paused)
                )
                if app is not bare_app:
                    check_authenticated(scopes, f"cache hit ({name})")
        after = introspections(auth), token_misses(plain), token_misses(opaque)
        if after != baseline or token_misses(many) != baseline_many:
            fail("cache hit: a timed request missed the cache or reached the endpoint")
        gc_objects = len(gc.get_objects())
    results: dict[str, Any] = {name: summary(values) for name, values in samples.items()}
    median = {name: results[name]["median"] for name in samples}
    diff = paired(samples["opaque_us"], samples["jwt_us"])
    many_diff = paired(samples["opaque_many_us"], samples["jwt_us"])
    results.update(
        {
            "opaque_minus_jwt_us": diff,
            "opaque_minus_jwt_of_medians_us": median["opaque_us"] - median["jwt_us"],
            "opaque_many_minus_jwt_us": many_diff,
            "opaque_many_minus_opaque_us": paired(samples["opaque_many_us"], samples["opaque_us"]),
            "jwt_on_opaque_minus_jwt_us": paired(samples["jwt_on_opaque_us"], samples["jwt_us"]),
            "paused_opaque_minus_jwt_us": paired(
                samples["opaque_paused_us"], samples["jwt_paused_us"]
            ),
            "opaque_minus_bare_us": median["opaque_us"] - median["bare_us"],
            "jwt_minus_bare_us": median["jwt_us"] - median["bare_us"],
            "gc_on_minus_paused_opaque_us": paired(
                samples["opaque_us"], samples["opaque_paused_us"]
            ),
            "jwt_chars": len(jwt),
            "opaque_chars": len(token),
            "cached_tokens": cached,
            "introspections_by_timed_hits": after[0] - baseline[0],
            "gc_tracked_objects": gc_objects,
            "target_diff_us": TARGET_HIT_DIFF_US,
            "target_met": diff["median"] <= TARGET_HIT_DIFF_US,
            "many_target_met": many_diff["median"] <= TARGET_HIT_DIFF_US,
        }
    )
    return results


# -- 2. first sight against a bare POST --------------------------------------------------------


class Recorder:
    """httpx event hooks that keep the requests to one path (installed only for the checks)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[httpx.Request] = []

    async def on_request(self, request: httpx.Request) -> None:
        if request.url.path == self.path:
            self.requests.append(request)


def described(request: httpx.Request) -> tuple[str, str, dict[str, str], dict[str, list[str]]]:
    """A request's method, URL, headers (content-length aside) and form, its token left out."""
    form = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    form.pop("token", None)
    headers = {k: v for k, v in request.headers.items() if k != "content-length"}
    return request.method, str(request.url), headers, form


async def first_sight(config: Config) -> dict[str, Any]:
    auth = authorization_server()
    n = config.first_sight_calls
    async with auth.serve(), httpx.AsyncClient() as client:
        endpoint = auth.introspection_endpoint
        if urlsplit(endpoint).hostname != "127.0.0.1":
            fail(f"first sight: the endpoint {endpoint} is not on 127.0.0.1")
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        bare_headers = {**HEADERS, "Authorization": f"Basic {basic}"}
        wrapped = opaque_middleware(auth, client)

        async def bare_post(token: str) -> httpx.Response:
            form = {"token": token, "token_type_hint": "access_token"}
            response = await client.post(endpoint, data=form, headers=bare_headers)
            if response.status_code != 200:  # the answer is read, not parsed, as the timed POSTs
                fail(f"first sight: the bare POST was answered {response.status_code}")
            return response

        async def checked_bare_post(token: str) -> None:
            claims = (await bare_post(token)).json()
            if claims.get("active") is not True or claims.get("sub") != SUBJECT:
                fail("first sight: the bare POST's answer is not an active token of alice's")

        def new_tokens() -> list[str]:
            return [auth.mint_opaque(SUBJECT, audience=RESOURCE, scope="read") for _ in range(n)]

        # The warm-up: metadata discovered, a connection opened, one introspection.
        await request(wrapped, new_tokens()[0], "introspection", "first sight, warm-up")
        await checked_bare_post(new_tokens()[0])
        # The middleware's POST and the bare one, side by side.
        recorder = Recorder(urlsplit(endpoint).path)
        client.event_hooks = {"request": [recorder.on_request], "response": []}
        try:
            before = introspections(auth)
            await request(wrapped, new_tokens()[0], "introspection", "first sight, compared")
            await checked_bare_post(new_tokens()[0])
        finally:
            client.event_hooks = {"request": [], "response": []}
        if introspections(auth) != before + 2 or len(recorder.requests) != 2:
            fail("first sight: a first sight and a bare POST did not make one request each")
        ours, theirs = (described(r) for r in recorder.requests)
        if ours != theirs:
            fail(f"first sight: the middleware's POST {ours} differs from the bare one {theirs}")
        if ours[3] != {"token_type_hint": ["access_token"]}:
            fail(f"first sight: the form is not token + token_type_hint: {ours[3]}")

        samples: dict[str, list[float]] = defaultdict(list)

        async def through_middleware(name: str, paused: bool) -> None:
            tokens = new_tokens()
            recorders = [_common.status_recorder() for _ in tokens]
            scopes = [http_scope(headers_for(t)) for t in tokens]
            before, misses = introspections(auth), token_misses(wrapped)
            samples[name].append(
                await mean_us(
                    (
                        wrapped(scope, receive, record)
                        for scope, (_, record) in zip(scopes, recorders, strict=True)
                    ),
                    paused=paused,
                )
            )
            if introspections(auth) - before != n or token_misses(wrapped) - misses != n:
                fail(f"first sight ({name}): not exactly one introspection per new token")
            for scope, (statuses, _), token in zip(scopes, recorders, tokens, strict=True):
                check_accepted(scope, statuses, token, "introspection", f"first sight ({name})")

        async def bare(name: str, paused: bool) -> None:
            tokens = new_tokens()
            before = introspections(auth)
            samples[name].append(await mean_us((bare_post(t) for t in tokens), paused=paused))
            if introspections(auth) - before != n:
                fail(f"first sight ({name}): not one request per bare POST")

        for round_ in range(config.rounds):
            pairs = [
                (through_middleware("first_sight_us", False), bare("bare_post_us", False)),
                (
                    through_middleware("first_sight_paused_us", True),
                    bare("bare_post_paused_us", True),
                ),
            ]
            for first, second in pairs:
                order = (first, second) if round_ % 2 == 0 else (second, first)
                for batch in order:
                    await batch
    results: dict[str, Any] = {name: summary(values) for name, values in samples.items()}
    ours_us, bare_us = results["first_sight_us"]["median"], results["bare_post_us"]["median"]
    paused_ours = results["first_sight_paused_us"]["median"]
    paused_bare = results["bare_post_paused_us"]["median"]
    ratio = ours_us / bare_us
    results.update(
        {
            "added_us": ours_us - bare_us,
            "added_per_round_us": paired(samples["first_sight_us"], samples["bare_post_us"]),
            "ratio": ratio,
            "ratio_per_round": summary(
                [
                    a / b
                    for a, b in zip(samples["first_sight_us"], samples["bare_post_us"], strict=True)
                ]
            ),
            "paused_added_us": paused_ours - paused_bare,
            "paused_ratio": paused_ours / paused_bare,
            "target_ratio": TARGET_FIRST_SIGHT_RATIO,
            "target_met": ratio <= TARGET_FIRST_SIGHT_RATIO,
        }
    )
    return results


# -- report ------------------------------------------------------------------------------------


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    hit, first = results["cache_hit"], results["first_sight"]
    lines = _common.heading(
        "asgi_delegation introspection benchmark",
        env,
        f"{mode}: {config.rounds} interleaved rounds; {config.hit_calls} cache hits per batch "
        f"({config.cached_tokens} cached opaque tokens in one row); {config.first_sight_calls} "
        f"first sights per batch; garbage collector ON unless a row says paused",
        "per-call µs, median over rounds (min-max of the per-round means)",
    )
    row = "  {:<62}{:>9}  {:<19}{}"

    def timed(label: str, stats: dict[str, float], digits: int = 2) -> str:
        spread = f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
        return row.format(label, f"{stats['median']:.{digits}f}", spread, "")

    def differed(label: str, stats: dict[str, float], target: str = "", digits: int = 2) -> str:
        spread = f"({stats['min']:+.{digits}f} to {stats['max']:+.{digits}f})"
        return row.format(label, f"{stats['median']:+.{digits}f}", spread, target)

    def figure(label: str, value: str, target: str = "") -> str:
        return row.format(label, value, "", target)

    goal = f"<= +{TARGET_HIT_DIFF_US:g} µs"
    lines += [
        f"1. Validated-token cache hit (same token every call; opaque {hit['opaque_chars']} chars, "
        f"JWT {hit['jwt_chars']} chars)",
        row.format("", "µs/req", "range", "target"),
        timed("bare app (reference)", hit["bare_us"]),
        timed("DelegationMiddleware, JWT cache hit", hit["jwt_us"]),
        timed("DelegationMiddleware(introspection=True), opaque cache hit", hit["opaque_us"]),
        differed(
            "  opaque hit - JWT hit (per-round difference)",
            hit["opaque_minus_jwt_us"],
            f"{goal}: {verdict(hit['target_met'])}",
        ),
        figure(
            "  opaque hit - JWT hit (difference of the medians)",
            f"{hit['opaque_minus_jwt_of_medians_us']:+.2f}",
        ),
        timed(
            f"introspection middleware, {hit['cached_tokens']} opaque tokens cached, cycled",
            hit["opaque_many_us"],
        ),
        differed(
            f"  {hit['cached_tokens']} cached - JWT hit (per-round difference)",
            hit["opaque_many_minus_jwt_us"],
            f"{goal}: {verdict(hit['many_target_met'])}",
        ),
        differed(
            f"  {hit['cached_tokens']} cached - one cached (per-round difference)",
            hit["opaque_many_minus_opaque_us"],
            "(informational)",
        ),
        timed("introspection middleware, JWT cache hit", hit["jwt_on_opaque_us"]),
        differed(
            "  minus the JWT-only middleware's (per-round difference)",
            hit["jwt_on_opaque_minus_jwt_us"],
            "(informational)",
        ),
        figure(
            "introspection requests made by the timed hits",
            str(hit["introspections_by_timed_hits"]),
            "(must be 0)",
        ),
        "   extra, garbage collector PAUSED while timed (not how users run it):",
        timed("  JWT cache hit, GC paused", hit["jwt_paused_us"]),
        timed("  opaque cache hit, GC paused", hit["opaque_paused_us"]),
        differed(
            "  opaque - JWT, GC paused (per-round difference)",
            hit["paused_opaque_minus_jwt_us"],
            "(informational)",
        ),
        differed(
            "  opaque hit, GC on - GC paused (per-round difference)",
            hit["gc_on_minus_paused_opaque_us"],
            "(informational)",
        ),
        "",
        "2. First sight of an opaque token (a new token every call) vs a bare httpx POST of "
        "the same form, loopback /introspect",
        row.format("", "µs/req", "range", "target"),
        timed("bare httpx.AsyncClient.post to /introspect", first["bare_post_us"], 0),
        timed("DelegationMiddleware(introspection=True), first sight", first["first_sight_us"], 0),
        figure("  added by the middleware (difference of the medians)", f"{first['added_us']:.0f}"),
        differed(
            "  added by the middleware (per-round difference)",
            first["added_per_round_us"],
            "",
            0,
        ),
        figure(
            "  ratio first sight / bare POST",
            f"{first['ratio']:.2f}x",
            f"<= {TARGET_FIRST_SIGHT_RATIO:g}x: {verdict(first['target_met'])}",
        ),
        timed("  ratio, per round", first["ratio_per_round"]),
        "   extra, garbage collector PAUSED while timed (not how users run it):",
        timed("  bare POST, GC paused", first["bare_post_paused_us"], 0),
        timed("  first sight, GC paused", first["first_sight_paused_us"], 0),
        figure(
            "  ratio first sight / bare POST, GC paused",
            f"{first['paused_ratio']:.2f}x",
            "(informational)",
        ),
    ]
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_introspection",
        description="Opaque tokens through DelegationMiddleware(introspection=True): a cache "
        "hit against a JWT cache hit, and a token's first sight against a bare POST to the "
        "introspection endpoint.",
        rounds_help=f"interleaved rounds (default {DEFAULT.rounds}; {QUICK.rounds} with --quick)",
        quick_help=f"smaller batches: {QUICK.hit_calls} hits and {QUICK.first_sight_calls} first "
        f"sights per batch (default {DEFAULT.hit_calls} and {DEFAULT.first_sight_calls}); "
        f"still {QUICK.cached_tokens} cached tokens",
    )


async def run(config: Config) -> dict[str, Any]:
    return {"cache_hit": await cache_hit(config), "first_sight": await first_sight(config)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(
        args.rounds or base.rounds, base.hit_calls, base.cached_tokens, base.first_sight_calls
    )
    env = _common.environment("httpx", "anyio", "uvicorn", "h11")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
