"""A real server: throughput and latency of a Starlette app under uvicorn, bare and wrapped in
DelegationMiddleware, measured side by side in one run.

Two uvicorn processes serve the same Starlette app (``/mcp``, GET and POST, a 42-byte JSON
answer), one bare and one wrapped in ``DelegationMiddleware``, each with one worker on a free
loopback port (``--loop uvloop --http httptools`` when both are importable, else ``--loop asyncio
--http h11``; ``--no-access-log --log-level warning``). The wrapped one validates tokens against
a ``LocalAuthorizationServer`` that this script serves on a loopback port, in a thread; the
server process gets the issuer URL, its resource and its client's id and secret through
environment variables. ``wrk`` (Debian package ``wrk``) loads one server at a time: POST /mcp
with a small JSON-RPC body and the same valid bearer token on every request (validated once,
then answered from the middleware's cache), ``-t1 -c32 --latency``. When ``taskset`` is there,
the servers run on CPU 0 and the load generator on CPU 1. The app's two other routes,
``/bench/prefill`` and ``/bench/stats``, are never timed.

Before anything is timed, the wrapped server's caches are filled: this script mints 10,000
distinct tokens (the readiness probe's first, the timed one last, so that the oldest-out caches
keep it whatever their size) and a child process sends one request with each to
``/bench/prefill`` (16 keep-alive connections), whose handler exchanges the token for a grant
(RFC 8693, against the same authorization server): 10,000 validated tokens and 10,000 grants,
the default sizes of both caches, checked. Then each server gets an untimed warm-up run of
wrk, then the timed rounds alternate: bare, wrapped, bare, wrapped, ... Each round's ratio
(wrapped / bare) and added time per request (1e6/rps_wrapped - 1e6/rps_bare: server time per
request, while the one server core is saturated) pair the wrapped run with the bare run just
before it; the median row is the median of each column over rounds. Target: the wrapped server
keeps at least 0.9x the bare server's requests per second.

Checks: the bare and wrapped servers answer a valid request with byte-identical responses (but
for the ``date`` header); the wrapped one refuses a request without a token (401); no run got a
non-2xx answer (socket errors are counted in the ``errors`` column); and, read from the wrapped
server's ``/bench/stats`` after the rounds, no token was validated and no grant obtained while
the load ran, and the middleware accepted at least as many requests as wrk counted.

Without ``wrk`` on the PATH (``apt-get install -y wrk``), or with ``--load python``, the load
comes from a Python load generator in a separate process instead (the same request on as many
keep-alive asyncio connections, raw sockets, uvloop when installed); the output says so.

Run from the project root::

    .venv/bin/python -m benchmarks.bench_server            # ~2.5 min on a 2-vCPU VM
    .venv/bin/python -m benchmarks.bench_server --quick    # ~25 s
    .venv/bin/python -m benchmarks.bench_server --json     # the figures as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_delegation import DelegationMiddleware
from asgi_delegation.testing import LocalAuthorizationServer

from . import _common
from ._common import verdict

SCRIPT = "bench_server"
TARGET_RATIO = 0.9
HOST = "127.0.0.1"
SERVER_CPU, LOAD_CPU = 0, 1
UPSTREAM = "https://api.upstream.example/v1"  # what the prefill grants are for (never called)
CLIENT_ID, CLIENT_SECRET = "bench-server", "bench-secret"
TOKEN_LIFETIME = 3600  # tokens and grants outlive the run: nothing expires or refreshes
PREFILL_CONCURRENCY = 16
READY_TIMEOUT = 60.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What the server processes are told, in their environment.
ENV_ISSUER = "BENCH_SERVER_ISSUER"
ENV_RESOURCE = "BENCH_SERVER_RESOURCE"
ENV_CLIENT_ID = "BENCH_SERVER_CLIENT_ID"
ENV_CLIENT_SECRET = "BENCH_SERVER_CLIENT_SECRET"
ENV_PARENT = "BENCH_SERVER_PARENT_PID"

# The timed request: what an MCP client posts, the token added after.
REQUEST_BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
REQUEST_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Mcp-Protocol-Version": "2025-06-18",
}
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"ok":1}}'


@dataclass(frozen=True)
class Config:
    rounds: int
    seconds: int
    warmup_seconds: int
    connections: int
    prefill: int
    load: str  # "wrk" or "python"
    pin: bool


DEFAULT = Config(
    rounds=5, seconds=10, warmup_seconds=3, connections=32, prefill=10_000, load="wrk", pin=True
)
QUICK = Config(
    rounds=3, seconds=2, warmup_seconds=1, connections=32, prefill=1_000, load="wrk", pin=True
)


def fail(message: str) -> NoReturn:
    _common.abort(SCRIPT, message)


# -- the servers' side: the app and the factories uvicorn calls ---------------------------------

_middleware: DelegationMiddleware | None = None  # the wrapped server's, in its own process


async def mcp(request: Request) -> Response:
    if request.method == "POST":
        await request.body()
    return Response(ANSWER, media_type="application/json")


async def prefill(request: Request) -> Response:
    """Exchanges the caller's token for a grant (fills the grant cache); untimed."""
    context = request.scope.get("state", {}).get("access_context")
    if context is None:
        return JSONResponse({"exchanged": False}, status_code=404)
    await context.exchange(UPSTREAM)
    return JSONResponse({"exchanged": True})


