"""Per-request costs of DelegationMiddleware's integrations, measured side by side in one run.

1. ``current_access_context()``: the ContextVar set and reset around every authenticated
   request. The warm path (same valid token every call) of the middleware around a bare ASGI
   app, against the bare app: bench_core's case, the baseline of the next one. Also, for
   reference, a ContextVar set + reset on its own.
2. The MCP SDK principal: a middleware built once ``mcp`` is imported also sets
   ``scope["user"]``, ``scope["auth"]`` and the SDK's ``auth_context_var`` per request (the
   objects built once per token). A middleware built before ``import mcp...`` against one built
   after it, same token, same app; the one-off build for a new token is timed on its own.
3. Per-tool scopes (``tool_scopes={"create_issue": ["repo:write"]}``), against the same
   middleware without ``tool_scopes``, the app draining the body: (a) a 2026-07-28 request
   (``Mcp-Method: tools/call``, ``Mcp-Name: create_issue``): the headers read, and the body
   too (read, parsed, replayed: servers dispatch on it); (b) a legacy request (no routing
   headers, a ~200-byte JSON-RPC ``tools/call`` body), the body read, parsed and replayed;
   (c) that legacy request without ``tool_scopes``, the baseline of (b).
4. End to end: sequential ``call_tool`` calls of the official MCP client (mode 2026-07-28,
   httpx2) against an ``MCPServer`` streamable-HTTP app served by uvicorn on 127.0.0.1, bare
   and wrapped by the middleware (token validated once, then cached). The authorization
   server, both MCP servers and the client all run in this one event loop, no thread.

Sections 1-3 await the ASGI callables directly (hand-made scopes) in one asyncio event loop.
Batches are interleaved round by round, in an order that rotates from round to round; each
figure is the median over rounds of the per-call mean of one batch; "added" rows are the median
of the per-round differences with the baseline batch of the same round. The garbage collector
is paused while a batch is timed, as ``timeit`` does. The middlewares of sections 1 and 3 are
built before the MCP SDK is imported (no SDK principal); it is imported between the two
middlewares of section 2.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_integrations            # ~40 s on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_integrations --quick    # ~8 s
    .venv/bin/python -m benchmarks.bench_integrations --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import httpx2

from asgi_delegation import AccessContext, DelegationMiddleware, current_access_context
from asgi_delegation._types import ASGIApp, Message, Receive, Scope, Send
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

from . import _common
from ._common import RESOURCE, discard, gc_paused, headers_for, http_scope, summary

if TYPE_CHECKING:
    from mcp import Client

SCRIPT = "bench_integrations"
TOOL, TOOL_SCOPE = "create_issue", "repo:write"
MODERN = "2026-07-28"
# A legacy JSON-RPC tools/call, about 200 bytes, as a pre-2026 client posts it.
TOOL_CALL = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": TOOL,
            "arguments": {"repo": "acme/api", "title": "Token refresh fails after 1 hour"},
            "_meta": {"progressToken": "c0ffee-7"},
        },
    },
    separators=(",", ":"),
).encode()


@dataclass(frozen=True)
class Config:
    rounds: int
    calls: int
    e2e_rounds: int
    e2e_calls: int


DEFAULT = Config(rounds=30, calls=2000, e2e_rounds=60, e2e_calls=20)
QUICK = Config(rounds=7, calls=1000, e2e_rounds=10, e2e_calls=10)


def fail(message: str) -> NoReturn:
    _common.abort(SCRIPT, message)


# -- the ASGI pieces ---------------------------------------------------------------------------

_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
    "trailers": False,
}
_BODY: Message = {"type": "http.response.body", "body": b"ok", "more_body": False}


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with a tiny body, whatever the request (bench_core's app)."""
    await send(_START)
    await send(_BODY)


