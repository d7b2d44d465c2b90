"""One "process" of an application sharing grants through Redis, for tests/test_redis_processes.

Run as ``python -m tests._redis_worker`` from the repository root. The first line on stdin is
the configuration (JSON): ``issuer``, ``resource``, ``client_id``, ``client_secret``, ``key``
(base64url), ``redis`` (``{"url": ...}`` or ``{"cluster": [host, port]}``) and optionally
``lease_timeout`` and ``stall_after_lookup`` (fault injection, see ``Worker.stall_after_lookup``).
The worker builds a ``DelegationMiddleware`` with a ``RedisGrantCache``,
subscribes, and prints ``{"ready": ...}``; then every further line is a command (JSON with an
``op``) answered by one JSON line on stdout.

Tokens reach the worker on stdin; nothing it prints holds a token, a grant or a secret: only
status codes, counts, claims (``sub``, ``aud``), times and short digests of grants (so that the
test sees whether processes were handed the same grant).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import httpx
from joserfc import jwt
from joserfc.jwk import KeySet

from asgi_delegation import DelegationMiddleware, ExchangeError
from asgi_delegation.redis import RedisGrantCache

BASE_URL = "http://127.0.0.1:8000"


def grant_id(token: str) -> str:
    """A short digest of a grant: the same for the same grant, never the grant itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Probe:
    """A listener of the shared cache (the seam's ``Listener``): tells when the subscription
    is confirmed (the cache flushes its listeners then) and when invalidations arrive."""

    issuer = ""

    def __init__(self) -> None:
        self.subscribed = asyncio.Event()
        self.invalidations: list[float] = []

    def flush(self) -> None:
        self.subscribed.set()

    def invalidated(self, matches: Any) -> None:
        self.invalidations.append(time.time())


