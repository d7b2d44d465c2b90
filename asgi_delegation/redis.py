"""RedisGrantCache: one grant cache and one single-flight for every process and replica.

Install with ``pip install 'asgi-delegation[redis]'``. Behind each process's in-process cache,
a miss looks in Redis; when Redis has nothing, one process takes a lease (``SET NX PX`` with a
random token only it can release) and asks the authorization server while the others wait for
its result, woken by pub/sub or by polling, for at most the lease; what it obtains is stored
for everyone until the grant or the subject token expires, whichever is first.

Nothing in Redis is readable: key names are HMACs, values are AES-GCM with their key name as
associated data (see ``_sealing``). Every key of one subject shares a hash tag, so a Redis
Cluster keeps them in one slot. A per-subject generation, bumped by an invalidation and
broadcast on the namespace's channel, retires a subject's grants everywhere at once.

Redis is never needed for a request to succeed: each operation is bounded by ``timeout``; any
failure (down, slow, errors, garbage, failover, out of memory) degrades to the in-process cache
and direct exchanges, and a circuit breaker skips Redis while it keeps failing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

import anyio

from . import _clock
from ._breaker import Breaker
from ._errors import ConfigurationError, SharedCacheUnavailable
from ._grant import Grant
from ._grants import Fetch, Issued, Item, Listener
from ._loops import PerLoop
from ._sealing import _NAME_CHARS, Keyring

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import (
        DataError,
        InvalidResponse,
        OutOfMemoryError,
        ReadOnlyError,
        RedisError,
        ResponseError,
    )
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - exercised by a test in a fresh environment
    raise ConfigurationError(
        "asgi_delegation.redis needs redis-py: pip install 'asgi-delegation[redis]'"
    ) from None

__all__ = ["RedisGrantCache"]

logger = logging.getLogger("asgi_delegation.redis")

T = TypeVar("T")

_POLL_FIRST, _POLL_MAX = 0.02, 0.5  # a waiter's re-checks, should the announcement be missed
_LISTEN_FIRST, _LISTEN_MAX = 0.2, 2.0  # resubscribing after the subscription broke
_GENERATION_TTL_MS = (86400 + 3600) * 1000  # outlives every grant: none lives over a day
_MIN_TTL = 1.0  # a grant with less than this to live is not worth a write
_MAX_MESSAGE = 64 * 1024
#: Every command the cache sends (for an ACL user's rules: ``asgi-delegation doctor`` prints
#: them). EVALSHA and SCRIPT LOAD run the lease release; SUBSCRIBE the announcements.
COMMANDS = (
    "get",
    "mget",
    "set",
    "del",
    "evalsha",
    "script|load",
    "publish",
    "subscribe",
    "unsubscribe",
)
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class _Down(Exception):
    """A Redis operation failed (already counted by the breaker): go on without Redis."""


class _Names:
    """One grant's Redis keys under one encryption key."""

    __slots__ = ("generation", "grant", "item", "lease")

    def __init__(self, prefix: str, item: str) -> None:
        self.item = item
        self.grant = f"{prefix}:g:{item}"
        self.lease = f"{prefix}:l:{item}"
        self.generation = _generation_key(prefix)


def _generation_key(prefix: str) -> str:
    return f"{prefix}:v"


def grant_pattern(namespace: str) -> str:
    """A SCAN MATCH pattern for the grants of ``namespace`` and of no other: ``{NS:TAG}:g:ITEM``,
    TAG and ITEM being names of ``_NAME_CHARS`` characters (namespace "a" must not take "a:b"'s)."""
    name = "?" * _NAME_CHARS
    return f"{{{_glob(namespace)}:{name}}}:g:{name}"


def _glob(text: str) -> str:
    """``text`` matched literally in a Redis glob pattern (SCAN MATCH, ACL key patterns)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class _LoopState:
    """What one event loop uses: connections, the subscription, waiters for announcements."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.release = client.register_script(_RELEASE)
        self.listener: asyncio.Task[None] | None = None
        self.landed: dict[str, asyncio.Event] = {}