class DrainingApp:
    """Reads the whole body (``receive`` until ``more_body`` is false), then answers 200.
    Counts its calls and the bodies that differ from :data:`TOOL_CALL`, and keeps the last
    ``receive`` it was given (the server's own, or the middleware's replay)."""

    def __init__(self) -> None:
        self.calls = 0
        self.wrong_bodies = 0
        self.last_receive: Receive | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.calls += 1
        if body != TOOL_CALL:
            self.wrong_bodies += 1
        self.last_receive = receive
        await send(_START)
        await send(_BODY)


def body_receiver(body: bytes) -> Receive:
    """A ``receive`` that returns the same one-chunk ``http.request`` event every time."""
    request: Message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> Message:
        return request

    return receive


def tool_call_headers(token: str, *, modern: bool) -> list[tuple[bytes, bytes]]:
    """What an MCP client sends with a ``tools/call`` POST of :data:`TOOL_CALL`: from
    revision 2026-07-28 on the routing headers and no session; before it, a session and no
    routing headers."""
    headers = [
        *_common.CLIENT_HEADERS,
        (b"authorization", b"Bearer " + token.encode()),
        (b"content-length", str(len(TOOL_CALL)).encode()),
    ]
    if modern:
        return [
            *headers,
            (b"mcp-protocol-version", MODERN.encode()),
            (b"mcp-method", b"tools/call"),
            (b"mcp-name", TOOL.encode()),
        ]
    return [
        *headers,
        (b"mcp-protocol-version", b"2025-06-18"),
        (b"mcp-session-id", b"4f0c2b9e7d1a4c3b8e6f5a2d1c0b9a87"),
    ]


def middleware(
    app: ASGIApp, auth: LocalAuthorizationServer, client: httpx.AsyncClient, **options: Any
) -> DelegationMiddleware:
    return DelegationMiddleware(
        app, issuer=auth.issuer, resource=RESOURCE, http_client=client, **options
    )


# -- timing ------------------------------------------------------------------------------------


async def time_calls(app: ASGIApp, scopes: Sequence[Scope], receive: Receive) -> float:
    """Per-call mean of awaiting ``app`` once per scope, in µs."""
    with gc_paused():
        start = time.perf_counter_ns()
        for scope in scopes:
            await app(scope, receive, discard)
        elapsed = time.perf_counter_ns() - start
    return elapsed / len(scopes) / 1000


def time_contextvar(calls: int, value: object) -> float:
    """Per-call mean of a ContextVar set + reset (the loop included), in µs."""
    var: ContextVar[object] = ContextVar("bench")
    with gc_paused():
        start = time.perf_counter_ns()
        for _ in range(calls):
            token = var.set(value)
            var.reset(token)
        elapsed = time.perf_counter_ns() - start
    return elapsed / calls / 1000


def rotated(cases: Sequence[str], round_: int) -> list[str]:
    shift = round_ % len(cases)
    return [*cases[shift:], *cases[:shift]]


def per_round_diff(samples: Sequence[float], baseline: Sequence[float]) -> float:
    return statistics.median(a - b for a, b in zip(samples, baseline, strict=True))


def check_authenticated(scopes: Sequence[Scope], what: str) -> None:
    """Every call of a timed batch must have reached the app with an access context."""
    if not all("access_context" in scope.get("state", {}) for scope in scopes):
        fail(f"{what}: some timed requests were not authenticated")


# -- 1 and 2: the access-context ContextVar and the MCP SDK principal --------------------------


async def probe(
    mw: DelegationMiddleware, token: str, inside: Callable[[Scope], str | None]
) -> Scope:
    """One request through ``mw`` with its app swapped for a probe that runs ``inside`` while
    the request is handled (a message means failure); the app restored afterwards. The request
    must be answered 200; the scope is returned."""
    problems: list[str] = []

    async def probing_app(scope: Scope, receive: Receive, send: Send) -> None:
        problem = inside(scope)
        if problem is not None:
            problems.append(problem)
        await bare_app(scope, receive, send)

    statuses, record = _common.status_recorder()
    scope = http_scope(headers_for(token))
    app, mw.app = mw.app, probing_app
    try:
        await mw(scope, _common.receiver("tools/list"), record)
    finally:
        mw.app = app
    if statuses != [200]:
        fail(f"the probe request was answered {statuses}, not [200]")
    if problems:
        fail(problems[0])
    return scope


