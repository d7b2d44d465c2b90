"""Running an ASGI application under uvicorn, hypercorn or granian on a socket the test bound on
127.0.0.1, each server on a thread with its own event loop, with lifespan on."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import anyio

from asgi_delegation.testing._serve import serve_on

# Bounds the wait for a server to stop: a hung shutdown fails the test instead of hanging it.
STOP_TIMEOUT = 10.0

Serve = Callable[[Any, socket.socket], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _on_own_loop(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[None]:
    """Run ``main(stop)`` on a new thread and event loop until the block ends, then set ``stop``
    in that loop, wait for ``main`` to return and raise what it raised."""
    loop = asyncio.new_event_loop()
    # Not bound to a loop until first awaited, which happens in the server's loop.
    stop = asyncio.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(main(stop))
        except BaseException as exc:  # handed to the test instead of dying with the thread
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        # RuntimeError: the loop is closed, main has returned already.
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)
        await anyio.to_thread.run_sync(thread.join, STOP_TIMEOUT)
        assert not thread.is_alive(), "the server did not stop"
        if failures:
            raise failures[0]


def serve_uvicorn(app: Any, sock: socket.socket) -> AbstractAsyncContextManager[None]:
    return serve_on(app, sock, lifespan="on")


def serve_hypercorn(app: Any, sock: socket.socket) -> AbstractAsyncContextManager[None]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    async def main(stop: asyncio.Event) -> None:
        config = Config()
        # Hypercorn wraps the descriptor in a socket it closes when it stops: give it a copy,
        # so that the test's socket is not closed twice (possibly after its number is reused).
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        config.graceful_timeout = 1.0
        # Its own handler would write to whatever sys.stderr is when the server thread starts,
        # the terminal if pytest's capture is suspended then: let records reach the root instead.
        config.errorlog = logging.getLogger("hypercorn.error")
        await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")

    return _on_own_loop(main)


def serve_granian(app: Any, sock: socket.socket) -> AbstractAsyncContextManager[None]:
    # Granian's embedded server: its ASGI worker runs in the asyncio loop that awaits serve().
    from granian._granian import SocketHolder
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    class OnSocket(Server):
        def _init_shared_socket(self) -> None:
            # Serve on the test's socket instead of binding one (no port to race for). The
            # holder owns and closes its descriptor: give it a copy.
            self._shd = SocketHolder(os.dup(sock.fileno()), False, 128)  # type: ignore[call-arg,assignment]

    async def main(stop: asyncio.Event) -> None:
        server = OnSocket(
            app,
            address="127.0.0.1",
            port=sock.getsockname()[1],
            interface=Interfaces.ASGI,
            websockets=True,
            log_level=LogLevels.warning,
            # Incremental: granian only sets its logger's level instead of replacing (and
            # closing) every handler of the test process's logging configuration.
            log_dictconfig={"version": 1, "incremental": True, "handlers": {}, "loggers": {}},
        )
        serving = asyncio.ensure_future(server.serve())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        server.stop()  # type: ignore[no-untyped-call]
        await serving

    return _on_own_loop(main)


SERVERS: dict[str, Serve] = {
    "uvicorn": serve_uvicorn,
    "hypercorn": serve_hypercorn,
    "granian": serve_granian,
}
