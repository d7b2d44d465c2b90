"""The doctor's --redis checks: whether the shared grant cache (RedisGrantCache) works from
this host as the application uses it, and how to fix what does not. Every Redis failure only
degrades the cache to each process's own cache and direct exchanges (see asgi_delegation.redis),
so a broken setup fails no request and can go unnoticed. Four lines, in this order:

  redis reachable     Redis answers PING within the cache's timeout
  redis writable      a probe entry under the namespace is written (SET NX PX), read back and
                      released with the cache's lease script
  redis keys decrypt  the keys in $ASGI_DELEGATION_ENCRYPTION_KEYS open the probe and a sample
                      of the cache's entries (WARN when some open with none of them)
  redis events        a message on the namespace's channel reaches a subscription

The cache is made as the application makes it, from the same URL, namespace and timeout: its
URL handling, key names, timeout and scripts are the ones checked. A failure is told by its
kind and Redis's error code, never by the exception's text, which may quote data; the keys and
the URL's password are handed to the report's redaction. redis-py is imported only with
--redis: without it, the first check says what to install.
"""

from __future__ import annotations

import argparse
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from secrets import token_bytes, token_hex
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio

from .. import _clock
from .._errors import ConfigurationError
from .._sealing import Keyring
from ._report import FAIL, PASS, SKIP, WARN, Check

if TYPE_CHECKING:  # imported when --redis is given: the doctor runs without redis-py
    from ..redis import RedisGrantCache

ENCRYPTION_KEYS_ENV = "ASGI_DELEGATION_ENCRYPTION_KEYS"

_REDIS_CHECKS = ("redis reachable", "redis writable", "redis keys decrypt", "redis events")
_PROBE_PX = 10_000  # the probe's life in Redis, should the check stop before releasing it
_SAMPLE = 100  # existing entries tried with the keys
_SCAN_ROUNDS, _SCAN_COUNT = 20, 500  # so at most 10,000 keys are looked at to find them
_KEYS_FIX = (
    f"set {ENCRYPTION_KEYS_ENV} to the encryption_keys= given to RedisGrantCache: 32-byte "
    "keys as base64url text, comma-separated, newest first"
)

_T = TypeVar("_T")


@dataclass
class RedisOptions:
    """The shared grant cache to check: what ``RedisGrantCache`` is given (None: its default)."""

    url: str
    namespace: str | None
    timeout: float | None
    keys: str | None  # $ASGI_DELEGATION_ENCRYPTION_KEYS as found; None when unset


def _redis_secrets(url: str, keys: str | None) -> list[str]:
    """What must never be printed: the keys, and the URL's password as written and decoded
    (in its user part, or its ``password=`` query argument, which redis-py also reads)."""
    found = [key.strip() for key in (keys or "").split(",") if key.strip()]
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL: the usage check says so, and nothing of it is shown
        return [*found, url]
    passwords = [parts.password or ""]
    passwords += [arg[9:] for arg in parts.query.split("&") if arg.startswith("password=")]
    return found + [form for raw in passwords if raw for form in (raw, unquote(raw))]


def _cache(
    url: str, namespace: str | None, timeout: float | None, keys: Sequence[bytes | str]
) -> RedisGrantCache:
    """The cache as the application makes it from this URL: its URL handling, key names and
    timeout are what the checks use. Construction does no I/O."""
    from ..redis import RedisGrantCache

    options: dict[str, Any] = {}
    if namespace is not None:
        options["namespace"] = namespace
    if timeout is not None:
        options["timeout"] = timeout
    return RedisGrantCache(url, encryption_keys=keys, **options)


def _redis_usage_problem(args: argparse.Namespace) -> str | None:
    if args.redis is None:
        for flag, value in (
            ("--redis-namespace", args.redis_namespace),
            ("--redis-timeout", args.redis_timeout),
        ):
            if value is not None:
                return f"{flag} needs --redis URL"
        return None
    try:
        from .. import redis  # noqa: F401 - only whether it imports
    except ConfigurationError:
        return None  # the redis reachable check says what to install
    placeholder = [token_bytes(32)]  # the keys are checked with the others
    try:
        _cache(args.redis, None, None, placeholder)
    except ConfigurationError as exc:  # never quotes the URL: it may hold a password
        return f"--redis: {exc}"
    try:
        _cache(args.redis, args.redis_namespace, None, placeholder)
    except ConfigurationError as exc:
        return f"--redis-namespace {args.redis_namespace!r}: {exc}"
    return None