def ours_outside() -> bool:
    """Whether current_access_context() raises, as it must outside any request."""
    try:
        current_access_context()
    except LookupError:
        return True
    return False


async def check_context_and_principal(
    plain: DelegationMiddleware, with_principal: DelegationMiddleware, token: str
) -> None:
    """The plain middleware sets our ContextVar and nothing of the SDK's; the other one sets
    both, with the SDK's objects built once per token; both reset everything afterwards."""
    from mcp.server.auth.middleware.auth_context import get_access_token

    def plain_inside(scope: Scope) -> str | None:
        if current_access_context().subject != "alice":
            return "plain: current_access_context() is not alice's inside the request"
        if "user" in scope or "auth" in scope or get_access_token() is not None:
            return "plain: the middleware built before `import mcp` set the SDK's principal"
        return None

    def principal_inside(scope: Scope) -> str | None:
        if current_access_context().subject != "alice":
            return "principal: current_access_context() is not alice's inside the request"
        sdk = get_access_token()
        if sdk is None or sdk.subject != "alice" or sdk.scopes != ["read"]:
            return "principal: the SDK's get_access_token() is not alice's with scope read"
        if scope["user"].access_token is not sdk or scope["auth"].scopes != ["read"]:
            return "principal: scope['user'] / scope['auth'] do not match the SDK's context"
        return None

    await probe(plain, token, plain_inside)
    first = await probe(with_principal, token, principal_inside)
    second = await probe(with_principal, token, principal_inside)
    if first["user"] is not second["user"] or first["auth"] is not second["auth"]:
        fail("principal: the SDK's objects were built again for a token already seen")
    if not ours_outside() or get_access_token() is not None:
        fail("a ContextVar was left set after the request")


