"""One middleware across lifespan cycles and event loops.

A middleware outlives the event loops it serves in: Starlette's TestClient runs each ``with``
block in a loop of its own, ``asyncio.run()`` may be called more than once, a test suite serves
the same application again and again, several loops may run at once in threads. Whatever the
middleware keeps from one loop (pooled connections, tasks, an anyio limiter) must not reach
another, and closing its client at lifespan shutdown must not end its service.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx
from starlette.testclient import TestClient

from asgi_delegation import DelegationMiddleware
from asgi_delegation._singleflight import SingleFlight
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket, running_on

from .conftest import (
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    exchanger_of,
    exchanging_app,
    fetches,
)

WAIT = 5.0  # bounds every wait: a hang fails the test instead of stalling it


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def delegating(auth: LocalAuthorizationServer, **options: Any) -> DelegationMiddleware:
    """The middleware around ``exchanging_app``, with the HTTP client it makes itself."""
    return DelegationMiddleware(
        exchanging_app(auth),
        issuer=auth.issuer,
        resource=RESOURCE,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        **options,
    )


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """``app``'s lifespan, as a server runs it: startup on entry, shutdown on exit."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, scope, inbox.get, outbox.put)
        await inbox.put({"type": "lifespan.startup"})
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
        yield
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"


def test_testclient_with_blocks_one_after_another(
    auth: LocalAuthorizationServer, made_clients: list[httpx.AsyncClient]
) -> None:
    with auth.running():
        middleware = delegating(auth, jwks_refetch_cooldown=0)
        for cycle, resource in enumerate([GITHUB, GOOGLE, SLACK]):
            if cycle:
                auth.rotate_keys()  # a kid this middleware has not seen: the JWKS is fetched
            headers = bearer(auth.mint("alice", audience=RESOURCE))
            # Each block runs the lifespan, whose shutdown closes the client, in a loop of its own.
            with TestClient(middleware, base_url=BASE_URL) as client:
                plain = client.get("/mcp", headers=headers)
                answer = client.get("/exchange", params={"resource": resource}, headers=headers)
            assert plain.status_code == 200
            assert answer.json()["grants"][0]["sub"] == "alice", answer.text
            assert made_clients[-1].is_closed
    assert fetches(auth, "jwks") == 3
    assert len(made_clients) == 3


async def test_lifespan_cycles_in_one_event_loop(
    served_auth: LocalAuthorizationServer, made_clients: list[httpx.AsyncClient]
) -> None:
    middleware = delegating(served_auth)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        for cycle, resource in enumerate([GITHUB, GOOGLE]):
            if cycle:
                served_auth.rotate_keys()
            headers = bearer(served_auth.mint("alice", audience=RESOURCE))
            async with lifespan(middleware):
                plain = await client.get("/mcp", headers=headers)
                params = {"resource": resource}
                exchanged = await client.get("/exchange", params=params, headers=headers)
            assert plain.status_code == 200
            assert exchanged.json()["grants"][0]["resource"] == resource, exchanged.text
            assert made_clients[-1].is_closed
    assert len(made_clients) == 2


def test_each_event_loop_gets_its_own_connections(
    auth: LocalAuthorizationServer, made_clients: list[httpx.AsyncClient]
) -> None:
    def request(token: str, resource: str) -> httpx.Response:
        async def main() -> httpx.Response:
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
                params = {"resource": resource}
                return await client.get("/exchange", params=params, headers=bearer(token))

        return asyncio.run(main())

    with auth.running():
        middleware = delegating(auth)
        # No lifespan: the connections this loop pools to the authorization server stay open
        # until the loop ends.
        first = request(auth.mint("alice", audience=RESOURCE), GITHUB)
        auth.rotate_keys()
        second = request(auth.mint("bob", audience=RESOURCE), GOOGLE)
        asyncio.run(middleware.aclose())  # from yet another loop: nothing of its own to close
    assert first.json()["grants"][0]["sub"] == "alice"
    assert second.json()["grants"][0]["sub"] == "bob"
    assert fetches(auth, "jwks") == 2
    # Each loop closed its client as it ended (asyncio.run finalizes async generators).
    assert len(made_clients) == 2
    assert all(client.is_closed for client in made_clients)


@contextmanager
def metadata_answered_when(auth: LocalAuthorizationServer, waiting: int) -> Iterator[None]:
    """``auth`` on loopback, answering metadata requests only once ``waiting`` of them wait."""
    arrived = 0
    enough = asyncio.Event()  # bound to the server's loop, the only one that awaits it

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal arrived
        if scope["type"] == "http" and "/.well-known/" in scope["path"]:
            arrived += 1
            if arrived == waiting:
                enough.set()
            with anyio.fail_after(WAIT):
                await enough.wait()
        await auth(scope, receive, send)

    with loopback_socket() as (sock, origin):
        auth.issuer = origin
        with running_on(app, sock):
            yield