def make_app(keys: KeySet) -> Any:
    """``GET /exchange?resource=R``: exchanges and answers the grant's claims (verified with
    the issuer's keys), or the error. Anything else answers the process id."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        document: dict[str, Any] = {"pid": os.getpid()}
        if scope["path"] == "/exchange":
            ctx = scope["state"]["access_context"]
            params = dict(parse_qsl(scope["query_string"].decode()))
            try:
                grant = await ctx.exchange(params["resource"])
            except ExchangeError as exc:
                document["error"] = exc.error
            else:
                claims = jwt.decode(grant.access_token, keys).claims
                document.update(sub=claims.get("sub"), aud=claims.get("aud"))
                document["grant"] = grant_id(grant.access_token)
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.resource: str = config["resource"]
        self.redis_client: Any = None
        self.streams: list[asyncio.Task[dict[str, Any]]] = []
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        async with httpx.AsyncClient() as client:
            jwks = (await client.get(config["issuer"] + "/jwks")).json()
        keys = KeySet.import_key_set(jwks)
        target: Any
        if "cluster" in config["redis"]:
            from redis.asyncio.cluster import RedisCluster

            host, port = config["redis"]["cluster"]
            target = self.redis_client = RedisCluster(host=host, port=port)
        else:
            target = config["redis"]["url"]
        options = {}
        if config.get("lease_timeout") is not None:
            options["lease_timeout"] = config["lease_timeout"]
        self.cache = RedisGrantCache(target, encryption_keys=[config["key"]], **options)
        self.probe = Probe()
        self.cache.attach(self.probe)
        if config.get("stall_after_lookup"):
            self.stall_after_lookup(config["stall_after_lookup"])
        self.middleware = DelegationMiddleware(
            make_app(keys),
            issuer=config["issuer"],
            resource=self.resource,
            client_id=config["client_id"],
            client_secret=config["client_secret"],
            shared_cache=self.cache,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.middleware), base_url=BASE_URL
        )
        # Subscribe before the first request, so that the subscription's confirmation (which
        # flushes the in-process cache) does not land in the middle of a test's burst. The
        # cache subscribes when first used in a loop; there is no public way to ask for it.
        self.cache._state()
        await asyncio.wait_for(self.probe.subscribed.wait(), 10)

    def stall_after_lookup(self, seconds: float) -> None:
        """Fault injection: once, between reading a Redis lookup's answer and going on, this
        process is busy for ``seconds`` (as a process whose event loop lags: a long
        synchronous handler, a GC pause, a saturated CPU)."""
        lookup = self.cache._lookup
        stalled = False

        async def lagging(*arguments: Any, **keywords: Any) -> Any:
            nonlocal stalled
            found = await lookup(*arguments, **keywords)
            if not stalled:
                stalled = True
                time.sleep(seconds)  # noqa: ASYNC251 - on purpose: the whole process is busy
            return found

        self.cache._lookup = lagging  # type: ignore[method-assign]

    async def aclose(self) -> None:
        for task in self.streams:
            task.cancel()
        await self.client.aclose()
        await self.middleware.aclose()
        if self.redis_client is not None:
            await self.redis_client.aclose()

    async def request(self, token: str, path: str = "/exchange") -> dict[str, Any]:
        started = time.time()
        try:
            response = await self.client.get(
                path,
                params={"resource": self.resource},
                headers={"authorization": f"Bearer {token}"},
            )
        except Exception as exc:  # reported by its class only: its text might quote a token
            return {"status": None, "failure": type(exc).__name__, "t": started}
        answer: dict[str, Any] = {"status": response.status_code, "t": started}
        answer["latency"] = time.time() - started
        if response.status_code == 200:
            answer.update(response.json())
        return answer

    # Commands.

    async def op_warm(self, token: str) -> dict[str, Any]:
        """An authenticated request that exchanges nothing: the issuer's keys are fetched."""
        answer = await self.request(token, path="/")
        return {"status": answer["status"]}

    async def op_burst(self, token: str, n: int) -> dict[str, Any]:
        started = time.time()
        answers = await asyncio.gather(*(self.request(token) for _ in range(n)))
        return summary(answers) | {"started": started, "elapsed": time.time() - started}

    async def op_stats(self) -> dict[str, Any]:
        caches: dict[str, Any] = self.middleware.stats()["caches"]
        return {"grants": caches["grants"], "shared": caches["shared"]}

    async def op_local(self, subject: str) -> dict[str, Any]:
        return {"entries": self.local_entries(subject)}

    async def op_invalidate(self, subject: str) -> dict[str, Any]:
        started = time.time()
        try:
            await self.middleware.invalidate_grants(subject)
        except Exception as exc:
            return {"ok": False, "failure": type(exc).__name__}
        return {"ok": True, "started": started, "local": self.local_entries(subject)}

    def local_entries(self, subject: str) -> int:
        """How many grants of ``subject`` this process's in-process cache holds (read from
        its internals: nothing public tells)."""
        exchanger = self.middleware._exchanger
        assert exchanger is not None
        entries = exchanger._grants._entries.values()
        return sum(1 for entry in entries if entry.subject == subject)

    async def op_watch(self, subject: str, within: float) -> dict[str, Any]:
        """Poll this process's own cache until ``subject`` has no grant in it (nothing in the
        in-process cache announces a removal, so it is looked at every millisecond)."""
        deadline = time.monotonic() + within
        while self.local_entries(subject):
            if time.monotonic() > deadline:
                return {"gone_at": None}
            await asyncio.sleep(0.001)
        return {"gone_at": time.time(), "invalidations": self.probe.invalidations}

    async def op_stream_start(
        self, cached: list[str], fresh: list[list[str]], interval: float, fresh_every: int
    ) -> dict[str, Any]:
        """Keep asking, a request every ``interval`` seconds: for ``cached``'s grant and, every
        ``fresh_every`` requests, for the next of ``fresh`` (a user never seen before); both
        as ``[user, token]``. Each request is recorded: when it began, its kind, and whether
        it got a grant for the expected user."""
        self.stopping.clear()
        self.streams.append(
            asyncio.ensure_future(self.stream(cached, fresh, interval, fresh_every))
        )
        return {"ok": True}

    async def stream(
        self, cached: list[str], fresh: list[list[str]], interval: float, fresh_every: int
    ) -> dict[str, Any]:
        records: list[dict[str, Any]] = []
        pending: set[asyncio.Task[None]] = set()
        fresh = list(fresh)
        count = 0

        async def one(token: str, kind: str, user: str) -> None:
            answer = await self.request(token)
            ok = answer["status"] == 200 and "error" not in answer and answer.get("sub") == user
            failure = answer.get("error") or answer.get("failure")
            records.append(
                {
                    "t": answer["t"],
                    "kind": kind,
                    "ok": ok,
                    "status": answer["status"],
                    "why": failure,
                }
            )

        while not self.stopping.is_set():
            count += 1
            if count % fresh_every == 0 and fresh:
                (user, token), kind = fresh.pop(0), "fresh"
            else:
                (user, token), kind = cached, "cached"
            task = asyncio.ensure_future(one(token, kind, user))
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
        if pending:
            await asyncio.wait(pending)
        return {"records": records, "unused": len(fresh)}

    async def op_stream_stop(self) -> dict[str, Any]:
        self.stopping.set()
        results = [await task for task in self.streams]
        self.streams.clear()
        return {"records": [r for result in results for r in result["records"]]}


def summary(answers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "statuses": Counter(str(a["status"]) for a in answers),
        "subs": Counter(str(a.get("sub")) for a in answers),
        "auds": Counter(str(a.get("aud")) for a in answers),
        "grants": sorted({a["grant"] for a in answers if "grant" in a}),
        "errors": Counter(a.get("error") or a.get("failure") for a in answers if "sub" not in a),
        "max_latency": max((a.get("latency", 0.0) for a in answers), default=0.0),
    }


def say(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)  # a command may carry hundreds of tokens
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker(json.loads(await reader.readline()))
    await worker.start()
    running: set[asyncio.Task[None]] = set()

    async def run(command: dict[str, Any]) -> None:
        ident, op = command.pop("id"), command.pop("op")
        try:
            reply = await getattr(worker, f"op_{op}")(**command)
        except Exception as exc:  # said by class only: its text might quote a token
            reply = {"crashed": type(exc).__name__}
        say({"id": ident, **reply})

    try:
        say({"ready": True, "pid": os.getpid()})
        # Commands run concurrently (a test asks for stats while a burst is under way); each
        # answer carries its command's id.
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "exit":
                break
            task = asyncio.ensure_future(run(command))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        for task in list(running):
            task.cancel()
        await worker.aclose()


if __name__ == "__main__":
    asyncio.run(main())
