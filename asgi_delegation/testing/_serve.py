"""Running an ASGI application with uvicorn on a loopback socket, inside an async block."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import anyio

from .._urls import is_loopback_host

Lifespan = Literal["on", "off"]


@contextmanager
def loopback_socket(host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[socket.socket, str]]:
    """A listening socket on a loopback host, and its ``http://`` origin."""
    if not is_loopback_host(host):
        raise ValueError("only loopback hosts may be served on")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: without it, a response written in two parts waits
        # for the client's delayed ACK (about 40 ms) on every reused connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        # Connections queue from here on, so nobody has to wait for the server to start.
        sock.listen(128)
        bound = sock.getsockname()[1]
        yield sock, (f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}")


def _uvicorn(app: Any, lifespan: Lifespan) -> Any:
    try:
        import uvicorn  # an optional dependency
    except ImportError:
        raise RuntimeError(
            "serving on a loopback port needs uvicorn: pip install 'asgi-delegation[serve]'"
        ) from None
    return uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_level="warning"))


def _started(app: Any, sock: socket.socket, lifespan: Lifespan) -> tuple[Any, threading.Thread]:
    server = _uvicorn(app, lifespan)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread


@contextmanager
def running_on(app: Any, sock: socket.socket, *, lifespan: Lifespan = "off") -> Iterator[None]:
    """Serve ``app`` with uvicorn on ``sock``, on a thread of its own, until the block ends.
    ``lifespan="on"`` runs the app's lifespan in that thread's event loop."""
    server, thread = _started(app, sock, lifespan)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join()


@asynccontextmanager
async def serve_on(
    app: Any, sock: socket.socket, *, lifespan: Lifespan = "off"
) -> AsyncIterator[None]:
    """The same inside an event loop: the block may begin and end in different tasks (as
    pytest fixtures do), and the loop is not blocked while the server stops."""
    server, thread = _started(app, sock, lifespan)
    try:
        yield
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join)


@asynccontextmanager
async def serve(app: Any, sock: socket.socket, *, lifespan: Lifespan = "on") -> AsyncIterator[None]:
    """Serve ``app`` with uvicorn on ``sock`` (from :func:`loopback_socket`) in the current
    event loop until the block ends; its lifespan runs first unless ``lifespan="off"``.

    No thread, unlike :func:`serve_on`: applications that compile code while serving
    (pydantic models, the MCP SDKs) can meet a spurious ``SystemError`` on CPython 3.11 (AST
    recursion depth mismatch, gh-106905) when a second thread compiles at the same time.
    """
    server = _uvicorn(app, lifespan)
    ready = asyncio.Event()
    startup = server.startup

    async def startup_then_tell(sockets: Any = None) -> None:
        await startup(sockets=sockets)
        ready.set()

    async def serving() -> None:
        # uvicorn exits the process when startup fails; a task raising SystemExit would stop
        # the caller's event loop. Said below as a RuntimeError instead.
        with contextlib.suppress(SystemExit):
            await server.serve(sockets=[sock])

    server.startup = startup_then_tell  # uvicorn has no startup event to wait on
    task = asyncio.ensure_future(serving())
    started = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if not server.started:
            await task
            raise RuntimeError("the server stopped during its startup (see its log)")
        yield
    finally:
        started.cancel()
        server.should_exit = True
        await task