def test_two_event_loops_at_once(auth: LocalAuthorizationServer) -> None:
    # Whichever loop asks first waits for the metadata until the other asks too: a fetch under
    # way in another loop cannot be awaited in this one, so each loop must send its own.
    with metadata_answered_when(auth, waiting=2):
        middleware = delegating(auth)

        def in_a_loop_of_its_own(subject: str) -> tuple[int, int]:
            async def main() -> tuple[int, int]:
                transport = httpx.ASGITransport(app=middleware)
                async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
                    token = auth.mint(subject, audience=RESOURCE)
                    plain = await client.get("/mcp", headers=bearer(token))
                    params = {"resource": GITHUB}
                    exchanged = await client.get("/exchange", params=params, headers=bearer(token))
                await middleware.aclose()
                return plain.status_code, exchanged.status_code

            return asyncio.run(main())

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(in_a_loop_of_its_own, ["alice", "bob"]))
    assert answers == [(200, 200), (200, 200)]
    assert fetches(auth, "metadata") == 2


def test_a_flight_of_another_loop_is_not_joined() -> None:
    flight: SingleFlight[str] = SingleFlight()
    stalled = asyncio.new_event_loop()  # stands for a loop that ended with work under way
    try:

        async def forever() -> str:
            await asyncio.Event().wait()
            raise AssertionError("never released")

        async def start() -> None:
            flight.start("k", forever)

        stalled.run_until_complete(start())

        async def fresh() -> tuple[bool, str]:
            joinable = flight.in_flight("k")
            return joinable, await flight.run("k", fresh_work)

        async def fresh_work() -> str:
            return "fresh"

        assert asyncio.run(fresh()) == (False, "fresh")
    finally:
        leftovers = asyncio.all_tasks(stalled)
        for task in leftovers:
            task.cancel()
        stalled.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        stalled.close()


class Holding(httpx.AsyncBaseTransport):
    """Reaches ``auth`` in process; a token request while ``hold`` is set waits for
    ``release``."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self._inner = httpx.ASGITransport(app=auth)
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.hold and request.url.path.endswith("/token"):
            self.hold = False
            self.held.set()
            await self.release.wait()
        return await self._inner.handle_async_request(request)


def test_the_exchange_limit_holds_per_event_loop(auth: LocalAuthorizationServer) -> None:
    transport = Holding(auth)
    middleware = delegating(
        auth,
        http_client=httpx.AsyncClient(transport=transport),
        max_concurrent_exchanges=1,
        exchange_timeout=2,
    )

    def exchanging(resource: str) -> Callable[[], Any]:
        async def main() -> Any:
            inbound = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=inbound, base_url=BASE_URL) as client:
                token = auth.mint("alice", audience=RESOURCE)
                params = {"resource": resource}
                return (await client.get("/exchange", params=params, headers=bearer(token))).json()

        return main

    stalled = asyncio.new_event_loop()
    try:
        # An exchange in one loop holds the only slot of that loop's limit, and its loop stops.
        transport.hold = True
        held = stalled.create_task(exchanging(GITHUB)())
        stalled.run_until_complete(transport.held.wait())
        # Another loop has slots of its own: it must not wait for a loop that does not run.
        answer = asyncio.run(exchanging(GOOGLE)())
        assert answer["grants"][0]["resource"] == GOOGLE, answer
    finally:
        transport.release.set()
        stalled.run_until_complete(held)
        stalled.close()
    assert held.result()["grants"][0]["resource"] == GITHUB


def test_aclose_from_a_later_loop_with_a_refresh_left_in_a_closed_one(
    auth: LocalAuthorizationServer,
) -> None:
    middleware = delegating(auth, http_client=auth.http_client())
    ended = asyncio.new_event_loop()

    async def refreshing() -> Any:
        await asyncio.Event().wait()

    # A background refresh still waiting when its loop was closed without cancelling it.
    left = ended.create_task(refreshing())
    ended.run_until_complete(asyncio.sleep(0))  # the task starts and waits
    ended.close()
    exchanger_of(middleware)._background.add(left)
    asyncio.run(middleware.aclose())
    asyncio.run(middleware.aclose())  # again: still safe
    assert not exchanger_of(middleware)._background
    # Collected here, not in some later test: its loop reports the destroyed pending task.
    del left
    gc.collect()