async def context_and_principal(
    auth: LocalAuthorizationServer,
    plain: DelegationMiddleware,
    with_principal: DelegationMiddleware,
    config: Config,
) -> dict[str, Any]:
    token = auth.mint("alice", audience=RESOURCE, scope="read")
    await check_context_and_principal(plain, with_principal, token)
    headers = headers_for(token)
    receive = _common.receiver("tools/list")
    apps: dict[str, ASGIApp] = {"bare": bare_app, "plain": plain, "principal": with_principal}
    samples: dict[str, list[float]] = {case: [] for case in [*apps, "contextvar"]}
    context: AccessContext = (await probe(plain, token, lambda scope: None))["state"][
        "access_context"
    ]
    for round_ in range(config.rounds):
        for case in rotated(list(samples), round_):
            if case == "contextvar":
                samples[case].append(time_contextvar(config.calls, context))
                continue
            scopes = [http_scope(headers) for _ in range(config.calls)]
            samples[case].append(await time_calls(apps[case], scopes, receive))
            if case != "bare":
                check_authenticated(scopes, case)
            if case == "principal" and not all("user" in scope for scope in scopes):
                fail("principal: some timed requests reached the app without scope['user']")
            if case == "plain" and any("user" in scope for scope in scopes):
                fail("plain: some timed requests reached the app with scope['user']")
    principal = with_principal._principal
    if principal is None:  # checked when it was built; for the type checker
        fail("principal: the middleware has no SDK principal")
    build_us: list[float] = []
    builds = max(config.calls // 10, 50)
    for _ in range(config.rounds):
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in range(builds):
                principal._build(context)
            build_us.append((time.perf_counter_ns() - start) / builds / 1000)
    stats = {case: summary(values) for case, values in samples.items()}
    bare, plain_s, principal_s = stats["bare"], stats["plain"], stats["principal"]
    return {
        "bare_us": bare,
        "plain_us": plain_s,
        "plain_added_us": per_round_diff(samples["plain"], samples["bare"]),
        "plain_ratio_to_bare": plain_s["median"] / bare["median"],
        "contextvar_set_reset_us": stats["contextvar"],
        "principal_us": principal_s,
        "principal_added_us": per_round_diff(samples["principal"], samples["plain"]),
        "principal_ratio_to_plain": principal_s["median"] / plain_s["median"],
        "principal_ratio_to_bare": principal_s["median"] / bare["median"],
        "principal_build_us": summary(build_us),
    }


# -- 3: per-tool scopes ------------------------------------------------------------------------


@dataclass
class ToolCase:
    middleware: DelegationMiddleware
    app: DrainingApp
    modern: bool
    reads_body: bool  # whether the middleware reads the body and replays it to the app


async def tool_request(
    case: ToolCase, token: str, receive: Receive
) -> tuple[list[int], Scope, int]:
    """One request of ``case``: the statuses sent, the scope, and how many times the app ran."""
    statuses, record = _common.status_recorder()
    scope = http_scope(tool_call_headers(token, modern=case.modern))
    calls = case.app.calls
    await case.middleware(scope, receive, record)
    return statuses, scope, case.app.calls - calls


async def check_tool_case(name: str, case: ToolCase, token: str, lacking: str | None) -> None:
    """A request with the scope reaches the app, 200, with the identical body, through the
    server's ``receive`` unless the middleware read the body; one without it (``lacking``, a
    token of the tool-scoped middlewares only) is refused 403 and never reaches the app."""
    receive = body_receiver(TOOL_CALL)
    wrong = case.app.wrong_bodies
    statuses, scope, ran = await tool_request(case, token, receive)
    if statuses != [200] or ran != 1 or "access_context" not in scope.get("state", {}):
        fail(f"{name}: the request was answered {statuses} (app ran {ran} times), not 200")
    if case.app.wrong_bodies != wrong:
        fail(f"{name}: the app did not receive the identical body")
    replayed = case.app.last_receive is not receive
    if replayed != case.reads_body:
        fail(f"{name}: the body was {'' if replayed else 'not '}read by the middleware")
    if lacking is not None:
        statuses, scope, ran = await tool_request(case, lacking, receive)
        if statuses != [403] or ran != 0:
            fail(f"{name}: a token without {TOOL_SCOPE} was answered {statuses}, not 403")


async def tool_scopes(
    auth: LocalAuthorizationServer, cases: dict[str, ToolCase], config: Config
) -> dict[str, Any]:
    token = auth.mint("alice", audience=RESOURCE, scope=f"read {TOOL_SCOPE}")
    lacking = auth.mint("alice", audience=RESOURCE, scope="read")
    for name, case in cases.items():
        scoped = name.startswith("scoped")
        await check_tool_case(name, case, token, lacking if scoped else None)
    bare = DrainingApp()
    receive = body_receiver(TOOL_CALL)
    # The bare app gets the legacy request.
    headers = {modern: tool_call_headers(token, modern=modern) for modern in (True, False)}
    samples: dict[str, list[float]] = {case: [] for case in ["bare", *cases]}
    for round_ in range(config.rounds):
        for name in rotated(list(samples), round_):
            app: ASGIApp
            if name == "bare":
                app, counted, is_modern = bare, bare, False
            else:
                case = cases[name]
                app, counted, is_modern = case.middleware, case.app, case.modern
            scopes = [http_scope(headers[is_modern]) for _ in range(config.calls)]
            calls, wrong = counted.calls, counted.wrong_bodies
            samples[name].append(await time_calls(app, scopes, receive))
            if counted.calls - calls != config.calls or counted.wrong_bodies != wrong:
                fail(f"{name}: not every timed request reached the app with the identical body")
            if name != "bare":
                check_authenticated(scopes, name)
    stats = {name: summary(values) for name, values in samples.items()}

    def added(scoped: str, plain: str) -> dict[str, Any]:
        return {
            "plain_us": stats[plain],
            "scoped_us": stats[scoped],
            "added_us": per_round_diff(samples[scoped], samples[plain]),
            "ratio": stats[scoped]["median"] / stats[plain]["median"],
        }

    modern, legacy = added("scoped_modern", "plain_modern"), added("scoped_legacy", "plain_legacy")
    return {
        "bare_us": stats["bare"],
        "modern": modern,
        "legacy": legacy,
        "legacy_added_over_modern_added": legacy["added_us"] / modern["added_us"],
        "body_bytes": len(TOOL_CALL),
    }


# -- 4: end to end -----------------------------------------------------------------------------


def mcp_app() -> Any:
    """A streamable-HTTP MCPServer app with two tools: ``ping``, the timed one, and
    ``whoami``, which tells who the SDK and ``current_access_context()`` say is calling."""
    from mcp.server.auth.middleware.auth_context import get_access_token
    from mcp.server.mcpserver import MCPServer

    # The SDK's default, INFO, installs a rich handler on the root logger (when it has none),
    # which would then log every request of the client.
    server = MCPServer("bench", log_level="WARNING")

    @server.tool()
    async def ping() -> str:
        return "pong"

    @server.tool()
    async def whoami() -> str:
        sdk = get_access_token()
        try:
            ours: str | None = current_access_context().subject
        except LookupError:
            ours = None
        return json.dumps({"sdk": sdk.subject if sdk else None, "context": ours})

    return server.streamable_http_app()


def text_of(result: Any, what: str) -> str:
    if result.is_error or not result.content or not hasattr(result.content[0], "text"):
        fail(f"end to end: {what} answered {result!r}")
    text: str = result.content[0].text
    return text


@asynccontextmanager
async def connected(url: str, headers: dict[str, str]) -> AsyncIterator[Client]:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http), mode=MODERN) as client,
    ):
        yield client