async def stats(request: Request) -> Response:
    """Which server this is, and the wrapped one's counters and cache sizes; untimed."""
    document: dict[str, Any] = {"server": "bare", "pid": os.getpid()}
    if _middleware is not None:
        grants = sum(len(trust.exchanger._grants) for trust in _middleware._trusts.values())
        document = {
            "server": "wrapped",
            "pid": os.getpid(),
            "stats": _middleware.stats(),
            "cached_tokens": len(_middleware._tokens._entries),
            "cached_grants": grants,
        }
    return JSONResponse(document)


def starlette_app() -> Starlette:
    """The app both servers serve; only ``/mcp`` is timed."""
    return Starlette(
        routes=[
            Route("/mcp", mcp, methods=["GET", "POST"]),
            Route("/bench/prefill", prefill, methods=["POST"]),
            Route("/bench/stats", stats, methods=["GET"]),
        ]
    )


def _die_with_parent() -> None:
    """Have Linux send this server SIGTERM when the benchmark dies, however it dies."""
    parent = int(os.environ.get(ENV_PARENT, "0"))
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        os.kill(os.getpid(), signal.SIGTERM)


def bare_app() -> Starlette:
    """``uvicorn --factory benchmarks.bench_server:bare_app``."""
    _die_with_parent()
    return starlette_app()


def wrapped_app() -> DelegationMiddleware:
    """``uvicorn --factory benchmarks.bench_server:wrapped_app``, configured by the
    ``BENCH_SERVER_*`` environment variables."""
    global _middleware
    _die_with_parent()
    _middleware = DelegationMiddleware(
        starlette_app(),
        issuer=os.environ[ENV_ISSUER],
        resource=os.environ[ENV_RESOURCE],
        client_id=os.environ[ENV_CLIENT_ID],
        client_secret=os.environ[ENV_CLIENT_SECRET],
    )
    return _middleware


