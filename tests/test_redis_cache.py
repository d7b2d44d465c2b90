"""RedisGrantCache in process, against real redis-server processes on loopback ports.

Several middleware instances in one process, each with a RedisGrantCache of its own, stand for
several processes (or replicas after a restart): they share nothing but the Redis server.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import OutOfMemoryError

from asgi_delegation import (
    ConfigurationError,
    DelegationMiddleware,
    SharedCacheUnavailable,
)
from asgi_delegation._sealing import Keyring
from asgi_delegation.redis import RedisGrantCache
from asgi_delegation.testing import LocalAuthorizationServer

from ._redis import RedisServer, free_port, redis_server, require_redis
from .conftest import (
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    Clock,
    Gateway,
    exchanger_of,
)

SHARED_COUNTERS = ("hit", "miss", "write", "waited", "invalidated", "unreadable")
KEY_NAME = re.compile(rb"\{asgi-delegation:[A-Za-z0-9_-]{22}\}:([gl]:[A-Za-z0-9_-]{22}|v)")
WARNING_CAUSE = re.compile(r"failed \((\w+)\)")
PASSWORD = "pw-Kq7#Zr2"  # percent-encoded in URLs below
ACL_PASSWORD = "acl-pw-7Hq2vX"
WRONG_PASSWORD = "wrong-pw-9Zt4mB"


def program(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, name
    return path


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def mint(auth: LocalAuthorizationServer, subject: str, **options: Any) -> str:
    return auth.mint(subject, audience=RESOURCE, scope="read write", **options)


# -- The application behind every middleware -----------------------------------------------


class Upstream:
    """An upstream API that refuses (401) the first grant it is shown, and accepts the rest."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.seen: list[str | None] = []  # the jti of each grant shown, in order

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        header = dict(scope["headers"]).get(b"authorization", b"")
        claims = self.auth.verify(header.decode().removeprefix("Bearer ")) or {}
        self.seen.append(claims.get("jti"))
        status = 401 if len(self.seen) == 1 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class App:
    """``GET /exchange?resource=R&scope=S``: the grant's claims (sub, aud, jti), its scope and
    resource; ``GET /upstream?resource=R``: the status ``upstream`` answered a request sent with
    ``ctx.auth(R)``. Every grant token handed out is kept in ``tokens`` (never shown)."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.tokens: list[str] = []
        self.upstream: Upstream | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        ctx = scope["state"]["access_context"]
        params = dict(parse_qsl(scope["query_string"].decode()))
        resource, wanted = params["resource"], params.get("scope")
        document: dict[str, Any]
        if scope["path"] == "/upstream":
            assert self.upstream is not None
            transport = httpx.ASGITransport(app=self.upstream)
            async with httpx.AsyncClient(transport=transport, base_url=resource) as client:
                answer = await client.get("/me", auth=ctx.auth(resource, scope=wanted))
            document = {"status": answer.status_code}
        else:
            grant = await ctx.exchange(resource, scope=wanted)
            self.tokens.append(grant.access_token)
            claims = self.auth.verify(grant.access_token) or {}
            document = {
                "sub": claims.get("sub"),
                "aud": claims.get("aud"),
                "jti": claims.get("jti"),
                "scope": grant.scope,
                "resource": grant.resource,
            }
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(document).encode()})


async def obtain(
    gateway: Gateway, token: str, resource: str = GITHUB, scope: str | None = None
) -> dict[str, Any]:
    params = {"resource": resource, **({"scope": scope} if scope else {})}
    response = await gateway.get(token, path="/exchange", params=params)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


# -- Counters -------------------------------------------------------------------------------


def calls(auth: LocalAuthorizationServer) -> int:
    """Requests the token endpoint got."""
    return auth.requests["/token"]


def counters(gateway: Gateway) -> dict[str, int]:
    caches = gateway.middleware.stats()["caches"]
    return {
        **{f"grants.{k}": v for k, v in caches["grants"].items()},
        **{f"shared.{k}": caches["shared"][k] for k in SHARED_COUNTERS},
    }


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def breaker(gateway: Gateway | DelegationMiddleware) -> dict[str, Any]:
    middleware = gateway.middleware if isinstance(gateway, Gateway) else gateway
    state: dict[str, Any] = middleware.stats()["caches"]["shared"]["breaker"]
    return state


def failures(gateway: Gateway | DelegationMiddleware) -> dict[str, int]:
    """The breaker's failure counts, by cause."""
    return {k: v for k, v in breaker(gateway).items() if k not in ("open", "opened", "skipped")}


def local_key(token: str, resource: str = GITHUB, scope: str | None = None) -> Any:
    """The in-process cache's key of a grant: (subject token digest, resource, scope)."""
    return (hashlib.sha256(token.encode()).digest(), resource, scope)


def local_grants(gateway: Gateway) -> Any:
    return exchanger_of(gateway.middleware)._grants


async def eventually(condition: Callable[[], bool], within: float) -> bool:
    """Whether ``condition`` holds within ``within`` seconds of real time. Only for effects that
    no event announces (another client's pub/sub delivery, a subscription's confirmation)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.002)
    return True


_warm_ups = iter(range(1_000_000))


def moved_on(grants: Any, epoch: int) -> bool:
    return bool(grants.epoch > epoch)


async def listening(auth: LocalAuthorizationServer, *gateways: Gateway) -> None:
    """Make each gateway's cache subscribe, and wait until the subscription is confirmed.

    The confirmation flushes the in-process cache (invalidations may have been missed before
    it), which would otherwise drop, at a moment no test controls, a grant cached just before.
    A warm-up exchange (a subject of its own, so that it never shares anything) starts the
    subscription; nothing announces its confirmation but the flush, which moves the in-process
    cache's epoch: hence a bounded poll."""
    for gateway in gateways:
        grants = local_grants(gateway)
        epoch = grants.epoch
        await obtain(gateway, mint(auth, f"warm-up-{next(_warm_ups)}"), SLACK)
        assert await eventually(partial(moved_on, grants, epoch), within=10)


# -- Fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that never stop it (each starts with it empty)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as started:
        yield started