async def time_tool_calls(client: Client, calls: int) -> float:
    """Per-call mean of ``calls`` sequential ``call_tool("ping")``, in ms."""
    with gc_paused():
        start = time.perf_counter_ns()
        for _ in range(calls):
            result = await client.call_tool("ping", {})
        elapsed = time.perf_counter_ns() - start
    if text_of(result, "ping") != "pong":
        fail("end to end: ping did not answer pong")
    return elapsed / calls / 1e6


async def end_to_end(config: Config) -> dict[str, Any]:
    with loopback_socket() as (auth_sock, issuer):
        auth = LocalAuthorizationServer(issuer)
        async with serve(auth, auth_sock):
            with (
                loopback_socket() as (bare_sock, bare_origin),
                loopback_socket() as (wrapped_sock, wrapped_origin),
            ):
                resource = wrapped_origin + "/mcp"
                wrapped = DelegationMiddleware(mcp_app(), issuer=issuer, resource=resource)
                if wrapped._principal is None:
                    fail("end to end: the middleware has no SDK principal")
                token = auth.mint("alice", audience=resource, scope="read")
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(serve(mcp_app(), bare_sock))
                    await stack.enter_async_context(serve(wrapped, wrapped_sock))
                    clients = {
                        "bare": await stack.enter_async_context(
                            connected(bare_origin + "/mcp", {})
                        ),
                        "wrapped": await stack.enter_async_context(
                            connected(resource, {"authorization": f"Bearer {token}"})
                        ),
                    }
                    return await e2e_rounds(clients, wrapped, resource, config)
    raise AssertionError("unreachable")