def _encryption_keys(raw: str | None) -> list[str] | str:
    """The keys in the environment, or what is wrong with them (never quoting them)."""
    where = f"${ENCRYPTION_KEYS_ENV}"
    if raw is None or not raw.strip():
        return f"{where} is {'not set' if raw is None else 'empty'}"
    keys = [key.strip() for key in raw.split(",")]
    try:
        Keyring(keys, where)  # the cache's own checks, naming the variable
    except ConfigurationError as exc:
        return str(exc)
    return keys


@dataclass
class _Redis:
    """The cache under check and the connection it made, as the application's would be."""

    cache: RedisGrantCache
    client: Any  # redis.asyncio.Redis

    @property
    def where(self) -> str:
        return self.cache._where

    @property
    def timeout(self) -> float:
        return self.cache._timeout

    async def call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """One operation, bounded as the cache bounds each of its own."""
        with anyio.fail_after(self.timeout):
            return await operation()


async def shared_cache(options: RedisOptions) -> list[Check]:
    """The --redis checks. They need nothing of the others: no authorization server."""
    try:
        from ..redis import RedisGrantCache  # noqa: F401 - only whether it imports
    except ConfigurationError as exc:
        first, *others = _REDIS_CHECKS
        return [
            Check(first, FAIL, str(exc), "install the extra: pip install 'asgi-delegation[redis]'"),
            *(Check(name, SKIP, "redis-py is not installed") for name in others),
        ]
    keys = _encryption_keys(options.keys)
    # Without usable keys, a random one seals the probe: Redis itself is still checked.
    sealing = [token_bytes(32)] if isinstance(keys, str) else keys
    cache = _cache(options.url, options.namespace, options.timeout, sealing)
    target = _Redis(cache, cache._connect(options.url))
    try:
        return await _redis_checks(target, keys)
    finally:
        await target.client.aclose()


async def _redis_checks(target: _Redis, keys: list[str] | str) -> list[Check]:
    reachable = await _reachable(target)
    if reachable.status != PASS:
        why = "Redis is not reachable"
        return [
            reachable,
            Check(_REDIS_CHECKS[1], SKIP, why),
            _no_keys(keys) or Check(_REDIS_CHECKS[2], SKIP, why),
            Check(_REDIS_CHECKS[3], SKIP, why),
        ]
    writable, probe = await _writable(target)
    decrypt = _no_keys(keys) or await _decrypt(target, probe)
    return [reachable, writable, decrypt, await _events(target)]


def _no_keys(keys: list[str] | str) -> Check | None:
    if isinstance(keys, str):
        return Check(_REDIS_CHECKS[2], FAIL, f"no encryption keys: {keys}", _KEYS_FIX)
    return None


async def _reachable(target: _Redis) -> Check:
    name = _REDIS_CHECKS[0]
    started = _clock.monotonic()
    try:
        await target.call(target.client.ping)  # connecting and AUTH included, as on first use
    except Exception as exc:
        return Check(name, FAIL, *_redis_failure(exc, target, "PING"))
    elapsed = (_clock.monotonic() - started) * 1000
    return Check(
        name,
        PASS,
        f"{target.where} answered PING in {elapsed:.1f} ms, within the cache's timeout of "
        f"{target.timeout:g} s",
    )


@dataclass(frozen=True)
class _Written:
    """The probe: its key, what was sealed into it, and what Redis gave back for it."""

    key: str
    plain: bytes
    read: bytes


_NOT_REDIS = "check that the URL points at a Redis server itself, not at a proxy or a cache"