# -- starting and stopping the servers ---------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """What the run uses: uvicorn's loop and HTTP implementation, the load generator, and the
    CPU pinning (``taskset`` prefixes, empty when not pinned)."""

    loop: str
    http: str
    load: str
    server_pin: tuple[str, ...]
    load_pin: tuple[str, ...]


def detect_stack(config: Config) -> Stack:
    fast = importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools")
    load = config.load
    if load == "wrk" and shutil.which("wrk") is None:
        print(f"{SCRIPT}: wrk not found (apt-get install -y wrk): Python load", file=sys.stderr)
        load = "python"
    pin = config.pin and shutil.which("taskset") is not None
    pin = pin and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    return Stack(
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        load=load,
        server_pin=("taskset", "-c", str(SERVER_CPU)) if pin else (),
        load_pin=("taskset", "-c", str(LOAD_CPU)) if pin else (),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    probe: str  # the token of the readiness probe

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def server_command(factory: str, port: int, stack: Stack) -> list[str]:
    return [
        *stack.server_pin,
        sys.executable,
        "-m",
        "uvicorn",
        f"benchmarks.bench_server:{factory}",
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--loop",
        stack.loop,
        "--http",
        stack.http,
        "--no-access-log",
        "--log-level",
        "warning",
        "--lifespan",
        "on",
    ]


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()  # uvicorn shuts down gracefully (lifespan too)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def spawn(
    name: str, port: int, command: list[str], log: Path, env: dict[str, str], probe: str
) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed arguments
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env, ENV_PARENT: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops them
        )
    return Server(name, port, process, log, command, probe)


async def start(
    name: str,
    factory: str,
    stack: Stack,
    workdir: Path,
    stack_exit: ExitStack,
    probe_token: Callable[[str], str],
    **env: str,
) -> Server:
    """A uvicorn process of ``factory``, started on a free port, stopped when ``stack_exit``
    closes; ``env`` is passed to it, ``{port}`` replaced. The port is picked, then bound by
    uvicorn: should another process take it in between, uvicorn exits and another port is
    tried. Ready once ``/bench/stats`` answers, with ``probe_token(resource)``."""
    for _attempt in range(5):
        port = free_port()
        resolved = {key: value.format(port=port) for key, value in env.items()}
        command = server_command(factory, port, stack)
        probe = probe_token(f"http://{HOST}:{port}/mcp")
        server = spawn(name, port, command, workdir / f"{name}.log", resolved, probe)
        stack_exit.callback(stop, server)
        if await ready(server):
            return server
        stop(server)
    fail(f"the {name} server did not start: {server.log_tail()}")


async def ready(server: Server) -> bool:
    """Whether the server came up: its ``/bench/stats`` answered with its own pid (to a
    request with the probe's token)."""
    give_up_at = time.monotonic() + READY_TIMEOUT
    headers = {"Authorization": f"Bearer {server.probe}"}
    async with httpx.AsyncClient(timeout=5, headers=headers) as client:
        while time.monotonic() < give_up_at:
            if server.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = await client.get(server.url + "/bench/stats")
                document = answer.json()
                if answer.status_code == 200 and document.get("pid") == server.process.pid:
                    return True
            await asyncio.sleep(0.1)
    return False


async def server_stats(client: httpx.AsyncClient, server: Server) -> dict[str, Any]:
    answer = await client.get(server.url + "/bench/stats")
    if answer.status_code != 200:
        fail(f"{server.name}: /bench/stats answered {answer.status_code}")
    document: dict[str, Any] = answer.json()
    return document


# -- checks ------------------------------------------------------------------------------------


async def raw_request(port: int, request: bytes) -> bytes:
    """The whole response to ``request`` (which asks to close the connection)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def http_request(port: int, method: str, token: str | None, body: bytes) -> bytes:
    headers = {"Host": f"{HOST}:{port}", **REQUEST_HEADERS, "Connection": "close"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body:
        headers["Content-Length"] = str(len(body))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{method} /mcp HTTP/1.1\r\n{head}\r\n".encode() + body


def without_date(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def check_responses(bare: Server, wrapped: Server, token: str) -> None:
    """Both servers answer a valid request (POST and GET) with the same bytes but the date;
    the wrapped one refuses a request without a token."""
    for method, body in (("POST", REQUEST_BODY), ("GET", b"")):
        answers = [
            without_date(await raw_request(s.port, http_request(s.port, method, token, body)))
            for s in (bare, wrapped)
        ]
        if not answers[0].startswith(b"HTTP/1.1 200 ") or not answers[0].endswith(ANSWER):
            fail(f"bare: {method} /mcp answered {answers[0]!r}")
        if answers[0] != answers[1]:
            fail(f"{method} /mcp: bare and wrapped answered differently: {answers!r}")
    refused = await raw_request(
        wrapped.port, http_request(wrapped.port, "POST", None, REQUEST_BODY)
    )
    if not refused.startswith(b"HTTP/1.1 401 "):
        fail(f"wrapped: a request without a token was answered {refused[:40]!r}")


# -- filling the caches ------------------------------------------------------------------------


def prefill_request(port: int, token: str) -> bytes:
    return (
        f"POST /bench/prefill HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def fill_caches(stack: Stack, wrapped: Server, tokens: Sequence[str], workdir: Path) -> float:
    """One ``/bench/prefill`` request per token, in order, a few at a time, from a process of
    its own (this one serves the authorization server); returns the seconds it took."""
    started = time.perf_counter()
    tokens_file = workdir / "tokens.txt"
    tokens_file.write_text("\n".join(tokens))
    command = [
        *stack.load_pin,
        sys.executable,
        "-m",
        "benchmarks.bench_server",
        "_prefill",
        str(wrapped.port),
        str(PREFILL_CONCURRENCY),
        str(tokens_file),
    ]
    figures = await child_figures(command, seconds=600, what="filling the caches")
    if figures["problems"] or figures["sent"] != len(tokens):
        fail(
            f"filling the caches: {figures['sent']} sent; /bench/prefill answered "
            f"{figures['problems']}"
        )
    if wrapped.process.poll() is not None:
        fail(f"the wrapped server died while its caches were filled: {wrapped.log_tail()}")
    return time.perf_counter() - started


async def child_figures(command: Sequence[str], *, seconds: float, what: str) -> dict[str, Any]:
    """Runs ``command`` (wrk, or this module's load generator or prefill) and returns the
    figures of its ``BENCH_JSON`` line; killed if it outlasts ``seconds`` or the run is
    cancelled."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=seconds)
    except TimeoutError:
        fail(f"{what}: {command[0]} did not finish within {seconds:.0f} s")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCH_JSON "):
            figures: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return figures
    tail = (out + err).decode(errors="replace")[-2000:]
    fail(f"{what}: no figures from {' '.join(command)} (exit {process.returncode}): {tail}")


# -- the load ----------------------------------------------------------------------------------


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(token: str) -> str:
    """The request, and a ``done`` that prints the figures as one JSON line (µs)."""
    headers = {**REQUEST_HEADERS, "Authorization": f"Bearer {token}"}
    lines = [
        'wrk.method = "POST"',
        'wrk.path = "/mcp"',
        f"wrk.body = {lua_string(REQUEST_BODY.decode())}",
        *(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()),
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        '  io.write(string.format(\'BENCH_JSON {"requests": %d, "duration_us": %d, \''
        ' .. \'"p50_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d, \''
        ' .. \'"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, \''
        " .. '\"timeout\": %d}}\\n', summary.requests, summary.duration,"
        " latency:percentile(50), latency:percentile(99), latency.mean, latency.max,"
        " e.connect, e.read, e.write, e.status, e.timeout))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def load_command(
    stack: Stack, server: Server, seconds: int, connections: int, workdir: Path
) -> list[str]:
    if stack.load == "wrk":
        return [
            *stack.load_pin,
            shutil.which("wrk") or "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(workdir / "request.lua"),
            server.url + "/mcp",
        ]
    return [
        *stack.load_pin,
        sys.executable,
        "-m",
        "benchmarks.bench_server",
        "_load",
        str(server.port),
        str(seconds),
        str(connections),
        str(workdir / "request.http"),
    ]


def cpu_ns(pid: int) -> int:
    """The CPU time the process has had so far, its threads' summed, in ns."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
        return total
    return 0


async def load_run(
    stack: Stack, server: Server, seconds: int, connections: int, workdir: Path
) -> dict[str, Any]:
    """One run of the load generator against ``server``: its figures, with ``rps`` and the
    server's CPU time per request (``cpu_us``, the Linux scheduler's count)."""
    command = load_command(stack, server, seconds, connections, workdir)
    what = f"{stack.load} against the {server.name} server"
    cpu_before = cpu_ns(server.process.pid)
    figures = await child_figures(command, seconds=seconds + 60, what=what)
    cpu = cpu_ns(server.process.pid) - cpu_before
    if server.process.poll() is not None:
        fail(f"the {server.name} server died during a run: {server.log_tail()}")
    if figures["requests"] == 0:
        fail(f"{stack.load} against the {server.name} server completed no request")
    if figures["errors"]["status"]:
        fail(f"{server.name}: {figures['errors']['status']} answers were not 2xx/3xx")
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    figures["cpu_us"] = cpu / figures["requests"] / 1000
    return figures


# -- the Python load generator (when there is no wrk) ------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and body of one HTTP/1.1 response (with a Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


async def prefill_tokens(port: int, connections: int, tokens: Sequence[str]) -> str:
    """Each token sent once to ``/bench/prefill``, on ``connections`` keep-alive connections:
    how many were answered, and the first wrong answers."""
    pending = iter(tokens)
    answered = 0
    problems: list[str] = []

    async def connection() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for token in pending:
                writer.write(prefill_request(port, token))
                head, body = await read_response(reader)
                answered += 1
                if not head.startswith(b"HTTP/1.1 200 ") or body != b'{"exchanged":true}':
                    problems.append(f"{head[:40]!r} {body[:200]!r}")
                    return
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return "BENCH_JSON " + json.dumps({"sent": answered, "problems": problems[:3]})


async def python_load(port: int, seconds: float, connections: int, request: bytes) -> str:
    """``connections`` keep-alive connections, each sending ``request`` again as soon as the
    answer is in, for ``seconds``: the figures as wrk's ``done`` prints them."""
    latencies: list[float] = []
    errors = dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0)
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            errors["connect"] += 1
            return
        try:
            while (sent := time.perf_counter()) < deadline:
                writer.write(request)
                head, _ = await read_response(reader)
                latencies.append(time.perf_counter() - sent)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3")):
                    errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            errors["read"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    duration = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]

    def percentile(p: float) -> int:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1e6)

    figures = {
        "requests": len(latencies),
        "duration_us": round(duration * 1e6),
        "p50_us": percentile(50),
        "p99_us": percentile(99),
        "mean_us": statistics.fmean(ordered) * 1e6,
        "max_us": round(ordered[-1] * 1e6),
        "errors": errors,
    }
    return "BENCH_JSON " + json.dumps(figures)