@pytest.fixture
def url(server: RedisServer) -> str:
    server.cli("flushall")
    return server.url


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start. Request it before
    ``make``, so that it is stopped only after the middlewares are closed."""
    with redis_server(tmp_path / "own-redis") as started:
        yield started


@pytest.fixture
async def raw(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    yield client
    await client.aclose()


@asynccontextmanager
async def raw_client(where: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(where)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def keys() -> list[str]:
    return [new_key(), new_key()]


@pytest.fixture
def app(auth: LocalAuthorizationServer) -> App:
    return App(auth)


Make = Callable[..., Gateway]


@pytest.fixture
def make(gateway_factory: Callable[..., Gateway], app: App, keys: list[str]) -> Make:
    """``make(url_or_client, keys=..., middleware={...}, **cache_options)``: a middleware (one
    "process") with a RedisGrantCache of its own, in front of ``app``."""

    def make_gateway(
        target: Any,
        *,
        keys: Sequence[bytes | str] | None = None,
        middleware: dict[str, Any] | None = None,
        **options: Any,
    ) -> Gateway:
        options.setdefault("timeout", 2.0)  # generous: a loaded machine must not flake
        cache = RedisGrantCache(target, encryption_keys=keys or default_keys[:1], **options)
        return gateway_factory(app=app, shared_cache=cache, **(middleware or {}))

    default_keys = keys
    return make_gateway


async def grant_names(client: aioredis.Redis) -> set[bytes]:
    return {key async for key in client.scan_iter(match="*:g:*", count=1000)}


async def value_of(client: aioredis.Redis, key: bytes) -> bytes | None:
    value = await client.get(key)
    assert value is None or isinstance(value, bytes)
    return value


async def dump(client: aioredis.Redis) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    async for key in client.scan_iter(count=1000):
        value = await client.get(key)
        if isinstance(value, bytes):
            found[key] = value
    return found


# -- 1. Configuration -----------------------------------------------------------------------

VALID = base64.urlsafe_b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    "encryption_keys",
    [
        pytest.param([b"k" * 31], id="31 bytes"),
        pytest.param([b"k" * 33], id="33 bytes"),
        pytest.param([b""], id="empty bytes"),
        pytest.param([base64.urlsafe_b64encode(b"k" * 31).decode()], id="31 bytes base64url"),
        pytest.param([base64.urlsafe_b64encode(b"k" * 48).decode()], id="48 bytes base64url"),
        pytest.param([VALID[:-2] + "!!"], id="not base64"),
        pytest.param([base64.b64encode(b"\xfb\xff" * 16).decode()], id="standard base64 +/"),
        pytest.param([VALID + " x"], id="trailing garbage"),
        pytest.param([""], id="empty text"),
        pytest.param([], id="no key"),
        pytest.param(VALID, id="a bare string"),
        pytest.param(b"k" * 32, id="bare bytes"),
        pytest.param([b"k" * 32, VALID], id="the same key twice"),
        pytest.param([32], id="a number"),
        pytest.param([None], id="None"),
    ],
)
def test_unusable_encryption_keys_are_refused(encryption_keys: Any) -> None:
    with pytest.raises(ConfigurationError):
        RedisGrantCache("redis://127.0.0.1:1/0", encryption_keys=encryption_keys)


@pytest.mark.parametrize(
    "namespace", ["", "a{b", "a}b", "{ab}", "a b", "x" * 65, "tab\there", "nl\n", 42, None]
)
def test_unusable_namespaces_are_refused(namespace: Any) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        RedisGrantCache("redis://127.0.0.1:1/0", encryption_keys=[VALID], namespace=namespace)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lease_timeout", 0.5),
        ("lease_timeout", 301),
        ("lease_timeout", 0),
        ("lease_timeout", -5),
        ("lease_timeout", float("nan")),
        ("lease_timeout", float("inf")),
        ("lease_timeout", "12"),
        ("lease_timeout", True),
        ("lease_timeout", None),
        ("timeout", 0.001),
        ("timeout", 5.5),
        ("timeout", -1),
        ("timeout", float("nan")),
        ("timeout", "0.25"),
        ("timeout", False),
        ("timeout", [1]),
    ],
)
def test_out_of_range_timeouts_are_refused(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name):
        RedisGrantCache("redis://127.0.0.1:1/0", encryption_keys=[VALID], **{name: value})


def test_bounds_and_good_values_are_accepted() -> None:
    for options in (
        {"lease_timeout": 1, "timeout": 0.01},
        {"lease_timeout": 300.0, "timeout": 5},
        {"namespace": "x" * 64},
        {"namespace": "my-app:v2"},
    ):
        RedisGrantCache("redis://127.0.0.1:1/0", encryption_keys=[VALID], **options)


@pytest.mark.parametrize(
    "target",
    [
        "not a url",
        "localhost:6379",
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?db=zero",
        42,
        None,
        object(),
        b"redis://127.0.0.1:6379/0",
    ],
)
def test_unusable_targets_are_refused(target: Any) -> None:
    with pytest.raises(ConfigurationError):
        RedisGrantCache(target, encryption_keys=[VALID])


async def test_a_sync_or_decoding_client_is_refused() -> None:
    sync_client = redis.Redis(port=1)
    decoding = aioredis.Redis(port=1, decode_responses=True)
    try:
        with pytest.raises(ConfigurationError):
            RedisGrantCache(sync_client, encryption_keys=[VALID])  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="decode_responses"):
            RedisGrantCache(decoding, encryption_keys=[VALID])
    finally:
        sync_client.close()
        await decoding.aclose()


@pytest.mark.parametrize(
    "url",
    [
        f"http://app:{quote(PASSWORD)}@127.0.0.1:6379/0",
        f"redis://app:{quote(PASSWORD)}@127.0.0.1:port/0",
        f"redis://app:{quote(PASSWORD)}@127.0.0.1:6379/0?db=x",
    ],
)
def test_a_refused_url_is_never_quoted(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RedisGrantCache(url, encryption_keys=[VALID])
    assert PASSWORD not in str(caught.value)
    assert quote(PASSWORD) not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__  # the parser's error (quoting it) is not shown


def test_shared_cache_must_be_a_cache(auth: LocalAuthorizationServer, app: App) -> None:
    for wrong in ("redis://127.0.0.1:6379/0", object(), 42, {"url": "redis://x"}):
        with pytest.raises(ConfigurationError, match="shared_cache"):
            DelegationMiddleware(
                app,
                issuer=auth.issuer,
                resource=RESOURCE,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                shared_cache=wrong,  # type: ignore[arg-type]
            )


async def test_keys_as_bytes_or_base64url_with_or_without_padding_are_one_key(
    url: str, make: Make, auth: LocalAuthorizationServer
) -> None:
    raw_key = os.urandom(32)
    padded = base64.urlsafe_b64encode(raw_key).decode()
    assert padded.endswith("=")
    alice = mint(auth, "alice")
    written = await obtain(make(url, keys=[raw_key]), alice)
    assert calls(auth) == 1
    for same in (padded, padded.rstrip("="), bytearray(raw_key), f" {padded}\n"):
        reader = make(url, keys=[same])
        assert await obtain(reader, alice) == written
        assert reader.middleware.stats()["caches"]["grants"]["shared"] == 1
    assert calls(auth) == 1


def _canonical_key(text: str) -> bool:
    """Whether ``text`` (stripped, padding dropped) is the base64url form of 32 bytes."""
    body = text.strip().rstrip("=")
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", body):
        return False
    raw_key = base64.urlsafe_b64decode(body + "=")
    return base64.urlsafe_b64encode(raw_key).decode().rstrip("=") == body


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.text(max_size=80),
        st.text(alphabet=_B64URL + "=+/ .", min_size=40, max_size=48),
        st.binary(min_size=32, max_size=32).map(
            lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")
        ),
    )
)
def test_a_key_is_accepted_only_as_32_bytes(key: bytes | str) -> None:
    try:
        RedisGrantCache("redis://127.0.0.1:1/0", encryption_keys=[key])
    except ConfigurationError:
        accepted = False
    else:
        accepted = True
    if isinstance(key, bytes):
        assert accepted == (len(key) == 32)
    elif accepted:
        assert _canonical_key(key)
    else:
        body = key.strip().rstrip("=")
        assert not (_canonical_key(key) and key.strip() in (body, body + "="))


async def test_construction_does_no_io_and_never_shows_the_password(
    gateway_factory: Callable[..., Gateway],
    app: App,
    auth: LocalAuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_delegation.redis")
    with socket.socket() as listener:  # listens, but never accepts: no connection may come
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        where = f"redis://app:{quote(PASSWORD)}@127.0.0.1:{port}/0"
        cache = RedisGrantCache(where, encryption_keys=[VALID])
        gateway_factory(app=app, shared_cache=cache)
        with pytest.raises(BlockingIOError):
            listener.accept()
    for text in (repr(cache), str(cache)):
        assert PASSWORD not in text
        assert quote(PASSWORD) not in text
        assert "app" not in text
        assert f"127.0.0.1:{port}/0" in text
    # Now unreachable (nothing listens any more): requests succeed, the warnings hide it.
    gateway = gateway_factory(app=app, shared_cache=RedisGrantCache(where, encryption_keys=[VALID]))
    alice = mint(auth, "alice")
    for resource in (GITHUB, GOOGLE, SLACK):
        assert (await obtain(gateway, alice, resource))["aud"] == resource
    with pytest.raises(SharedCacheUnavailable) as caught:
        await gateway.middleware.invalidate_grants("alice")
    records = [r for r in caplog.records if r.name == "asgi_delegation.redis"]
    assert records  # it did warn
    texts = [str(caught.value), json.dumps(gateway.middleware.stats())]
    texts += [r.getMessage() for r in records] + [repr(r.args) for r in records]
    assert not [t for t in texts if PASSWORD in t or quote(PASSWORD) in t]


def test_importing_without_redis_py_names_the_extra() -> None:
    code = """