async def _writable(target: _Redis) -> tuple[Check, _Written | None]:
    """Write a probe as the cache writes a lease (SET NX PX), read it back as a lookup does,
    and delete it with the cache's own lease release script (EVALSHA, compare-and-delete)."""
    from ..redis import _LoopState

    name, client = _REDIS_CHECKS[1], target.client
    prefix = target.cache._prefix("doctor")
    key = f"{prefix}:p:{token_hex(8)}"  # neither a grant (:g:) nor a lease (:l:)
    plain = token_bytes(16)
    sealed = target.cache._keyring.seal(plain, key.encode())
    release = _LoopState(client).release
    command, stored, read, released = "SET", False, None, 0
    try:
        stored = await target.call(partial(client.set, key, sealed, nx=True, px=_PROBE_PX))
        if stored:
            command = "GET"
            read = await target.call(partial(client.get, key))
        if read == sealed:
            command = "EVALSHA (the cache's lease release script)"
            released = await target.call(partial(release, keys=[key], args=[sealed]))
    except Exception as exc:
        detail, fix = _redis_failure(exc, target, command.split()[0])
        failed = Check(name, FAIL, f"{command} of a probe under {prefix} failed: {detail}", fix)
    else:
        if released == 1:
            return Check(
                name,
                PASS,
                f"a probe under {prefix} was written (SET NX PX {_PROBE_PX}), read back and "
                "deleted by the cache's lease release script",
            ), _Written(key, plain, sealed)
        if not stored:
            what = "SET NX of a new key did not store it"
        elif read is None:
            what = "the probe was gone when read back (evicted at once?)"
        elif read != sealed:
            what = "the probe read back is not what was written"
        else:
            what = "the cache's lease release script did not delete the probe"
        failed = Check(name, FAIL, f"{target.where}: {what}", _NOT_REDIS)
    with suppress(Exception):  # it expires by itself anyway
        await target.call(partial(client.delete, key))
    return failed, None if read != sealed else _Written(key, plain, sealed)


async def _decrypt(target: _Redis, probe: _Written | None) -> Check:
    name, keyring = _REDIS_CHECKS[2], target.cache._keyring
    first = "the key" if len(keyring) == 1 else f"the first of {len(keyring)} keys"
    if probe is None:
        opened = f"no probe to open with {first}"
    elif keyring.open(0, probe.read, probe.key.encode()) == probe.plain:
        opened = f"the probe opens with {first}"
    else:
        return Check(
            name,
            FAIL,
            f"the probe, sealed with {first}, does not open again",
            _NOT_REDIS,
        )
    sample = await _sample(target)
    if isinstance(sample, str):
        return Check(name, PASS, f"{opened}; {sample}")
    by_key, unopened, scanned_all = sample
    total = sum(by_key.values()) + unopened
    where = f"{{{target.cache._namespace}:...}}:g:"
    if not total:
        scanned = "" if scanned_all else f" in the first {_SCAN_ROUNDS * _SCAN_COUNT} keys"
        return Check(name, PASS, f"{opened}; no entries under {where} to sample{scanned}")
    breakdown = ""
    if len(keyring) > 1 and by_key:
        breakdown = " (" + ", ".join(f"key {i + 1}: {n}" for i, n in sorted(by_key.items())) + ")"
    if not unopened:
        return Check(name, PASS, f"{opened}; all {total} sampled entries open{breakdown}")
    rest = f"; {total - unopened} open{breakdown}" if by_key else ""
    return Check(
        name,
        WARN,
        f"{opened}; {unopened} of {total} sampled entries do not open with any configured "
        f"key (written with another key, or with one since dropped){rest}",
        f"every process must be given the same encryption_keys=, newest first, as in "
        f"${ENCRYPTION_KEYS_ENV}; an entry no key opens is a miss until it expires (within a "
        "day), so after a rotation keep the old key second for a day",
    )


async def _sample(target: _Redis) -> tuple[Counter[int], int, bool] | str:
    """Up to _SAMPLE of the namespace's grants: how many open with each key (by index), how
    many with none, and whether the whole keyspace was scanned; or why there is no sample."""
    from ..redis import _get, grant_pattern

    client, keyring = target.client, target.cache._keyring
    pattern = grant_pattern(target.cache._namespace)
    found: dict[str, None] = {}  # SCAN may give a key twice
    cursor, rounds = 0, 0
    try:
        while rounds < _SCAN_ROUNDS and len(found) < _SAMPLE:
            scan = partial(client.scan, cursor, match=pattern, count=_SCAN_COUNT)
            cursor, keys = await target.call(scan)
            # The cache's keys are text; another's that does not decode is no grant of it.
            found.update(dict.fromkeys(k.decode() for k in keys if _utf8(k)))
            rounds += 1
            if cursor == 0:
                break
        names = list(found)[:_SAMPLE]
        values = await target.call(partial(_get, client, names)) if names else []
    except Exception as exc:
        return f"no sample of the cache's entries: {_redis_failure(exc, target, 'SCAN')[0]}"
    by_key: Counter[int] = Counter()
    unopened = 0
    for name, value in zip(names, values, strict=True):
        if value is None:  # expired since the scan
            continue
        index = _opening_key(keyring, value, name.encode())
        if index is None:
            unopened += 1
        else:
            by_key[index] += 1
    return by_key, unopened, cursor == 0


