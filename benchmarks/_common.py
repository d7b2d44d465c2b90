"""What the benchmark scripts share: the hand-made ASGI request, the garbage collector of a
timed batch (on, as users run the package; paused only for a "best case" row), a benchmark's
second invocation mode in a fresh interpreter, and the pieces of the report and the command
line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from asgi_delegation._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

RESOURCE = "http://127.0.0.1:8000/mcp"  # this server, the audience of the user's token

# What an MCP client sends with each POST before the body's own headers and Authorization.
CLIENT_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"python-httpx/0.28.1 mcp-client/1.0"),
    (b"accept", b"application/json, text/event-stream"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"application/json"),
]
# A session-mode request (revision 2025-06-18) of an 87-byte body, after Authorization.
_SESSION_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-length", b"87"),
    (b"mcp-protocol-version", b"2025-06-18"),
    (b"mcp-session-id", b"4f0c2b9e7d1a4c3b8e6f5a2d1c0b9a87"),
]

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")
T = TypeVar("T")

#: The label of the rows timed with the garbage collector paused: never the headline.
BEST_CASE = "best case: GC paused"


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


class PrincipalReader:
    """An app that reads the MCP SDK's principal as the SDK's streamable-HTTP session manager
    does on every request (``scope.get("user")``, then the client, issuer and subject of its
    access token: what a session is bound to), then hands the request to ``then``; counts the
    requests whose principal was missing, or not ``subject``'s (when given). Imports the SDK:
    only in a process that measures with it."""

    def __init__(self, then: ASGIApp = bare_app, subject: str | None = "alice") -> None:
        from mcp.server.auth.middleware.bearer_auth import (
            AuthenticatedUser,
            authorization_context,
        )

        self.wrong = 0
        user_class, context_of = AuthenticatedUser, authorization_context

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            user = scope.get("user")
            requestor = context_of(user) if isinstance(user, user_class) else None
            if requestor is None or (
                requestor["subject"] != subject if subject else not requestor["subject"]
            ):
                self.wrong += 1
            await then(scope, receive, send)

        self.app: ASGIApp = app


def receiver(method: str) -> Receive:
    """A ``receive`` that returns the same ``http.request`` event, a JSON-RPC call of
    ``method``, every time."""
    request: Message = {
        "type": "http.request",
        "body": b'{"jsonrpc":"2.0","id":1,"method":"' + method.encode() + b'"}',
        "more_body": False,
    }

    async def receive() -> Message:
        return request

    return receive


async def discard(message: Message) -> None:
    pass


def status_recorder() -> tuple[list[int], Send]:
    """A ``send`` that records the status of each response start, and the list it records in."""
    statuses: list[int] = []

    async def record(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return statuses, record


def headers_for(token: str) -> list[tuple[bytes, bytes]]:
    authorization = (b"authorization", b"Bearer " + token.encode())
    return [*CLIENT_HEADERS, authorization, *_SESSION_HEADERS]


def http_scope(headers: list[tuple[bytes, bytes]], path: str = "/mcp") -> Scope:
    """A fresh scope per call: the middleware writes ``scope["state"]``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


def abort(script: str, message: str) -> NoReturn:
    print(f"{script}: ABORTED: {message}", file=sys.stderr)
    raise SystemExit(1)


# -- timing ------------------------------------------------------------------------------------


@contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector run, then paused for the block (a timed batch), as ``timeit``
    does."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class GcWatch:
    """The collections the garbage collector makes while it is installed (``gc.callbacks``),
    by generation, and the time they take in all, in ns."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.ns = 0
        self._started = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
        else:
            self.ns += time.perf_counter_ns() - self._started
            self.collections[info["generation"]] += 1

    def figures(self, calls: int) -> dict[str, Any]:
        """The collections by generation and the µs spent in them per call, over ``calls``."""
        return {"collections": list(self.collections), "gc_us_per_call": self.ns / calls / 1000}


@contextmanager
def timed_gc(*, paused: bool = False, watch: GcWatch | None = None) -> Iterator[None]:
    """The garbage collector of a timed batch: on, as users run the package (the default: the
    collections that come due during the batch are timed with it), or, for a row labelled
    ``BEST_CASE``, run and then paused as ``timeit`` does. ``watch`` sees the collections."""
    if paused:
        gc.collect()
        gc.disable()
    elif not gc.isenabled():
        raise RuntimeError("the garbage collector is off: a timed batch runs with it on")
    if watch is not None:
        gc.callbacks.append(watch)
    try:
        yield
    finally:
        if watch is not None:
            gc.callbacks.remove(watch)
        if paused:
            gc.enable()


def handed_out(items: list[T]) -> Iterator[T]:
    """The items of ``items`` in order, each dropped from the list as it is handed out (the
    list ends empty). A timed batch's scopes are built beforehand; this way each is freed when
    its request is over, as a server's are, instead of living on, with what the request left
    in it, into the garbage collector's older generations."""
    items.reverse()
    pop = items.pop
    for _ in range(len(items)):
        yield pop()


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


# -- report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(*packages: str) -> dict[str, str]:
    """Python, the versions of ``packages`` and of asgi_delegation, and the machine."""
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.python_compiler()})",
        **{package: version(package) for package in packages},
        "asgi_delegation": version("asgi-delegation"),
        "machine": f"{platform.platform()}, {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs",
    }


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def heading(title: str, env: dict[str, str], mode: str, figures: str) -> list[str]:
    """The first lines of a report: its title, the environment, the mode and what the figures
    are, then a blank line."""
    return [
        title,
        *(f"  {name:<16}{value}" for name, value in env.items()),
        f"  {'mode':<16}{mode}",
        f"  figures: {figures}",
        "",
    ]


def joined(lines: Sequence[str]) -> str:
    return "\n".join(line.rstrip() for line in lines)


def run_worker(script: str, module: str, argv: Sequence[str]) -> tuple[dict[str, Any], str]:
    """Runs ``python -m module *argv`` from the project root, in a fresh interpreter (a
    benchmark's second invocation mode, whose imports must not reach the main run's process),
    and returns the JSON document it prints and what it wrote to stderr. Its stderr goes to a
    file, as a server's logs would: a handler there costs what it costs writing to one."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", module, *argv]
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
        done = subprocess.run(  # noqa: S603 - this interpreter, this project's module
            command, cwd=root, stdout=subprocess.PIPE, stderr=stderr, text=True, check=False
        )
        stderr.seek(0)
        logged = stderr.read()
    if done.returncode != 0:
        tail = "\n".join(logged.splitlines()[-20:])
        abort(script, f"`{' '.join(command[1:])}` exited with {done.returncode}:\n{tail}")
    try:
        document: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        abort(script, f"`{' '.join(command[1:])}` printed no JSON document: {done.stdout[-500:]!r}")
    return document, logged


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    rounds_help: str,
    quick_help: str,
    sdk_help: str | None = None,
) -> argparse.Namespace:
    """The options every script takes: ``--rounds N``, ``--quick`` and ``--json``; and
    ``--sdk`` (the rows with the MCP SDK imported, alone) where ``sdk_help`` is given."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--rounds", type=positive_int, help=rounds_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    if sdk_help is not None:
        parser.add_argument("--sdk", action="store_true", help=sdk_help)
    return parser.parse_args(argv)


def run_and_print(
    run: Callable[[ConfigT], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, str], ConfigT, str, dict[str, Any]], str],
    config: ConfigT,
    env: dict[str, str],
    *,
    quick: bool,
    as_json: bool,
) -> None:
    """Runs the benchmarks of ``config`` in a new event loop, then prints the figures: as
    ``render`` has them with the time the run took, or as JSON."""
    mode = "quick" if quick else "default"
    started = time.perf_counter()
    results = asyncio.run(run(config))
    seconds = time.perf_counter() - started
    if as_json:
        document = {"environment": env, "mode": mode, "config": asdict(config), **results}
        document["seconds"] = seconds
        print(json.dumps(document, indent=2))
    else:
        print(render(env, config, mode, results))
        print(f"\n  (ran in {seconds:.1f} s)")