class RedisGrantCache:
    """Grants shared through Redis by every process and replica; give it to
    ``DelegationMiddleware(..., shared_cache=...)``.

    ``url_or_client`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL (ACL user and password
    may be in it; they are never shown) or a ``redis.asyncio.Redis`` / ``RedisCluster`` instance
    (Sentinel: ``Sentinel(...).master_for(name)``), made with ``decode_responses=False``.
    ``encryption_keys`` are 32-byte keys, as bytes or base64url text: the first encrypts, all
    decrypt. ``namespace`` prefixes every key, so several applications can share one Redis.
    ``lease_timeout`` bounds how long processes wait for another's exchange; ``timeout``
    bounds each Redis operation. Construction does no I/O.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis | RedisCluster,
        *,
        encryption_keys: Sequence[bytes | str],
        namespace: str = "asgi-delegation",
        lease_timeout: float = 12.0,
        timeout: float = 0.25,
    ) -> None:
        self._keyring = Keyring(encryption_keys)
        if (
            not isinstance(namespace, str)
            or not 0 < len(namespace) <= 64
            or not namespace.isprintable()
            or any(c in namespace for c in "{} ")
        ):
            raise ConfigurationError(
                "namespace must be 1 to 64 printable characters, without spaces or braces"
            )
        self._lease_timeout = _number(lease_timeout, "lease_timeout", 1.0, 300.0)
        self._timeout = _number(timeout, "timeout", 0.01, 5.0)
        self._lease_ms = int(self._lease_timeout * 1000)
        self._namespace = namespace
        self._channel = f"{namespace}:events"
        if isinstance(url_or_client, str):
            try:
                parsed = parse_url(url_or_client)
            except (ValueError, TypeError):  # the text may hold a password: never quoted
                raise ConfigurationError(
                    "the Redis URL must be redis://, rediss:// or unix://"
                ) from None
            self._where = _where(parsed)
            url = url_or_client
            self._owned = True
            self._states: PerLoop[_LoopState] = PerLoop(lambda: _LoopState(self._connect(url)))
        elif isinstance(url_or_client, aioredis.Redis | RedisCluster):
            if url_or_client.get_encoder().decode_responses:
                raise ConfigurationError("the Redis client must have decode_responses=False")
            self._where = type(url_or_client).__name__
            given = url_or_client
            self._owned = False
            self._states = PerLoop(lambda: _LoopState(given))
        else:
            raise ConfigurationError(
                "url_or_client must be a Redis URL or a redis.asyncio Redis or RedisCluster"
            )
        self._breaker = Breaker(logger, f"the shared grant cache ({self._where})")
        self._listeners: list[Listener] = []
        self._counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"RedisGrantCache({self._where}, namespace={self._namespace!r})"

    def _connect(self, url: str) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again
        )

    # The seam (``_grants.SharedCache``).

    def attach(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def available(self) -> bool:
        return self._breaker.allows()

    async def look(
        self, item: Item, accept: Callable[[Issued], bool]
    ) -> tuple[Issued | None, bool]:
        try:
            issued, _ = await self._lookup(self._state(), self._names(item), accept)
        except _Down:
            return None, False
        return issued, True

    async def obtain(
        self, item: Item, fetch: Fetch, accept: Callable[[Issued], bool], *, looked: bool
    ) -> Issued:
        state = self._state()
        names = self._names(item)
        generation: int | None = None  # learnt by the look after taking the lease
        if not looked:
            try:
                issued, generation = await self._lookup(state, names, accept)
            except _Down:
                return await fetch()
            if issued is not None:
                return issued
        self._counts["miss"] += 1
        return await self._single_flight(state, names, generation, item, fetch, accept)

    async def discard(self, item: Item, grant: Grant) -> None:
        state = self._state()
        names = self._names(item)
        with suppress(_Down):
            values = await self._call(partial(_get, state.client, [one.grant for one in names]))
            stale = [
                one.grant
                for index, (one, sealed) in enumerate(zip(names, values, strict=True))
                if (found := self._open(index, one, sealed)) is not None
                and hmac.compare_digest(found[0].grant.access_token, grant.access_token)
            ]
            if stale:
                await self._call(lambda: state.client.delete(*stale))

    async def invalidate(self, issuers: Sequence[str], subject: str) -> None:
        if not self._breaker.allows():
            raise SharedCacheUnavailable(
                f"the shared grant cache ({self._where}) is failing: other processes were not told"
            )
        state = self._state()
        tags = [tag for issuer in issuers for tag in self._subject_tags(issuer, subject)]
        generations = [_generation_key(self._prefix(tag)) for tag in tags]
        try:
            await self._call(partial(_bump, state.client, generations))
            await self._call(lambda: state.client.publish(self._channel, "i" + ",".join(tags)))
        except _Down:
            raise SharedCacheUnavailable(
                f"the shared grant cache ({self._where}) failed: other processes were not told"
            ) from None
        self._counts["invalidated"] += 1

    def stats(self) -> dict[str, Any]:
        counts = self._breaker.counts
        return {
            **{k: self._counts[k] for k in ("hit", "miss", "write", "waited", "invalidated")},
            "unreadable": self._counts["unreadable"],
            "breaker": {"open": self._breaker.is_open, **counts},
        }

    async def aclose(self) -> None:
        """Stop the running loop's subscription and close its connections (those of a client
        made from a URL; a given client is left open). Used again, it reconnects."""
        state = self._states.pop()
        if state is None:
            return
        task = state.listener
        # More than once if need be: a cancellation can be lost inside redis-py (see
        # _raise_if_cancelled), and shutdown must not hang on it.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self._timeout)
        if self._owned:
            await state.client.aclose()

    # Lookups, leases and writes.

    def _state(self) -> _LoopState:
        state = self._states.get()
        task = state.listener
        if task is None or task.done():
            state.listener = asyncio.get_running_loop().create_task(self._listen(state))
        return state

    def _names(self, item: Item) -> list[_Names]:
        label = b"g" + item.key
        return [
            _Names(self._prefix(tag), self._keyring.name(index, label))
            for index, tag in enumerate(self._subject_tags(item.issuer, item.subject))
        ]

    def _prefix(self, tag: str) -> str:
        """A subject's keys' common start: its hash tag keeps them in one cluster slot."""
        return f"{{{self._namespace}:{tag}}}"

    def _subject_tags(self, issuer: str, subject: str) -> list[str]:
        return self._keyring.names(b"s" + json.dumps([issuer, subject]).encode())

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            # asyncio's own timeout: a cancel scope costs more than the round trip it bounds.
            async with asyncio.timeout(self._timeout):
                result = await operation()
        except TimeoutError:
            self._breaker.failed("timeout")
            raise _Down from None
        except Exception as exc:  # anything redis-py raises, however garbled the answer
            self._breaker.failed(_cause(exc))
            raise _Down from None
        self._breaker.succeeded()
        return result

    async def _lookup(
        self,
        state: _LoopState,
        names: list[_Names],
        accept: Callable[[Issued], bool],
        *,
        again: bool = False,
    ) -> tuple[Issued | None, int | None]:
        """The first acceptable grant under any key's name, and the newest key's generation
        (None when it is unreadable: nothing is written then). Looking ``again`` at the same
        entries counts no unreadable one twice."""
        # One MGET per key's names (they share a hash tag, so a cluster slot): one round trip.
        answers = await self._call(partial(_generations_and_grants, state.client, names))
        newest: int | None = None
        for index, (one, (raw_generation, sealed)) in enumerate(zip(names, answers, strict=True)):
            generation = _generation(raw_generation)
            if index == 0:
                newest = generation
            found = self._open(index, one, sealed, count=not again)
            if found is None or generation is None:
                continue
            issued, written_under = found
            if written_under == generation and accept(issued):
                self._counts["hit"] += 1  # every hit is this, whoever looked
                return issued, newest
        return None, newest

    def _open(
        self, index: int, names: _Names, sealed: object, *, count: bool = True
    ) -> tuple[Issued, int] | None:
        if sealed is None:
            return None
        plain = self._keyring.open(index, sealed, names.grant.encode())
        found = None if plain is None else _decoded(plain)
        if found is None and count:
            self._counts["unreadable"] += 1  # corrupt, foreign or moved: a miss, overwritten
        return found

    async def _single_flight(
        self,
        state: _LoopState,
        names: list[_Names],
        generation: int | None,
        item: Item,
        fetch: Fetch,
        accept: Callable[[Issued], bool],
    ) -> Issued:
        newest = names[0]
        client = state.client
        lease = secrets.token_hex(16)
        give_up_at = _clock.monotonic() + self._lease_timeout
        delay = _POLL_FIRST
        while True:
            try:
                held = await self._call(
                    lambda: client.set(newest.lease, lease, nx=True, px=self._lease_ms)
                )
            except _Down:
                return await fetch()
            if held:
                return await self._fetch_holding(
                    state, names, lease, generation, item, fetch, accept
                )
            if delay == _POLL_FIRST:
                self._counts["waited"] += 1
            remaining = give_up_at - _clock.monotonic()
            if remaining <= 0:
                break
            jittered = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not a secret
            await self._announced(state, newest.item, min(jittered, remaining))
            delay = min(delay * 2, _POLL_MAX)
            try:
                issued, generation = await self._lookup(state, names, accept)
            except _Down:
                return await fetch()
            if issued is not None:
                return issued
        # The holder has had its whole lease (it died, or its exchange is that slow): go alone.
        issued = await fetch()
        await self._store(state, newest, generation, item, issued)
        return issued

    async def _fetch_holding(
        self,
        state: _LoopState,
        names: list[_Names],
        lease: str,
        generation: int | None,
        item: Item,
        fetch: Fetch,
        accept: Callable[[Issued], bool],
    ) -> Issued:
        newest = names[0]
        try:
            # The previous holder may have stored the grant and released the lease between
            # this process's last look and its taking the lease: look once more.
            try:
                issued, generation = await self._lookup(state, names, accept, again=True)
            except _Down:
                issued = None
            if issued is not None:
                return issued
            issued = await fetch()
            await self._store(state, newest, generation, item, issued)
        finally:
            # Even when cancelled: the waiters should not sit out the whole lease.
            with anyio.CancelScope(shield=True), suppress(_Down):
                await self._call(lambda: state.release(keys=[newest.lease], args=[lease]))
                await self._call(lambda: state.client.publish(self._channel, "g" + newest.item))
        return issued

    async def _store(
        self,
        state: _LoopState,
        names: _Names,
        generation: int | None,
        item: Item,
        issued: Issued,
    ) -> None:
        ttl = min(issued.ends_at, item.subject_ends_at) - _clock.now()
        if ttl < _MIN_TTL or generation is None:
            return
        grant = issued.grant
        plain = json.dumps(
            {
                "g": generation,
                "a": grant.access_token,
                "t": grant.token_type,
                "x": grant.expires_at,
                "s": grant.scope,
                "r": grant.resource,
                "i": grant.issued_token_type,
                "e": issued.ends_at,
                "l": issued.lifetime,
            }
        ).encode()
        sealed = self._keyring.seal(plain, names.grant.encode())
        with suppress(_Down):
            await self._call(lambda: state.client.set(names.grant, sealed, px=int(ttl * 1000)))
            self._counts["write"] += 1

    async def _announced(self, state: _LoopState, item: str, wait: float) -> None:
        """Wait until the holder announces ``item``'s grant, or ``wait`` seconds pass."""
        event = state.landed.get(item)
        if event is None:
            if len(state.landed) >= 10_000:  # left by holders that died: waiters also poll
                state.landed.clear()
            event = state.landed[item] = asyncio.Event()
        with anyio.move_on_after(wait):
            await event.wait()

    # The subscription: announcements of grants, invalidations from other processes.

    async def _listen(self, state: _LoopState) -> None:
        backoff = _LISTEN_FIRST
        while True:
            pubsub = None
            try:
                if isinstance(state.client, RedisCluster):
                    # Its pub/sub picks a node from the slot map, which only this loads.
                    await state.client.initialize()
                pubsub = state.client.pubsub()
                await pubsub.subscribe(self._channel)
                _raise_if_cancelled()
                async for message in pubsub.listen():
                    if self._received(state, message):
                        backoff = _LISTEN_FIRST
            except Exception as exc:  # the connection broke: subscribe again, with a backoff
                _raise_if_cancelled()
                # Warned about, but the breaker's state is the requests' to decide: counting
                # these would push its probes out while Redis is away.
                self._breaker.noted(_cause(exc))
            finally:
                if pubsub is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                        await pubsub.aclose()
            await anyio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311 - jitter
            backoff = min(backoff * 2, _LISTEN_MAX)

    def _received(self, state: _LoopState, message: Any) -> bool:
        """Act on one pub/sub message; True when it confirms a (re)subscription."""
        kind, data = message.get("type"), message.get("data")
        if kind == "subscribe":
            # Announcements may have been missed while unsubscribed: nothing cached before now
            # can be trusted not to have been invalidated.
            for listener in self._listeners:
                listener.flush()
            self._breaker.succeeded()  # Redis answers again: no need to wait for a probe
            return True
        if kind != "message" or not isinstance(data, bytes) or len(data) > _MAX_MESSAGE:
            return False
        text = data.decode("ascii", "replace")
        if text.startswith("g"):
            event = state.landed.pop(text[1:], None)
            if event is not None:
                event.set()
        elif text.startswith("i"):
            tags = set(text[1:].split(","))
            for listener in self._listeners:
                listener.invalidated(partial(self._tagged, tags, listener.issuer))
        return False

    def _tagged(self, tags: set[str], issuer: str, subject: str) -> bool:
        return not tags.isdisjoint(self._subject_tags(issuer, subject))


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py lost: on Python 3.11 its ``asyncio.wait_for``
    returns a result, or raises a connection error, when the cancellation lands as a write
    completes; the task still counts it as pending."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _get(client: Any, keys: list[str]) -> list[Any]:
    """GET every key, in one round trip (a cluster pipeline sends one per node)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    answers: list[Any] = await pipe.execute()
    if len(answers) != len(keys):
        raise InvalidResponse("a pipeline answered the wrong number of replies")
    return answers


async def _generations_and_grants(client: Any, names: list[_Names]) -> list[tuple[Any, Any]]:
    """Each key's (generation, sealed grant): concurrent MGETs, one per hash tag."""
    if len(names) == 1:  # one key, as between rotations: no task for gather to make
        answers = [await client.mget(names[0].generation, names[0].grant)]
    else:
        answers = await asyncio.gather(*(client.mget(one.generation, one.grant) for one in names))
    if not all(isinstance(answer, list) and len(answer) == 2 for answer in answers):
        raise InvalidResponse("MGET answered the wrong number of values")
    return [(answer[0], answer[1]) for answer in answers]