def _opening_key(keyring: Keyring, sealed: object, name: bytes) -> int | None:
    """Which key opens an entry (the one that named it: the writer's first), if any."""
    for index in range(len(keyring)):
        if keyring.open(index, sealed, name) is not None:
            return index
    return None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


async def _events(target: _Redis) -> Check:
    """A message on the cache's channel reaches a subscription: invalidations and grant
    announcements travel there. Every process ignores the message (neither "g" nor "i")."""
    name, channel = _REDIS_CHECKS[3], target.cache._channel
    message = b"doctor " + token_hex(8).encode()
    pubsub = target.client.pubsub()
    command = "SUBSCRIBE"
    try:
        await target.call(partial(pubsub.subscribe, channel))
        await target.call(partial(_until, pubsub, lambda m: m["type"] == "subscribe"))
        command = "PUBLISH"
        receivers = await target.call(partial(target.client.publish, channel, message))
        command = ""
        await target.call(partial(_until, pubsub, lambda m: m.get("data") == message))
    except Exception as exc:
        if not command and isinstance(exc, TimeoutError):  # published, never delivered
            return Check(
                name,
                FAIL,
                f"a message published on {channel} did not reach this check's subscription "
                f"within {target.timeout:g} s",
                _NOT_REDIS,
            )
        command = command or "receiving a message"
        detail, fix = _redis_failure(exc, target, command)
        return Check(name, FAIL, f"{command} on {channel}: {detail}", fix)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(target.timeout):
            await pubsub.aclose()
    others = int(receivers) - 1
    return Check(
        name,
        PASS,
        f"a message on {channel} reached this check's subscription ({others} other "
        f"subscriber{'' if others == 1 else 's'})",
    )


async def _until(pubsub: Any, wanted: Callable[[Mapping[str, Any]], bool]) -> None:
    while True:
        message = await pubsub.get_message(timeout=None)  # the caller bounds the wait
        if message is not None and wanted(message):
            return


def _acl(namespace: str) -> str:
    """ACL rules that let a user do what the cache does, on its keys and channel only (with
    SELECT, for a database other than 0, and PING, for these checks)."""
    from ..redis import COMMANDS, _glob

    rules = [f"~{{{_glob(namespace)}:*", f"&{_glob(namespace)}:events"]
    return " ".join([*rules, *(f"+{c}" for c in ("ping", "select", *COMMANDS))])