def child_main(argv: Sequence[str]) -> None:
    """``_load PORT SECONDS CONNECTIONS REQUEST_FILE`` or ``_prefill PORT CONNECTIONS
    TOKENS_FILE``: the figures printed as one ``BENCH_JSON`` line."""
    run: Coroutine[Any, Any, str]
    if argv[0] == "_load":
        port, seconds, connections, request_file = argv[1:]
        request = Path(request_file).read_bytes()
        run = python_load(int(port), float(seconds), int(connections), request)
    else:
        port, connections, tokens_file = argv[1:]
        tokens = Path(tokens_file).read_text().split()
        run = prefill_tokens(int(port), int(connections), tokens)
    factory = None
    if importlib.util.find_spec("uvloop"):
        factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        print(runner.run(run))


# -- the run -----------------------------------------------------------------------------------


def median_row(rounds: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def round_figures(bare: dict[str, Any], wrapped: dict[str, Any]) -> dict[str, Any]:
    return {
        "bare_rps": bare["rps"],
        "wrapped_rps": wrapped["rps"],
        "ratio": wrapped["rps"] / bare["rps"],
        "added_us": 1e6 / wrapped["rps"] - 1e6 / bare["rps"],
        "bare_cpu_us": bare["cpu_us"],
        "wrapped_cpu_us": wrapped["cpu_us"],
        "added_cpu_us": wrapped["cpu_us"] - bare["cpu_us"],
        "bare_p50_ms": bare["p50_us"] / 1000,
        "bare_p99_ms": bare["p99_us"] / 1000,
        "wrapped_p50_ms": wrapped["p50_us"] / 1000,
        "wrapped_p99_ms": wrapped["p99_us"] / 1000,
        "socket_errors": sum(bare["errors"].values()) + sum(wrapped["errors"].values()),
    }


@contextmanager
def cancelled_on_sigterm() -> Iterator[None]:
    """SIGTERM cancels the run (as Ctrl-C does), so that every process is stopped."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:
        yield
        return
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def run(config: Config) -> dict[str, Any]:
    with cancelled_on_sigterm(), ExitStack() as stack_exit:
        return await measured(config, stack_exit)


async def measured(config: Config, stack_exit: ExitStack) -> dict[str, Any]:
    stack = detect_stack(config)
    workdir = Path(stack_exit.enter_context(tempfile.TemporaryDirectory(prefix="bench_server-")))
    auth = LocalAuthorizationServer()
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    auth.exchange_expires_in = TOKEN_LIFETIME
    issuer = stack_exit.enter_context(auth.running(HOST))

    def mint(subject: str, resource: str) -> str:
        return auth.mint(subject, audience=resource, scope="read", expires_in=TOKEN_LIFETIME)

    def probe_token(resource: str) -> str:
        return mint("probe", resource)

    bare = await start("bare", "bare_app", stack, workdir, stack_exit, probe_token)
    wrapped = await start(
        "wrapped",
        "wrapped_app",
        stack,
        workdir,
        stack_exit,
        probe_token,
        **{
            ENV_ISSUER: issuer,
            ENV_RESOURCE: f"http://{HOST}:{{port}}/mcp",
            ENV_CLIENT_ID: CLIENT_ID,
            ENV_CLIENT_SECRET: CLIENT_SECRET,
        },
    )
    resource = wrapped.url + "/mcp"
    minting = time.perf_counter()
    # Distinct users: the readiness probe's token (validated already), others, and the timed
    # token last, so that the oldest-out caches keep it whatever their size.
    others = [mint(f"user-{i}", resource) for i in range(config.prefill - 2)]
    token = mint("alice", resource)
    tokens = [wrapped.probe, *others, token]
    minted_s = time.perf_counter() - minting
    client = httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"})
    try:
        prefill_s = await fill_caches(stack, wrapped, tokens, workdir)
        filled = await server_stats(client, wrapped)
        await check_responses(bare, wrapped, token)
        (workdir / "request.lua").write_text(wrk_script(token))
        (workdir / "request.http").write_bytes(
            http_request(wrapped.port, "POST", token, REQUEST_BODY).replace(
                b"Connection: close", b"Connection: keep-alive"
            )
        )
        before = await server_stats(client, wrapped)
        counted = 0
        for server in (bare, wrapped):  # warm-up, untimed
            figures = await load_run(
                stack, server, config.warmup_seconds, config.connections, workdir
            )
            if server is wrapped:
                counted += figures["requests"]
        rounds: list[dict[str, Any]] = []
        for _ in range(config.rounds):
            bare_figures = await load_run(stack, bare, config.seconds, config.connections, workdir)
            wrapped_figures = await load_run(
                stack, wrapped, config.seconds, config.connections, workdir
            )
            counted += wrapped_figures["requests"]
            rounds.append(round_figures(bare_figures, wrapped_figures))
        after = await server_stats(client, wrapped)
    finally:
        await client.aclose()
    median = median_row(rounds)
    return {
        "stack": asdict(stack),
        "servers": {"bare": bare.command, "wrapped": wrapped.command},
        "prefill": {
            "tokens": len(tokens),
            "mint_seconds": minted_s,
            "requests_seconds": prefill_s,
            **check_caches(filled, before, after, counted, len(tokens)),
        },
        "rounds": rounds,
        "median": median,
        "target_ratio": TARGET_RATIO,
        "target_met": median["ratio"] >= TARGET_RATIO,
    }


def check_caches(
    filled: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    counted: int,
    distinct: int,
) -> dict[str, Any]:
    """The caches filled as meant; no validation or exchange while the load ran; every timed
    request accepted by the middleware."""
    size = 10_000  # the middleware's default cache sizes
    tokens, grants = filled["stats"]["caches"]["tokens"], filled["stats"]["caches"]["grants"]
    if tokens["misses"] != distinct or grants["miss"] != distinct:
        fail(f"filling the caches: {tokens['misses']} validations, {grants['miss']} exchanges")
    expected = min(distinct, size)
    if filled["cached_tokens"] != expected or filled["cached_grants"] != expected:
        fail(
            f"filling the caches: {filled['cached_tokens']} tokens and "
            f"{filled['cached_grants']} grants cached, not {expected}"
        )
    ran, was = after["stats"], before["stats"]
    if ran["caches"]["tokens"]["misses"] != was["caches"]["tokens"]["misses"]:
        fail("a token was validated while the load ran: the timed token was not cached")
    if ran["caches"]["grants"] != was["caches"]["grants"]:
        fail("the grant cache was used while the load ran")
    accepted = ran["requests"]["accepted"] - was["requests"]["accepted"]
    if accepted < counted or ran["requests"]["rejected"] != was["requests"]["rejected"]:
        fail(f"the middleware accepted {accepted} requests while the load counted {counted}")
    return {
        "cached_tokens": filled["cached_tokens"],
        "cached_grants": filled["cached_grants"],
        "validations_during_load": 0,
        "accepted_during_load": accepted,
        "token_cache_hits_during_load": ran["caches"]["tokens"]["hits"]
        - was["caches"]["tokens"]["hits"],
        "cached_tokens_after": after["cached_tokens"],
    }


# -- report ------------------------------------------------------------------------------------


def render(env: dict[str, str], config: Config, mode: str, results: dict[str, Any]) -> str:
    stack, prefill_ = results["stack"], results["prefill"]
    load = (
        f"wrk -t1 -c{config.connections} --latency"
        if stack["load"] == "wrk"
        else f"PYTHON LOAD GENERATOR (no wrk): {config.connections} keep-alive connections"
    )
    pinned = (
        f"servers on CPU {SERVER_CPU}, load on CPU {LOAD_CPU} (taskset)"
        if stack["server_pin"]
        else "not pinned"
    )
    lines = _common.heading(
        "asgi_delegation server benchmark (uvicorn, one worker, loopback)",
        env,
        f"{mode}: {config.rounds} rounds of {config.seconds} s per server, alternating bare, "
        f"wrapped (after {config.warmup_seconds} s of warm-up each); load: {load}; "
        f"uvicorn --loop {stack['loop']} --http {stack['http']}; {pinned}",
        "requests/s, the server's CPU time per request and latency per round; the median row "
        "is the median of each column",
    )
    lines += [
        f"  wrapped server's caches: {prefill_['cached_tokens']:,} validated tokens and "
        f"{prefill_['cached_grants']:,} grants ({prefill_['tokens']:,} tokens minted in "
        f"{prefill_['mint_seconds']:.1f} s, sent in {prefill_['requests_seconds']:.1f} s); "
        f"timed token: cached, {prefill_['validations_during_load']} validations under load",
        "",
    ]
    row = "  {:<7}{:>8}{:>9}{:>7}{:>8}{:>8}{:>8}{:>8}{:>13}{:>13}{:>7}"
    lines += [
        row.format(
            "round",
            "bare",
            "wrapped",
            "ratio",
            "added",
            "bare",
            "wrapped",
            "added",
            "bare",
            "wrapped",
            "errors",
        ),
        row.format(
            "",
            "req/s",
            "req/s",
            "w / b",
            "µs/req",
            "CPU µs",
            "CPU µs",
            "CPU µs",
            "p50/p99 ms",
            "p50/p99 ms",
            "",
        ),
    ]

    def line(label: str, r: dict[str, Any]) -> str:
        return row.format(
            label,
            f"{r['bare_rps']:,.0f}",
            f"{r['wrapped_rps']:,.0f}",
            f"{r['ratio']:.3f}",
            f"{r['added_us']:.1f}",
            f"{r['bare_cpu_us']:.1f}",
            f"{r['wrapped_cpu_us']:.1f}",
            f"{r['added_cpu_us']:.1f}",
            f"{r['bare_p50_ms']:.2f}/{r['bare_p99_ms']:.2f}",
            f"{r['wrapped_p50_ms']:.2f}/{r['wrapped_p99_ms']:.2f}",
            f"{r['socket_errors']:.0f}",
        )

    lines += [line(str(i), r) for i, r in enumerate(results["rounds"], 1)]
    median = results["median"]
    lines += [
        line("median", median),
        "",
        f"  throughput ratio wrapped / bare (median): {median['ratio']:.3f}x   "
        f"target >= {TARGET_RATIO:g}x: {verdict(results['target_met'])}",
        f"  added per request (1e6/rps_wrapped - 1e6/rps_bare, median): "
        f"{median['added_us']:.1f} µs   (informational)",
        f"  server CPU time added per request (the scheduler's count, median): "
        f"{median['added_cpu_us']:.1f} µs   (informational)",
    ]
    if stack["load"] != "wrk":
        lines.append(
            "  (load from the Python fallback, not wrk: its own overhead is in the figures)"
        )
    return _common.joined(lines)


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_server",
        description="Requests per second and latency of a Starlette app under uvicorn, bare "
        "and wrapped in DelegationMiddleware, loaded by wrk on loopback.",
    )
    parser.add_argument(
        "--rounds",
        type=_common.positive_int,
        help=f"rounds, each a bare then a wrapped run (default {DEFAULT.rounds}; "
        f"{QUICK.rounds} with --quick)",
    )
    parser.add_argument(
        "--seconds",
        type=_common.positive_int,
        help=f"seconds per run (default {DEFAULT.seconds}; {QUICK.seconds} with --quick)",
    )
    parser.add_argument(
        "--connections",
        type=_common.positive_int,
        help=f"concurrent keep-alive connections (default {DEFAULT.connections})",
    )
    parser.add_argument(
        "--prefill",
        type=at_least_two,
        help=f"distinct tokens (and grants) put in the wrapped server's caches first, the "
        f"probe's and the timed one included (default {DEFAULT.prefill:,}; {QUICK.prefill:,} "
        "with --quick)",
    )
    parser.add_argument(
        "--load",
        choices=["wrk", "python"],
        default="wrk",
        help="the load generator (default wrk; the Python one when wrk is not installed)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the processes to CPUs with taskset"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK.rounds} rounds of {QUICK.seconds} s, {QUICK.prefill:,} "
        "tokens prefilled",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def environment(stack_load: str) -> dict[str, str]:
    packages = ["starlette", "uvicorn", "httpx"]
    packages += [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name)]
    env = _common.environment(*packages)
    missing = [name for name in ("uvloop", "httptools") if not importlib.util.find_spec(name)]
    if missing:
        env["missing"] = f"{', '.join(missing)} (uvicorn runs --loop asyncio --http h11)"
    wrk = shutil.which("wrk")
    if stack_load == "wrk" and wrk:
        banner = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)  # noqa: S603
        env["wrk"] = (banner.stdout or banner.stderr).split(" Copyright")[0].strip()
    return env


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["_load"], ["_prefill"]):  # a child process of the benchmark's
        child_main(args_list)
        return
    args = parse_args(args_list)
    base = QUICK if args.quick else DEFAULT
    config = Config(
        rounds=args.rounds or base.rounds,
        seconds=args.seconds or base.seconds,
        warmup_seconds=base.warmup_seconds,
        connections=args.connections or base.connections,
        prefill=args.prefill or base.prefill,
        load=args.load,
        pin=not args.no_pin,
    )
    env = environment(config.load)
    try:
        _common.run_and_print(run, render, config, env, quick=args.quick, as_json=args.json)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{SCRIPT}: interrupted; the servers were stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