async def e2e_rounds(
    clients: dict[str, Client], wrapped: DelegationMiddleware, resource: str, config: Config
) -> dict[str, Any]:
    who = {
        name: json.loads(text_of(await client.call_tool("whoami", {}), "whoami"))
        for name, client in clients.items()
    }
    if who["bare"] != {"sdk": None, "context": None}:
        fail(f"end to end: the bare app saw a caller: {who['bare']}")
    if who["wrapped"] != {"sdk": "alice", "context": "alice"}:
        fail(f"end to end: the wrapped app did not see alice: {who['wrapped']}")
    async with httpx.AsyncClient() as anonymous:
        refused = await anonymous.post(resource, json={"jsonrpc": "2.0", "id": 1, "method": "x"})
    if refused.status_code != 401:
        fail(f"end to end: a request without a token was answered {refused.status_code}")
    for client in clients.values():  # warm-up, untimed
        await time_tool_calls(client, config.e2e_calls)
    before = wrapped.stats()
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for round_ in range(config.e2e_rounds):
        for name in rotated(list(clients), round_):
            samples[name].append(await time_tool_calls(clients[name], config.e2e_calls))
    after = wrapped.stats()
    accepted = after["requests"]["accepted"] - before["requests"]["accepted"]
    timed = config.e2e_rounds * config.e2e_calls
    if after["caches"]["tokens"]["misses"] != 1:
        fail("end to end: the token was validated more than once")
    if after["requests"]["rejected"] != before["requests"]["rejected"] or accepted < timed:
        fail("end to end: some timed calls were not accepted by the middleware")
    bare, wrapped_s = summary(samples["bare"]), summary(samples["wrapped"])
    return {
        "bare_ms": bare,
        "wrapped_ms": wrapped_s,
        "added_us": per_round_diff(samples["wrapped"], samples["bare"]) * 1000,
        "ratio": wrapped_s["median"] / bare["median"],
        "http_requests_per_call": accepted / timed,
        "token_validations": after["caches"]["tokens"]["misses"],
    }