def _redis_failure(exc: BaseException, target: _Redis, command: str) -> tuple[str, str]:
    """What a failed Redis operation points to, and how to fix it. Never the exception's own
    text, which may quote data: only its kind, Redis's error code (and for NOPERM the command
    refused), and the reason the OS or the TLS library gave."""
    from redis import exceptions as errors

    where, namespace = target.where, target.cache._namespace
    chain = _causes(exc)
    tls_fix = (
        "a rediss:// URL needs Redis's TLS port and a certificate this host trusts: give the "
        "CA with ?ssl_ca_certs=/path/to/ca.pem in the URL (as RedisGrantCache is given it)"
    )
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or "certificate verify failed"
            return f"TLS with {where} failed: its certificate is not trusted ({why})", tls_fix
        if isinstance(cause, ssl.SSLError):
            return f"TLS with {where} failed ({cause.reason or type(cause).__name__})", tls_fix
    code = getattr(exc, "status_code", None) or "ERR"
    if isinstance(exc, errors.AuthenticationError):
        if code == "NOAUTH":
            return (
                f"{where} requires a password, and the URL gives none (NOAUTH)",
                "put the cache's ACL user and password in the URL: "
                "redis://USER:PASSWORD@HOST:PORT/DB (rediss:// with TLS)",
            )
        return (
            f"{where} refused the URL's credentials ({code}: wrong user name or password, or "
            "the user is disabled)",
            "use the ACL user and password the cache logs in with (ACL LIST on the server "
            "shows its users; ACL SETUSER USER on >PASSWORD sets a password)",
        )
    if isinstance(exc, errors.AuthenticationWrongNumberOfArgsError):
        return (
            f"{where} takes no user name with its password (Redis before 6)",
            "give only the password: redis://:PASSWORD@HOST:PORT/DB",
        )
    if isinstance(exc, errors.NoPermissionError):
        said = str(exc)
        if "channel" in said:
            what = f"use channel {target.cache._channel}"
        elif "key" in said:
            what = f"use keys under {{{namespace}:"
        else:
            ran = said.split("'")[1] if said.count("'") >= 2 else command
            what = f"run {ran.upper()}"
        return (
            f"the ACL user may not {what} (NOPERM)",
            f"let the cache's ACL user do what the cache does: ACL SETUSER USER {_acl(namespace)} "
            "(Redis 7 gives a new user no channel unless acl-pubsub-default is allchannels)",
        )
    if isinstance(exc, errors.OutOfMemoryError) or code == "OOM":
        return (
            f"{where} is out of memory (OOM: used memory is over maxmemory, and its "
            "maxmemory-policy frees nothing)",
            "raise maxmemory, or let Redis evict: maxmemory-policy volatile-lru (every key of "
            "the cache has a TTL); until then nothing is shared and each process exchanges alone",
        )
    if isinstance(exc, errors.ReadOnlyError):
        return (
            f"{where} is a read-only replica (READONLY)",
            "point the URL at the primary; with Sentinel give RedisGrantCache "
            "Sentinel(...).master_for(NAME), which follows failovers",
        )
    if isinstance(exc, errors.BusyLoadingError):
        return f"{where} is loading its data set (LOADING)", "retry once Redis has loaded it"
    if isinstance(exc, errors.AskError | errors.ClusterDownError | errors.ClusterCrossSlotError):
        return (
            f"{where} is a Redis Cluster node ({code})",
            "give RedisGrantCache a redis.asyncio.cluster.RedisCluster client; --redis checks "
            "a single Redis server",
        )
    if isinstance(exc, TimeoutError | errors.TimeoutError):
        hint = (
            "; a rediss:// URL to a port without TLS waits for a handshake that never comes"
            if _tls(target)
            else ""
        )
        return (
            f"{where} did not answer {command} within {target.timeout:g} s, the cache's timeout",
            "check that Redis runs there and that this host reaches it (firewall, security "
            "group)" + hint + "; if it is only slow, raise timeout= in RedisGrantCache "
            "(and --redis-timeout here)",
        )
    if isinstance(exc, errors.ConnectionError):
        return _connection_failure(exc, chain, where)
    if isinstance(exc, errors.ResponseError):
        return (
            f"{where} answered {command} with an error ({code})",
            "see the Redis server's log",
        )
    if isinstance(exc, errors.InvalidResponse | errors.DataError):
        return (
            f"{where} answered {command} with something that is not a Redis reply",
            "check that the URL points at a Redis server",
        )
    return f"{command} failed ({type(exc).__name__})", "see --verbose, and the Redis log"


def _tls(target: _Redis) -> bool:
    connection = target.client.connection_pool.connection_class
    return "SSL" in connection.__name__


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _connection_failure(
    exc: BaseException, chain: Sequence[BaseException], where: str
) -> tuple[str, str]:
    os_error = next((c for c in chain if isinstance(c, OSError)), None)
    if isinstance(os_error, ConnectionRefusedError):
        return (
            f"nothing listens at {where} (connection refused)",
            "start Redis, or fix the host and port in the URL",
        )
    if isinstance(os_error, socket.gaierror):
        return f"the host of {where} does not resolve", "fix the host name in the URL"
    if isinstance(os_error, FileNotFoundError):
        return f"there is no socket at {where}", "fix the socket path, or start Redis on it"
    if isinstance(os_error, PermissionError):
        return (
            f"this user may not open {where} (permission denied)",
            "run as a user the socket's permissions admit (Redis's unixsocketperm)",
        )
    if "max number of clients" in str(exc):
        return (
            f"{where} refused the connection: max number of clients reached",
            "raise maxclients, or find what holds so many connections",
        )
    if os_error is None or isinstance(os_error, ConnectionResetError | BrokenPipeError):
        return (
            f"{where} closed the connection",
            "check that the port is Redis's, and whether it takes TLS there (rediss://) or "
            "not (redis://)",
        )
    reason = os_error.strerror or type(os_error).__name__
    return f"{where} could not be reached ({reason})", "check the URL and the network path"