import sys

class NoRedis:
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRedis())
import asgi_delegation  # the package itself needs no redis-py
from asgi_delegation import ConfigurationError
try:
    import asgi_delegation.redis
except ConfigurationError as exc:
    print("ConfigurationError:", exc)
else:
    print("imported")
"""
    done = subprocess.run(  # noqa: S603 - our interpreter, fixed code
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ConfigurationError:")
    assert "asgi-delegation[redis]" in done.stdout


# -- 3. Tiers -------------------------------------------------------------------------------


async def test_a_second_process_is_served_from_redis_then_from_memory(
    own_server: RedisServer, make: Make, auth: LocalAuthorizationServer
) -> None:
    first, second = make(own_server.url), make(own_server.url)
    await listening(auth, first, second)
    alice = mint(auth, "alice")
    base, before_first, before_second = calls(auth), counters(first), counters(second)

    got = await obtain(first, alice)
    assert (got["sub"], got["aud"], got["resource"]) == ("alice", GITHUB, GITHUB)
    assert calls(auth) == base + 1
    assert moved(before_first, counters(first)) == {
        "grants.miss": 1,
        "shared.miss": 1,
        "shared.write": 1,
    }

    # A fresh process (as after a restart): Redis has it, the token endpoint is not asked.
    assert await obtain(second, alice) == got
    assert calls(auth) == base + 1
    after_shared = counters(second)
    assert moved(before_second, after_shared) == {"grants.shared": 1, "shared.hit": 1}
    assert second.middleware.stats()["caches"]["grants"]["shared"] == 1

    # Then from memory: no Redis round trip, so it works with Redis gone.
    own_server.stop()
    for _ in range(3):
        assert await obtain(second, alice) == got
    assert calls(auth) == base + 1
    assert moved(after_shared, counters(second)) == {"grants.hit": 3}


async def test_users_resources_scopes_and_clients_never_share_a_grant(
    url: str, make: Make, auth: LocalAuthorizationServer
) -> None:
    alice, bob = mint(auth, "alice"), mint(auth, "bob")
    alice_again = mint(auth, "alice")  # another token of the same user
    wanted = [
        (alice, "alice", GITHUB, None),
        (alice, "alice", GOOGLE, None),
        (alice, "alice", GITHUB, "repo:read"),
        (alice, "alice", GITHUB, "repo:read repo:write"),
        (bob, "bob", GITHUB, None),
        (bob, "bob", GITHUB, "repo:read"),
        (alice_again, "alice", GITHUB, None),
    ]
    first, second = make(url), make(url)
    originals = [await obtain(first, token, resource, sc) for token, _, resource, sc in wanted]
    assert calls(auth) == len(wanted)
    assert len({got["jti"] for got in originals}) == len(wanted)
    for (_, subject, resource, sc), got in zip(wanted, originals, strict=True):
        assert (got["sub"], got["aud"], got["scope"]) == (subject, resource, sc)

    shared = [await obtain(second, token, resource, sc) for token, _, resource, sc in wanted]
    assert shared == originals
    assert calls(auth) == len(wanted)
    assert second.middleware.stats()["caches"]["grants"]["shared"] == len(wanted)

    # Another client (another application on the same Redis and keys) sees none of them.
    auth.register_client("other-client", secret="other-secret")
    other = make(url, middleware={"client_id": "other-client", "client_secret": "other-secret"})
    again = await obtain(other, alice)
    assert calls(auth) == len(wanted) + 1
    assert (again["sub"], again["aud"]) == ("alice", GITHUB)
    assert again["jti"] != originals[0]["jti"]
    assert other.middleware.stats()["caches"]["grants"]["shared"] == 0


# -- 4. Lifetimes in Redis ------------------------------------------------------------------


async def test_a_grant_lives_in_redis_as_long_as_it_and_its_subject_token(
    url: str, make: Make, auth: LocalAuthorizationServer, raw: aioredis.Redis
) -> None:
    gateway = make(url)
    auth.exchange_expires_in = 120
    await obtain(gateway, mint(auth, "alice"))
    [name] = await grant_names(raw)
    assert 100_000 < await raw.pttl(name) <= 120_000

    # The subject token ends first: so does the entry.
    await obtain(gateway, mint(auth, "bob", expires_in=30))
    [short] = await grant_names(raw) - {name}
    assert 25_000 < await raw.pttl(short) <= 30_000

    written = gateway.middleware.stats()["caches"]["shared"]["write"]
    assert written == 2
    # Under a second to live, whichever ends it: not written (but handed out).
    auth.exchange_expires_in = 0.5
    got = await obtain(gateway, mint(auth, "carol"))
    assert got["resource"] == GITHUB  # (the grant itself may be expired already: not checked)
    auth.exchange_expires_in = 120
    got = await obtain(gateway, mint(auth, "dave", claims={"exp": time.time() + 0.9}))
    assert got["sub"] == "dave"
    assert calls(auth) == 4
    assert await grant_names(raw) == {name, short}
    assert gateway.middleware.stats()["caches"]["shared"]["write"] == written


# -- 5. Nothing readable at rest ------------------------------------------------------------


async def test_nothing_readable_in_redis(
    url: str, make: Make, auth: LocalAuthorizationServer, app: App, raw: aioredis.Redis
) -> None:
    watcher = raw.pubsub()
    await watcher.subscribe("asgi-delegation:events")
    tokens = {subject: mint(auth, subject) for subject in ("alice-xq", "bob-zr")}
    wanted = [(GITHUB, None), (GOOGLE, "calendar.readonly"), (SLACK, "files:write chat:post")]
    gateway = make(url)
    for token in tokens.values():
        for resource, sc in wanted:
            await obtain(gateway, token, resource, sc)
    # A lease, seen while its exchange is under way.
    tokens["carol-wp"] = mint(auth, "carol-wp")
    auth.token_latency = 0.3
    async with anyio.create_task_group() as group:
        group.start_soon(obtain, gateway, tokens["carol-wp"], GITHUB, "calendar.readonly")
        leases: list[bytes] = []
        with anyio.fail_after(5):  # the token endpoint answers after 0.3 s: the lease is held
            while not leases:
                leases = [key async for key in raw.scan_iter(match="*:l:*")]
        lease_values = [await value_of(raw, key) for key in leases]
    auth.token_latency = 0
    await gateway.middleware.invalidate_grants("alice-xq")  # a generation key
    everything = await dump(raw)
    assert leases
    assert all(lease_values)
    assert {key.split(b"}:")[1][:1] for key in everything} == {b"g", b"v"}
    assert all(KEY_NAME.fullmatch(key) for key in [*everything, *leases])

    messages: list[bytes] = []
    with anyio.fail_after(5):  # the invalidation is the last one published
        while not (messages and messages[-1].startswith(b"i")):
            message = await watcher.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                messages.append(message["data"])
    await watcher.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
    assert len(messages) >= 7  # one announcement per grant written, then the invalidation

    needles: dict[str, bytes] = {
        "client id": CLIENT_ID.encode(),
        "client secret": CLIENT_SECRET.encode(),
        "issuer": auth.issuer.encode(),
        "issuer host": b"127.0.0.1",
    }
    for subject, token in tokens.items():
        needles[f"subject {subject}"] = subject.encode()
        needles[f"subject token of {subject}"] = token.encode()
        needles[f"subject token body of {subject}"] = token.split(".")[1].encode()
    for resource, sc in wanted:
        needles[f"resource {resource}"] = resource.encode()
        needles[f"host of {resource}"] = resource.split("//")[1].split("/")[0].encode()
        for word in (sc or "").split():
            needles[f"scope {word}"] = word.encode()
    assert len(app.tokens) == 7
    for index, grant in enumerate(app.tokens):
        needles[f"grant token {index}"] = grant.encode()
        needles[f"grant token body {index}"] = grant.split(".")[1].encode()
    blobs = [*everything, *everything.values(), *leases, *messages]
    blobs += [value for value in lease_values if value is not None]
    leaks = [what for what, needle in needles.items() if any(needle in b for b in blobs)]
    assert leaks == []


async def test_every_key_starts_with_the_namespace(
    url: str, make: Make, auth: LocalAuthorizationServer, raw: aioredis.Redis
) -> None:
    gateway = make(url, namespace="my-app:v2")
    await obtain(gateway, mint(auth, "alice"))
    await gateway.middleware.invalidate_grants("alice")
    found = await dump(raw)
    assert len(found) == 2
    name = re.compile(rb"\{my-app:v2:[A-Za-z0-9_-]{22}\}:(g:[A-Za-z0-9_-]{22}|v)")
    assert all(name.fullmatch(key) for key in found)
    # And another namespace on the same Redis shares nothing with it.
    other = make(url)
    await obtain(other, mint(auth, "alice"))
    assert calls(auth) == 2


# -- 6. Tampering ---------------------------------------------------------------------------


async def test_a_value_under_another_name_does_not_open(
    url: str, make: Make, auth: LocalAuthorizationServer, raw: aioredis.Redis
) -> None:
    alice = mint(auth, "alice")
    writer = make(url)
    github = await obtain(writer, alice, GITHUB)
    [github_name] = await grant_names(raw)
    google = await obtain(writer, alice, GOOGLE)
    [google_name] = await grant_names(raw) - {github_name}
    google_value = await value_of(raw, google_name)
    assert google_value is not None
    await raw.set(github_name, google_value)  # a copy: both names hold Google's grant

    reader = make(url)
    base = calls(auth)
    again = await obtain(reader, alice, GITHUB)
    assert (again["aud"], calls(auth)) == (GITHUB, base + 1)
    assert again["jti"] not in (github["jti"], google["jti"])
    shared = reader.middleware.stats()["caches"]["shared"]
    assert (shared["unreadable"], shared["miss"], shared["write"]) == (1, 1, 1)
    assert await raw.get(github_name) not in (None, google_value)  # overwritten
    assert await obtain(reader, alice, GOOGLE) == google  # the original still opens
    assert calls(auth) == base + 1

    # Moved (RENAME) rather than copied: the same.
    await raw.rename(google_name, github_name)
    third = make(url)
    moved_one = await obtain(third, alice, GITHUB)
    assert (moved_one["aud"], calls(auth)) == (GITHUB, base + 2)
    assert third.middleware.stats()["caches"]["shared"]["unreadable"] == 1


def _forged(kind: str, value: bytes, name: bytes, keys: list[str]) -> bytes:
    ring = Keyring(keys[:1])
    plain = ring.open(0, value, name)
    assert plain is not None
    fields = json.loads(plain)
    if kind == "flipped bit":
        return value[:-1] + bytes([value[-1] ^ 1])
    if kind == "flipped nonce":
        return value[:1] + bytes([value[1] ^ 0x80]) + value[2:]
    if kind == "truncated":
        return value[: len(value) // 2]
    if kind == "one byte short":
        return value[:-1]
    if kind == "one byte more":
        return value + b"\0"
    if kind == "empty":
        return b""
    if kind == "random":
        return os.urandom(len(value))
    if kind == "other version":
        return b"\x02" + value[1:]
    if kind == "other key":
        return Keyring(keys[1:2]).seal(plain, name)
    sealed: dict[str, bytes] = {
        "not json": b"\xff{not json",
        "not an object": b"[1, 2, 3]",
        "missing field": json.dumps({k: v for k, v in fields.items() if k != "a"}).encode(),
        "wrong type": json.dumps({**fields, "a": 42}).encode(),
        "wrong generation": json.dumps({**fields, "g": "0"}).encode(),
        "infinite end": json.dumps({**fields, "e": float("inf")}).encode(),
    }
    return ring.seal(sealed[kind], name)


@pytest.mark.parametrize(
    "kind",
    [
        "flipped bit",
        "flipped nonce",
        "truncated",
        "one byte short",
        "one byte more",
        "empty",
        "random",
        "other version",
        "other key",
        "not json",
        "not an object",
        "missing field",
        "wrong type",
        "wrong generation",
        "infinite end",
    ],
)
async def test_unreadable_values_are_misses_and_overwritten(
    kind: str,
    url: str,
    make: Make,
    auth: LocalAuthorizationServer,
    raw: aioredis.Redis,
    keys: list[str],
) -> None:
    alice = mint(auth, "alice")
    original = await obtain(make(url), alice)
    [name] = await grant_names(raw)
    value = await value_of(raw, name)
    assert value is not None
    forged = _forged(kind, value, name, keys)
    await raw.set(name, forged, keepttl=True)

    reader = make(url)
    again = await obtain(reader, alice)  # a miss, never a 500
    assert (again["sub"], again["aud"], calls(auth)) == ("alice", GITHUB, 2)
    assert again["jti"] != original["jti"]
    assert {k: reader.middleware.stats()["caches"]["shared"][k] for k in SHARED_COUNTERS} == {
        "hit": 0,
        "miss": 1,
        "write": 1,
        "waited": 0,
        "invalidated": 0,
        "unreadable": 1,
    }
    assert await raw.get(name) not in (forged, value)
    assert await obtain(make(url), alice) == again  # what replaced it opens
    assert calls(auth) == 2


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=st.binary(max_size=400))
async def test_any_bytes_stored_are_a_miss(
    url: str,
    auth: LocalAuthorizationServer,
    token: str,
    app: App,
    raw: aioredis.Redis,
    keys: list[str],
    value: bytes,
) -> None:
    alice = token  # one subject token for every example: they all use the same entry
    names = await grant_names(raw)
    if not names:  # the first example: write the entry
        async with gateway_of(url, auth, app, keys) as writer:
            await obtain(writer, alice)
        names = await grant_names(raw)
    [name] = names
    await raw.set(name, value)
    async with gateway_of(url, auth, app, keys) as reader:
        base = calls(auth)
        got = await obtain(reader, alice)
        assert (got["sub"], calls(auth)) == ("alice", base + 1)
        shared = reader.middleware.stats()["caches"]["shared"]
        assert (shared["unreadable"], shared["hit"], shared["write"]) == (1, 0, 1)
    assert await grant_names(raw) == {name}  # overwritten, for the next example


@asynccontextmanager
async def gateway_of(
    url: str, auth: LocalAuthorizationServer, app: App, keys: list[str]
) -> AsyncIterator[Gateway]:
    """A middleware with a RedisGrantCache, closed at the end (for property tests, whose
    examples must not pile up open middlewares until the fixture's teardown)."""
    http = auth.http_client()
    middleware = DelegationMiddleware(
        app,
        issuer=auth.issuer,
        resource=RESOURCE,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        http_client=http,
        shared_cache=RedisGrantCache(url, encryption_keys=keys[:1], timeout=2.0),
    )
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        try:
            yield Gateway(middleware, client)
        finally:
            await middleware.aclose()
            await http.aclose()


async def test_a_garbage_generation_breaks_nothing(
    url: str, make: Make, auth: LocalAuthorizationServer, raw: aioredis.Redis
) -> None:
    alice = mint(auth, "alice")
    original = await obtain(make(url), alice)
    [name] = await grant_names(raw)
    generation = name.split(b":g:")[0] + b":v"
    for garbage in (b"abc", b"-1", b"1" * 25, b""):
        await raw.set(generation, garbage)
        reader = make(url)
        base, written = calls(auth), await raw.get(name)
        got = await obtain(reader, alice)  # unsure what is current: exchanges, writes nothing
        assert (got["sub"], calls(auth)) == ("alice", base + 1)
        assert got["jti"] != original["jti"]
        assert reader.middleware.stats()["caches"]["shared"]["write"] == 0
        assert await raw.get(name) == written
    # An invalidation replaces a garbage generation (nothing is read first) ...
    invalidating = make(url)
    await raw.set(generation, b"abc")
    await invalidating.middleware.invalidate_grants("alice")
    assert (await raw.get(generation) or b"").isdigit()
    # ... after which the cache works again, without the grants written before it.
    base = calls(auth)
    fresh = await obtain(make(url), alice)
    assert (fresh["sub"], calls(auth)) == ("alice", base + 1)
    assert fresh["jti"] != original["jti"]
    assert await obtain(make(url), alice) == fresh
    assert calls(auth) == base + 1


# -- 7. Key rotation ------------------------------------------------------------------------


async def test_key_rotation(
    url: str, make: Make, auth: LocalAuthorizationServer, keys: list[str]
) -> None:
    old, new = keys
    alice = mint(auth, "alice")
    written_with_old = await obtain(make(url, keys=[old]), alice, GITHUB)
    assert calls(auth) == 1

    rotating = make(url, keys=[new, old])
    assert await obtain(rotating, alice, GITHUB) == written_with_old  # old entries still open
    assert calls(auth) == 1
    written_with_new = await obtain(rotating, alice, GOOGLE)  # new entries use the new key
    assert calls(auth) == 2

    rotated = make(url, keys=[new])
    assert await obtain(rotated, alice, GOOGLE) == written_with_new
    assert calls(auth) == 2
    assert rotated.middleware.stats()["caches"]["grants"]["shared"] == 1

    behind = make(url, keys=[old])  # a process still on the old key alone
    mine = await obtain(behind, alice, GOOGLE)
    assert calls(auth) == 3
    assert mine["jti"] != written_with_new["jti"]
    shared = behind.middleware.stats()["caches"]["shared"]
    assert (shared["miss"], shared["hit"], shared["unreadable"]) == (1, 0, 0)


# -- 8. Invalidation ------------------------------------------------------------------------


async def test_invalidation_reaches_every_process(
    url: str, make: Make, auth: LocalAuthorizationServer
) -> None:
    first, second = make(url), make(url)
    await listening(auth, first, second)
    alice, bob = mint(auth, "alice"), mint(auth, "bob")
    old_alice, old_bob = await obtain(first, alice), await obtain(first, bob)
    assert await obtain(second, alice) == old_alice
    assert await obtain(second, bob) == old_bob
    in_second = local_grants(second)
    assert in_second.peek(local_key(alice)) is not None
    assert in_second.peek(local_key(bob)) is not None
    base = calls(auth)

    started = time.monotonic()
    await first.middleware.invalidate_grants("alice")
    assert local_grants(first).peek(local_key(alice)) is None  # at once, here
    # In another process: a pub/sub message delivered to another client, which no event of
    # this process announces, so a poll bounded by the promised half second.
    remaining = 0.5 - (time.monotonic() - started)
    assert await eventually(lambda: in_second.peek(local_key(alice)) is None, remaining)
    assert in_second.peek(local_key(bob)) is not None
    assert first.middleware.stats()["caches"]["shared"]["invalidated"] == 1

    new_alice = await obtain(first, alice)
    assert calls(auth) == base + 1
    assert new_alice["jti"] != old_alice["jti"]
    before = counters(second)
    assert await obtain(second, alice) == new_alice  # the new one, from Redis
    assert await obtain(second, bob) == old_bob  # bob's untouched, from memory
    assert moved(before, counters(second)) == {
        "grants.shared": 1,
        "grants.hit": 1,
        "shared.hit": 1,
    }
    fresh = make(url)
    assert await obtain(fresh, bob) == old_bob  # and in Redis
    assert calls(auth) == base + 1


async def test_invalidation_without_redis_still_drops_local_grants(
    own_server: RedisServer, make: Make, auth: LocalAuthorizationServer
) -> None:
    gateway = make(own_server.url, timeout=0.25)
    await listening(auth, gateway)
    bob = mint(auth, "bob")
    await obtain(gateway, bob)
    own_server.stop()
    with pytest.raises(SharedCacheUnavailable):
        await gateway.middleware.invalidate_grants("bob")
    assert local_grants(gateway).peek(local_key(bob)) is None
    base = calls(auth)
    assert (await obtain(gateway, bob))["sub"] == "bob"  # exchanged again, directly
    assert calls(auth) == base + 1


# -- 9. An upstream API refuses a grant -----------------------------------------------------


async def test_a_refused_grant_leaves_redis_too(
    url: str, make: Make, auth: LocalAuthorizationServer, app: App
) -> None:
    app.upstream = upstream = Upstream(auth)
    alice = mint(auth, "alice")
    first = make(url)
    response = await first.get(alice, path="/upstream", params={"resource": GITHUB})
    assert response.json() == {"status": 200}
    assert len(upstream.seen) == 2
    assert None not in upstream.seen
    refused, accepted = upstream.seen
    assert refused != accepted
    assert calls(auth) == 2
    second = make(url)
    got = await obtain(second, alice)
    assert got["jti"] == accepted
    assert calls(auth) == 2
    assert (await obtain(first, alice))["jti"] == accepted


# -- 10. Outages ----------------------------------------------------------------------------


async def test_redis_down_degrades_then_recovers(
    own_server: RedisServer,
    make: Make,
    auth: LocalAuthorizationServer,
    app: App,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_delegation.redis")
    gateway = make(own_server.url, timeout=0.25)
    await listening(auth, gateway)
    alice = mint(auth, "alice")
    users = [mint(auth, f"user{i}") for i in range(10)]
    cached = await obtain(gateway, alice)
    own_server.stop()
    base = calls(auth)
    before = counters(gateway)

    for _ in range(3):  # in memory: unaffected
        assert await obtain(gateway, alice) == cached
    assert calls(auth) == base
    assert moved(before, counters(gateway)) == {"grants.hit": 3}

    needed = 0  # requests that needed an exchange, until the breaker opened
    while not breaker(gateway)["open"]:
        assert needed < 5
        assert (await obtain(gateway, users[needed]))["sub"] == f"user{needed}"
        needed += 1
    assert calls(auth) == base + needed
    assert breaker(gateway)["opened"] == 1
    assert set(failures(gateway)) == {"connection"}

    opened = counters(gateway)
    skipped = breaker(gateway).get("skipped", 0)
    for index in range(needed, needed + 3):
        started = time.perf_counter()
        assert (await obtain(gateway, users[index]))["sub"] == f"user{index}"
        assert time.perf_counter() - started < 0.25  # not even the Redis timeout
    assert breaker(gateway).get("skipped") == skipped + 3
    assert calls(auth) == base + needed + 3
    assert moved(opened, counters(gateway)) == {"grants.miss": 3}  # Redis untouched

    # Back (empty) on the same port; past the longest probe interval, it is used again.
    own_server.start()
    clock.advance(31)
    index = needed + 3
    assert (await obtain(gateway, users[index]))["sub"] == f"user{index}"
    assert not breaker(gateway)["open"]
    assert moved(opened, counters(gateway)) == {
        "grants.miss": 4,
        "shared.miss": 1,
        "shared.write": 1,
    }
    async with raw_client(own_server.url) as client:
        assert len(await grant_names(client)) == 1

    records = [r for r in caplog.records if r.name == "asgi_delegation.redis"]
    causes = Counter(m.group(1) for r in records if (m := WARNING_CAUSE.search(r.getMessage())))
    assert causes == Counter({"connection": 1})  # once per cause per minute
    assert sum("reachable again" in r.getMessage() for r in records) == 1
    secrets = [alice, *users, *app.tokens, CLIENT_SECRET]
    texts = [r.getMessage() for r in records] + [repr(r.args) for r in records]
    assert not [t for t in texts if any(s in t for s in secrets)]


async def test_a_hung_redis_costs_the_timeout_only_until_the_breaker_opens(
    own_server: RedisServer, make: Make, auth: LocalAuthorizationServer, clock: Clock
) -> None:
    gateway = make(own_server.url, timeout=0.25)
    await listening(auth, gateway)
    users = [mint(auth, f"user{i}") for i in range(10)]
    assert own_server.process is not None
    pid = own_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    try:
        needed = 0
        while not breaker(gateway)["open"]:
            assert needed < 5
            started = time.perf_counter()
            assert (await obtain(gateway, users[needed]))["sub"] == f"user{needed}"
            assert time.perf_counter() - started >= 0.24  # waited for Redis, then went on
            needed += 1
        # Only the requests failed: the subscription just waits on its silent connection.
        assert failures(gateway) == {"timeout": needed}
        assert breaker(gateway)["opened"] == 1

        skipped = breaker(gateway).get("skipped", 0)
        for index in range(needed, needed + 3):
            started = time.perf_counter()
            assert (await obtain(gateway, users[index]))["sub"] == f"user{index}"
            assert time.perf_counter() - started < 0.2  # no Redis wait while open
        assert breaker(gateway).get("skipped") == skipped + 3
        assert failures(gateway) == {"timeout": needed}  # nothing more counted
    finally:
        os.kill(pid, signal.SIGCONT)
    clock.advance(1.1)  # past the first probe interval
    before = counters(gateway)
    index = needed + 3
    assert (await obtain(gateway, users[index]))["sub"] == f"user{index}"
    assert not breaker(gateway)["open"]
    assert moved(before, counters(gateway)) == {
        "grants.miss": 1,
        "shared.miss": 1,
        "shared.write": 1,
    }


async def test_an_open_breaker_counts_nothing_while_no_request_comes(
    own_server: RedisServer, make: Make, auth: LocalAuthorizationServer
) -> None:
    gateway = make(own_server.url, timeout=0.25)
    await listening(auth, gateway)
    own_server.stop()
    index = 0
    while not breaker(gateway)["open"]:
        assert index < 5
        await obtain(gateway, mint(auth, f"user{index}"))
        index += 1
    before = breaker(gateway)
    # Nothing to await: this checks that nothing happens (the subscription's reconnection
    # backoff is at most 2 s).
    await anyio.sleep(2.5)
    assert breaker(gateway) == before


# -- 11. Redis full -------------------------------------------------------------------------


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with 2 MB of memory that refuses writes beyond it (noeviction)."""
    extra = ["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]
    with redis_server(tmp_path / "small-redis", extra) as started:
        yield started


async def fill(where: str) -> None:
    """Write until Redis refuses: out of memory."""
    async with raw_client(where) as client:
        with pytest.raises(OutOfMemoryError):  # noqa: PT012 - fill until refused
            for index in range(10_000):
                await client.set(f"filler:{index}", b"x" * 10_000)


async def test_a_full_redis_degrades_to_direct_exchanges(
    small_server: RedisServer, make: Make, auth: LocalAuthorizationServer
) -> None:
    alice = mint(auth, "alice")
    written = await obtain(make(small_server.url), alice)  # while there is room
    await fill(small_server.url)
    gateway = make(small_server.url)
    assert await obtain(gateway, alice) == written  # reads still work
    for index in range(4):
        assert (await obtain(gateway, mint(auth, f"user{index}")))["sub"] == f"user{index}"
    assert calls(auth) == 5  # exchanged directly: the leases were refused
    shared = gateway.middleware.stats()["caches"]["shared"]
    assert (shared["hit"], shared["miss"], shared["write"]) == (1, 4, 0)
    # Each lease refused; each lookup (a read) succeeded, so the failures are not consecutive.
    assert failures(gateway) == {"out_of_memory": 4}
    assert not breaker(gateway)["open"]


# -- 12. ACL users --------------------------------------------------------------------------


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RedisServer]:
    extra = ["--user", "app", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]
    with redis_server(tmp_path / "acl-redis", [*extra, "--user", "default", "off"]) as started:
        yield started


async def test_an_acl_user(
    acl_server: RedisServer,
    make: Make,
    auth: LocalAuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_delegation.redis")
    where = f"redis://app:{ACL_PASSWORD}@127.0.0.1:{acl_server.port}/0"
    first, second = make(where), make(where)
    alice = mint(auth, "alice")
    got = await obtain(first, alice)
    assert await obtain(second, alice) == got
    assert calls(auth) == 1
    assert second.middleware.stats()["caches"]["grants"]["shared"] == 1
    assert not failures(first)
    assert not failures(second)

    wrong = f"redis://app:{WRONG_PASSWORD}@127.0.0.1:{acl_server.port}/0"
    for target in (wrong, acl_server.url):  # a wrong password, then none (default is off)
        refused = make(target)
        for resource in (GITHUB, GOOGLE):
            assert (await obtain(refused, alice, resource))["aud"] == resource
        assert refused.middleware.stats()["caches"]["grants"]["shared"] == 0
        assert failures(refused)
        with pytest.raises(SharedCacheUnavailable) as caught:
            await refused.middleware.invalidate_grants("alice")
        shown = [repr(refused.middleware._shared), str(caught.value)]
        shown += [json.dumps(refused.middleware.stats())]
        assert not [t for t in shown if WRONG_PASSWORD in t or ACL_PASSWORD in t]
    assert calls(auth) == 5
    records = [r for r in caplog.records if r.name == "asgi_delegation.redis"]
    assert records
    texts = [r.getMessage() for r in records] + [repr(r.args) for r in records]
    assert not [t for t in texts if WRONG_PASSWORD in t or ACL_PASSWORD in t]


# -- 13. Sentinel ---------------------------------------------------------------------------


@pytest.fixture
def sentinel_port(own_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A redis-server in sentinel mode, monitoring ``own_server`` as "mymaster"."""
    require_redis()
    port = free_port()
    directory = tmp_path / "sentinel"
    directory.mkdir()
    config = directory / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor mymaster 127.0.0.1 {own_server.port} 1\n"
        "sentinel down-after-milliseconds mymaster 60000\n"
    )
    with (directory / "sentinel.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            [program("redis-server"), str(config), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # A starting process announces nothing we can await: ask it, within a bound.
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (directory / "sentinel.log").read_text()
            answer = subprocess.run(  # noqa: S603
                [
                    program("redis-cli"),
                    "-p",
                    str(port),
                    "sentinel",
                    "get-master-addr-by-name",
                    "mymaster",
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if str(own_server.port) in answer.stdout:
                break
            assert time.monotonic() < deadline, answer.stdout + answer.stderr
            time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def test_a_sentinel_managed_master(
    own_server: RedisServer, sentinel_port: int, make: Make, auth: LocalAuthorizationServer
) -> None:
    sentinel = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)  # type: ignore[no-untyped-call, unused-ignore]
    master = sentinel.master_for("mymaster", socket_timeout=2)
    try:
        first, second = make(master), make(master)
        alice = mint(auth, "alice")
        got = await obtain(first, alice)
        assert await obtain(second, alice) == got
        assert calls(auth) == 1
        assert second.middleware.stats()["caches"]["grants"]["shared"] == 1
        assert first.middleware.stats()["caches"]["shared"]["write"] == 1
        async with raw_client(own_server.url) as client:
            assert len(await grant_names(client)) == 1  # it is the monitored master
        await first.middleware.aclose()
        await second.middleware.aclose()
        assert await master.ping()  # a given client is never closed
    finally:
        await master.aclose()
        for client in sentinel.sentinels:
            await client.aclose()


# -- 14. TLS --------------------------------------------------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asgi-delegation test CA")])
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server listening with TLS only; the rediss:// URL that trusts its CA."""
    ca, cert, key = _certificates(tmp_path / "tls")
    port = free_port()
    extra = ["--port", "0", "--tls-port", str(port)]  # the later --port overrides the first
    extra += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    extra += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    with redis_server(tmp_path / "tls-redis", extra):
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(ca))}"


async def test_tls(tls_url: str, make: Make, auth: LocalAuthorizationServer) -> None:
    first, second = make(tls_url), make(tls_url)
    alice = mint(auth, "alice")
    got = await obtain(first, alice)
    assert await obtain(second, alice) == got
    assert calls(auth) == 1
    assert second.middleware.stats()["caches"]["grants"]["shared"] == 1
    assert not failures(first)
    assert not failures(second)

    # Without the CA, the server's certificate is not trusted: degraded, never a failure.
    untrusting = make(tls_url.split("?")[0])
    assert (await obtain(untrusting, alice))["sub"] == "alice"
    assert calls(auth) == 2
    assert untrusting.middleware.stats()["caches"]["grants"]["shared"] == 0
    assert failures(untrusting)


# -- 15. Lifecycle --------------------------------------------------------------------------


async def test_aclose_then_reuse_reconnects(
    url: str, make: Make, auth: LocalAuthorizationServer
) -> None:
    gateway = make(url)
    await obtain(gateway, mint(auth, "alice"))
    await gateway.middleware.aclose()
    await gateway.middleware.aclose()  # twice: harmless
    await obtain(gateway, mint(auth, "bob"))
    shared = gateway.middleware.stats()["caches"]["shared"]
    assert (shared["miss"], shared["write"]) == (2, 2)
    assert not failures(gateway)


async def test_a_given_client_is_never_closed(
    url: str, make: Make, auth: LocalAuthorizationServer
) -> None:
    async with raw_client(url) as client:
        gateway = make(client)
        alice = mint(auth, "alice")
        got = await obtain(gateway, alice)
        await gateway.middleware.aclose()
        assert await client.ping()
        assert len(await grant_names(client)) == 1
        other = make(client)
        assert await obtain(other, alice) == got  # and usable by another cache
        await other.middleware.aclose()
        assert await client.ping()
    assert calls(auth) == 1


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """The ASGI lifespan protocol around the block, as a server runs it."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await task


def test_two_event_loops_one_after_the_other(
    url: str, auth: LocalAuthorizationServer, app: App, keys: list[str]
) -> None:
    with auth.running() as issuer:
        middlewares = [
            DelegationMiddleware(
                app,
                issuer=issuer,
                resource=RESOURCE,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                shared_cache=RedisGrantCache(url, encryption_keys=keys[:1], timeout=2.0),
            )
            for _ in range(2)
        ]
        alice, bob = mint(auth, "alice"), mint(auth, "bob")

        async def cycle(middleware: DelegationMiddleware, *tokens: str) -> list[Any]:
            transport = httpx.ASGITransport(app=middleware)
            async with (
                lifespan(middleware),
                httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client,
            ):
                return [await obtain(Gateway(middleware, client), t) for t in tokens]

        [first] = asyncio.run(cycle(middlewares[0], alice))
        [second] = asyncio.run(cycle(middlewares[0], bob))  # another loop, the same cache
        assert (first["sub"], second["sub"]) == ("alice", "bob")
        shared = middlewares[0].stats()["caches"]["shared"]
        assert (shared["miss"], shared["write"]) == (2, 2)
        assert not failures(middlewares[0])
        # A third loop, another process: both from Redis.
        assert asyncio.run(cycle(middlewares[1], alice, bob)) == [first, second]
        assert middlewares[1].stats()["caches"]["grants"]["shared"] == 2
    assert calls(auth) == 2