# -- report ------------------------------------------------------------------------------------


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    lines = _common.heading(
        "asgi_delegation integrations benchmark",
        env,
        f"{mode}: {config.rounds} interleaved rounds of {config.calls} calls (sections 1-3); "
        f"{config.e2e_rounds} rounds of {config.e2e_calls} sequential tool calls (section 4)",
        "per-call mean, median over rounds (min-max of the per-round means); "
        "'added' = median of the per-round differences",
    )
    row = "  {:<60}{:>9}  {:<17}{}"

    def timed(label: str, stats: dict[str, float], digits: int = 2) -> str:
        spread = f"({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"
        return row.format(label, f"{stats['median']:.{digits}f}", spread, "")

    def figure(label: str, value: str, note: str = "") -> str:
        return row.format(label, value, "", note)

    ctx, tools, e2e = results["context"], results["tool_scopes"], results["end_to_end"]
    modern, legacy = tools["modern"], tools["legacy"]
    lines += [
        "1. current_access_context(): the warm path (same valid token every call)",
        row.format("", "µs/req", "range", ""),
        timed("bare app", ctx["bare_us"]),
        timed("DelegationMiddleware(bare app), no SDK principal", ctx["plain_us"]),
        figure("added by the middleware", f"{ctx['plain_added_us']:.2f}"),
        figure("ratio wrapped / bare", f"{ctx['plain_ratio_to_bare']:.1f}x"),
        timed("ContextVar set + reset alone (loop included)", ctx["contextvar_set_reset_us"]),
        "",
        "2. MCP SDK principal (middleware built after `import mcp`)",
        row.format("", "µs/req", "range", ""),
        timed("DelegationMiddleware(bare app), SDK principal", ctx["principal_us"]),
        figure("added by the principal (vs 1's middleware)", f"{ctx['principal_added_us']:.2f}"),
        figure("ratio principal / plain middleware", f"{ctx['principal_ratio_to_plain']:.2f}x"),
        figure("ratio principal / bare", f"{ctx['principal_ratio_to_bare']:.1f}x"),
        timed("building the SDK objects, once per new token", ctx["principal_build_us"]),
        "",
        f"3. Per-tool scopes (tool_scopes={{{TOOL!r}: [{TOOL_SCOPE!r}]}}; app drains the body; "
        f"{tools['body_bytes']}-byte tools/call)",
        row.format("", "µs/req", "range", ""),
        timed("bare draining app (legacy request)", tools["bare_us"]),
        "   a. 2026-07-28 request: Mcp-Method / Mcp-Name headers, and the body read",
        timed("DelegationMiddleware, no tool_scopes (baseline of a)", modern["plain_us"]),
        timed("a. DelegationMiddleware, tool_scopes", modern["scoped_us"]),
        figure("added by tool_scopes", f"{modern['added_us']:.2f}"),
        figure("ratio with / without tool_scopes", f"{modern['ratio']:.2f}x"),
        "   b. legacy request: no routing headers, body read, parsed, replayed",
        timed("c. DelegationMiddleware, no tool_scopes (baseline of b)", legacy["plain_us"]),
        timed("b. DelegationMiddleware, tool_scopes", legacy["scoped_us"]),
        figure("added by tool_scopes", f"{legacy['added_us']:.2f}"),
        figure("ratio with / without tool_scopes", f"{legacy['ratio']:.2f}x"),
        figure("added (b) / added (a)", f"{tools['legacy_added_over_modern_added']:.1f}x"),
        "",
        f"4. End to end: MCP client call_tool, mode {MODERN}, uvicorn on 127.0.0.1, one loop",
        row.format("", "ms/call", "range", ""),
        timed("MCPServer streamable-HTTP app, bare", e2e["bare_ms"], 3),
        timed("the same app wrapped by DelegationMiddleware", e2e["wrapped_ms"], 3),
        figure("added by the middleware (µs)", f"{e2e['added_us']:.0f}"),
        figure("ratio wrapped / bare", f"{e2e['ratio']:.3f}x"),
        figure(
            "HTTP requests per call_tool / token validations",
            f"{e2e['http_requests_per_call']:.2f} / {e2e['token_validations']}",
        ),
    ]
    return _common.joined(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_args(
        argv,
        prog="python -m benchmarks.bench_integrations",
        description="Per-request costs of the access-context ContextVar, the MCP SDK principal "
        "and per-tool scopes, and an end-to-end MCP tool call, bare and wrapped.",
        rounds_help=f"interleaved rounds of sections 1-3 (default {DEFAULT.rounds}; "
        f"{QUICK.rounds} with --quick)",
        quick_help=f"smaller batches: {QUICK.calls} calls per batch, {QUICK.e2e_rounds} rounds "
        f"of {QUICK.e2e_calls} tool calls (default {DEFAULT.calls}, {DEFAULT.e2e_rounds} of "
        f"{DEFAULT.e2e_calls})",
    )


async def run(config: Config) -> dict[str, Any]:
    auth = LocalAuthorizationServer()
    client = auth.http_client()
    try:
        # Every middleware but one is built before the MCP SDK is imported: no SDK principal.
        if "mcp" in sys.modules:
            fail("the MCP SDK was imported before the first middleware was built")
        plain = middleware(bare_app, auth, client)

        def tool_case(*, modern: bool, scoped: bool) -> ToolCase:
            app = DrainingApp()
            options = {"tool_scopes": {TOOL: [TOOL_SCOPE]}} if scoped else {}
            mw = middleware(app, auth, client, **options)
            return ToolCase(mw, app, modern, reads_body=scoped)

        cases = {
            f"{'scoped' if scoped else 'plain'}_{'modern' if modern else 'legacy'}": tool_case(
                modern=modern, scoped=scoped
            )
            for modern in (True, False)
            for scoped in (False, True)
        }
        import mcp.server.auth.middleware.auth_context  # noqa: F401  (sets "mcp" in sys.modules)

        with_principal = middleware(bare_app, auth, client)
        if plain._principal is not None or any(c.middleware._principal for c in cases.values()):
            fail("a middleware built before `import mcp` has an SDK principal")
        if with_principal._principal is None:
            fail("the middleware built after `import mcp` has no SDK principal")
        context = await context_and_principal(auth, plain, with_principal, config)
        scoped = await tool_scopes(auth, cases, config)
    finally:
        await client.aclose()
    return {"context": context, "tool_scopes": scoped, "end_to_end": await end_to_end(config)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    config = Config(**{**asdict(base), "rounds": args.rounds or base.rounds})
    env = _common.environment("mcp", "starlette", "uvicorn", "httpx2", "pydantic")
    _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)


if __name__ == "__main__":
    main()