async def _bump(client: Any, generations: list[str]) -> None:
    """Give each subject a new generation: a random one, not an increment, so that whatever
    the key held before (garbage included) is replaced, with no read."""
    pipe = client.pipeline(transaction=False)
    for generation in generations:
        pipe.set(generation, secrets.randbelow(10**18), px=_GENERATION_TTL_MS)
    await pipe.execute()


def _number(value: float, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a number")
    if not low <= value <= high:
        raise ConfigurationError(f"{what} must be between {low:g} and {high:g}")
    return float(value)


def _where(parsed: Mapping[str, Any]) -> str:
    """Where a URL points, for messages: never its credentials."""
    if "path" in parsed:
        return f"unix:{parsed['path']}"
    return f"{parsed.get('host', 'localhost')}:{parsed.get('port', 6379)}/{parsed.get('db', 0)}"


def _cause(exc: BaseException) -> str:
    """A failure's kind, for counters and warnings: never its text, which may quote data."""
    # redis-py turns the OOM error code into this class (the text no longer starts with it).
    if isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("OOM")
    ):
        return "out_of_memory"
    if isinstance(exc, ReadOnlyError):
        return "read_only"
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    if isinstance(exc, InvalidResponse | DataError | ValueError | TypeError):
        return "garbled_answer"
    if isinstance(exc, RedisError):
        return "error"
    return type(exc).__name__


def _generation(raw: object) -> int | None:
    if raw is None:
        return 0
    if isinstance(raw, bytes) and raw.isdigit() and len(raw) < 20:
        return int(raw)
    return None


def _decoded(plain: bytes) -> tuple[Issued, int] | None:
    """A stored grant and the generation it was written under; None unless well-formed."""
    try:
        value = json.loads(plain)
        grant = Grant(
            access_token=value["a"],
            token_type=value["t"],
            expires_at=value["x"],
            scope=value["s"],
            resource=value["r"],
            issued_token_type=value["i"],
        )
        issued = Issued(grant, float(value["e"]), float(value["l"]))
        generation = value["g"]
    except (ValueError, KeyError, TypeError):
        return None
    fields_ok = (
        isinstance(grant.access_token, str)
        and isinstance(grant.token_type, str)
        and isinstance(grant.resource, str)
        and (grant.scope is None or isinstance(grant.scope, str))
        and (grant.issued_token_type is None or isinstance(grant.issued_token_type, str))
        and (grant.expires_at is None or isinstance(grant.expires_at, int | float))
        and isinstance(generation, int)
        and math.isfinite(issued.ends_at)
        and math.isfinite(issued.lifetime)
    )
    return (issued, generation) if fields_ok else None
