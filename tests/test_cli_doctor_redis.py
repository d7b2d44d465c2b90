"""``asgi-delegation doctor --redis``: the shared grant cache's checks, against real
redis-server processes on loopback ports (and a LocalAuthorizationServer on one, for the rest
of the doctor)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asgi_delegation import DelegationMiddleware
from asgi_delegation.cli import main, parser
from asgi_delegation.cli._doctor import _options, redacted, render
from asgi_delegation.cli._doctor_redis import RedisOptions, shared_cache
from asgi_delegation.cli._report import Check
from asgi_delegation.redis import RedisGrantCache, grant_pattern
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
    exchanging_app,
)

ENV = "ASGI_DELEGATION_ENCRYPTION_KEYS"
REDIS_CHECKS = ["redis reachable", "redis writable", "redis keys decrypt", "redis events"]
PROBE = "{asgi-delegation:doctor}"
WRITTEN = (
    f"a probe under {PROBE} was written (SET NX PX 10000), read back and deleted by the "
    "cache's lease release script"
)
NO_ENTRIES = "the probe opens with the key; no entries under {asgi-delegation:...}:g: to sample"
EVENTS = "a message on asgi-delegation:events reached this check's subscription"


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


KEY_A, KEY_B = _key(), _key()
_LINE = re.compile(r"(PASS|FAIL|SKIP|WARN)  (\S(?:.*?\S)?)(?:  +(.*))?")


class Line(NamedTuple):
    status: str
    detail: str
    fix: str | None


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEYCARD_CLIENT_ID", "KEYCARD_CLIENT_SECRET", "ASGI_DELEGATION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV, KEY_A)


@pytest.fixture(scope="module")
def auth() -> Iterator[LocalAuthorizationServer]:
    """One authorization server on a loopback port for the module: the doctor's other checks
    pass against it, so the exit code is the Redis checks' own."""
    server = LocalAuthorizationServer()
    server.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    with server.running():
        yield server


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A healthy Redis for the tests that leave nothing in it (the probe deletes itself)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def doctor(
    capsys: pytest.CaptureFixture[str], issuer: str, *argv: str, hidden: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Run ``doctor --issuer ISSUER --resource RESOURCE ARGV``; (exit code, stdout). No key,
    password, client secret or token may reach stdout or stderr."""
    code = main(["doctor", "--issuer", issuer, "--resource", RESOURCE, *argv])
    out, err = capsys.readouterr()
    assert_nothing_secret(out + err, hidden)
    return code, out


def assert_nothing_secret(output: str, hidden: tuple[str, ...] = ()) -> None:
    for secret in (*hidden, KEY_A, KEY_B, CLIENT_SECRET):
        assert secret not in output
    assert "eyJ" not in output  # no JWT, not even a prefix


def checklist(out: str) -> dict[str, Line]:
    lines = out.splitlines()
    found: dict[str, Line] = {}
    for i, text in enumerate(lines):
        match = _LINE.fullmatch(text)
        if match:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            fix = following.strip()[5:] if following.startswith("      fix: ") else None
            found[match[2]] = Line(match[1], match[3] or "", fix)
    return found


def redis_checks(out: str) -> dict[str, Line]:
    checks = checklist(out)
    assert list(checks)[-4:] == REDIS_CHECKS  # last, after every other check
    return {name: checks[name] for name in REDIS_CHECKS}


def ping_line(where: str, timeout: str = "0.25") -> re.Pattern[str]:
    return re.compile(
        rf"{re.escape(where)} answered PING in \d+\.\d ms, within the cache's timeout of "
        rf"{re.escape(timeout)} s"
    )


def test_healthy_redis(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, shared_redis: RedisServer
) -> None:
    code, out = doctor(capsys, auth.issuer, "--redis", shared_redis.url)
    checks = redis_checks(out)
    assert code == 0, out
    assert {line.status for line in checklist(out).values()} == {"PASS", "SKIP"}
    assert ping_line(f"127.0.0.1:{shared_redis.port}/0").fullmatch(checks["redis reachable"].detail)
    assert checks["redis writable"] == Line("PASS", WRITTEN, None)
    assert checks["redis keys decrypt"] == Line("PASS", NO_ENTRIES, None)
    assert checks["redis events"] == Line("PASS", f"{EVENTS} (0 other subscribers)", None)
    assert out.splitlines()[-1] == "9 passed, 0 failed, 2 skipped: no problem found"
    assert shared_redis.cli("dbsize").strip() == "0"  # the probe is gone

    # Another namespace and timeout: the cache's names and bound, as it would be configured.
    args = ["--redis", shared_redis.url, "--redis-namespace", "tenant-a", "--redis-timeout", "1"]
    code, out = doctor(capsys, auth.issuer, *args)
    checks = redis_checks(out)
    assert code == 0, out
    assert ping_line(f"127.0.0.1:{shared_redis.port}/0", "1").fullmatch(
        checks["redis reachable"].detail
    )
    assert "a probe under {tenant-a:doctor} was written" in checks["redis writable"].detail
    assert checks["redis events"].detail.startswith("a message on tenant-a:events reached")


def test_redis_checks_need_no_authorization_server(
    capsys: pytest.CaptureFixture[str], shared_redis: RedisServer
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, out = doctor(capsys, nowhere, "--redis", shared_redis.url)
    checks = checklist(out)
    assert code == 1
    assert checks["discovery"].status == "FAIL"
    assert [checks[name].status for name in REDIS_CHECKS] == ["PASS"] * 4


def test_nothing_listening(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer
) -> None:
    port = free_port()
    code, out = doctor(capsys, auth.issuer, "--redis", f"redis://127.0.0.1:{port}/2")
    checks = redis_checks(out)
    assert code == 1
    assert checks["redis reachable"] == Line(
        "FAIL",
        f"nothing listens at 127.0.0.1:{port}/2 (connection refused)",
        "start Redis, or fix the host and port in the URL",
    )
    skipped = Line("SKIP", "Redis is not reachable", None)
    assert [checks[name] for name in REDIS_CHECKS[1:]] == [skipped] * 3
    assert out.splitlines()[-1] == "5 passed, 1 failed, 5 skipped: fix the first FAIL first"
    # Refused at once: the checks take less than the timeout, with no retry.
    elapsed, _ = timed_checks(f"redis://127.0.0.1:{port}/2", 0.25)
    assert elapsed < 0.25


def timed_checks(url: str, timeout: float) -> tuple[float, list[Check]]:
    """The --redis checks alone, and how long they took."""
    started = time.monotonic()
    checks = asyncio.run(shared_cache(RedisOptions(url, None, timeout, KEY_A)))
    return time.monotonic() - started, checks


def test_redis_not_answering(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as server:
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # connections are accepted, nothing answers
        try:
            args = ["--redis", server.url, "--redis-timeout", "0.2"]
            code, out = doctor(capsys, auth.issuer, *args)
            elapsed, checks = timed_checks(server.url, 0.5)
        finally:
            server.process.send_signal(signal.SIGCONT)
    reachable = redis_checks(out)["redis reachable"]
    assert code == 1
    assert reachable.status == "FAIL"
    assert reachable.detail == (
        f"127.0.0.1:{server.port}/0 did not answer PING within 0.2 s, the cache's timeout"
    )
    assert "raise timeout= in RedisGrantCache" in (reachable.fix or "")
    # It waited out the timeout once: no retry, and nothing after it waited again.
    assert [check.status for check in checks] == ["FAIL", "SKIP", "SKIP", "SKIP"]
    assert 0.5 <= elapsed < 0.95


def test_acl_credentials_refused(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    right, wrong = "right-pass-7f3a1c", "wrong-pass-91c2e8"
    hidden = (right, wrong)
    user = ["--user", "cache", "on", f">{right}", "~*", "&*", "+@all"]
    with redis_server(tmp_path, user) as server:
        url = f"redis://cache:{{}}@127.0.0.1:{server.port}/0"
        code, out = doctor(capsys, auth.issuer, "--redis", url.format(wrong), hidden=hidden)
        refused = redis_checks(out)["redis reachable"]
        assert code == 1
        assert refused.status == "FAIL"
        assert refused.detail == (
            f"127.0.0.1:{server.port}/0 refused the URL's credentials (WRONGPASS: wrong user "
            "name or password, or the user is disabled)"
        )
        assert "ACL SETUSER" in (refused.fix or "")

        code, out = doctor(capsys, auth.issuer, "--redis", url.format(right), hidden=hidden)
        assert code == 0, out
        assert {line.status for line in redis_checks(out).values()} == {"PASS"}

        # The password as a query argument is hidden too (redis-py reads it there).
        query = f"redis://127.0.0.1:{server.port}/0?username=cache&password={wrong}"
        code, out = doctor(capsys, auth.issuer, "--redis", query, hidden=hidden)
        assert "WRONGPASS" in redis_checks(out)["redis reachable"].detail

        server.cli("acl", "setuser", "default", "resetpass", ">default-pass-3b9d")
        anonymous = f"redis://127.0.0.1:{server.port}/0"
        code, out = doctor(capsys, auth.issuer, "--redis", anonymous, hidden=hidden)
        refused = redis_checks(out)["redis reachable"]
        assert code == 1
        assert refused.detail == (
            f"127.0.0.1:{server.port}/0 requires a password, and the URL gives none (NOAUTH)"
        )


def test_out_of_memory(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    with redis_server(tmp_path, ["--maxmemory", "1mb"]) as server:
        fill(server)
        code, out = doctor(capsys, auth.issuer, "--redis", server.url)
    checks = redis_checks(out)
    assert code == 1
    assert checks["redis reachable"].status == "PASS"
    writable = checks["redis writable"]
    assert writable.status == "FAIL"
    assert writable.detail == (
        f"SET of a probe under {PROBE} failed: 127.0.0.1:{server.port}/0 is out of memory (OOM: "
        "used memory is over maxmemory, and its maxmemory-policy frees nothing)"
    )
    assert "maxmemory-policy volatile-lru" in (writable.fix or "")
    # Reads still work: the keys are still judged, on the entries there are (none of the cache).
    assert checks["redis keys decrypt"] == Line(
        "PASS",
        "no probe to open with the key; no entries under {asgi-delegation:...}:g: to sample",
        None,
    )
    assert checks["redis events"].status == "PASS"  # PUBLISH takes no memory to speak of


def fill(server: RedisServer) -> None:
    """Put 2 MB of data in a Redis of 1 MB, as when its data outgrew a lowered maxmemory: well
    over the limit, so that every write is refused (noeviction, its default policy), however
    much the connections' own buffers take or free."""
    with redis.Redis(port=server.port) as client:
        limit = client.config_get("maxmemory")["maxmemory"]
        client.config_set("maxmemory", 0)
        for i in range(100):
            client.set(f"filler:{i}", b"x" * 20_000)
        client.config_set("maxmemory", limit)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("small", b"x")


def test_read_only_replica(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    # A replica of a primary that is not there: it serves reads and refuses writes.
    replica = ["--replicaof", "127.0.0.1", str(free_port())]
    with redis_server(tmp_path, replica) as server:
        code, out = doctor(capsys, auth.issuer, "--redis", server.url)
    writable = redis_checks(out)["redis writable"]
    assert code == 1
    assert writable.status == "FAIL"
    assert writable.detail == (
        f"SET of a probe under {PROBE} failed: 127.0.0.1:{server.port}/0 is a read-only "
        "replica (READONLY)"
    )
    assert "point the URL at the primary" in (writable.fix or "")


def test_acl_without_permissions(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    users = [
        # Redis 7 gives a new user no channel (acl-pubsub-default resetchannels).
        *["--user", "nochannel", "on", ">pw-1", "~*", "+@all"],
        *["--user", "noscript", "on", ">pw-2", "~*", "&*", "+@all", "-evalsha"],
        *["--user", "otherkeys", "on", ">pw-3", "~other:*", "&*", "+@all"],
    ]
    with redis_server(tmp_path, users) as server:

        def run(user: str, password: str, db: int = 0) -> tuple[int, dict[str, Line]]:
            url = f"redis://{user}:{password}@127.0.0.1:{server.port}/{db}"
            code, out = doctor(capsys, auth.issuer, "--redis", url, hidden=(password,))
            return code, redis_checks(out)

        code, checks = run("nochannel", "pw-1")
        assert code == 1
        assert checks["redis writable"].status == "PASS"
        events = checks["redis events"]
        assert events.status == "FAIL"
        assert events.detail == (
            "SUBSCRIBE on asgi-delegation:events: the ACL user may not use channel "
            "asgi-delegation:events (NOPERM)"
        )

        code, checks = run("noscript", "pw-2")
        assert code == 1
        writable = checks["redis writable"]
        assert writable.detail == (
            f"EVALSHA (the cache's lease release script) of a probe under {PROBE} failed: the "
            "ACL user may not run EVALSHA (NOPERM)"
        )
        # It was written and read back: the probe still opens, and it was deleted after all.
        assert checks["redis keys decrypt"] == Line("PASS", NO_ENTRIES, None)
        assert server.cli("dbsize").strip() == "0"

        code, checks = run("otherkeys", "pw-3")
        assert code == 1
        assert checks["redis writable"].detail == (
            f"SET of a probe under {PROBE} failed: the ACL user may not use keys under "
            "{asgi-delegation: (NOPERM)"
        )

        # The fix's rules are enough for the doctor, and for the cache itself.
        fix = writable.fix or ""
        rules = fix.split("ACL SETUSER USER ")[1].split(" (Redis 7")[0].split()
        server.cli("acl", "setuser", "exact", "on", ">pw-4", *rules)
        code, checks = run("exact", "pw-4")
        assert code == 0
        assert [line.status for line in checks.values()] == ["PASS"] * 4
        assert checks["redis keys decrypt"].detail == (
            "the probe opens with the key; no sample of the cache's entries: the ACL user may "
            "not run SCAN (NOPERM)"
        )
        code, checks = run("exact", "pw-4", db=3)  # SELECT 3 on connecting
        assert code == 0
        assert checks["redis reachable"].detail.startswith(f"127.0.0.1:{server.port}/3 answered")
        stats = asyncio.run(
            write_grants(auth, f"redis://exact:pw-4@127.0.0.1:{server.port}/0", KEY_A, [GITHUB])
        )
        assert stats["write"] == 1
        assert stats["breaker"] == {"open": False}  # not one failed Redis operation
        assert len(server.cli("--scan", "--pattern", "{asgi-delegation:*}:g:*").split()) == 1


async def write_grants(
    auth: LocalAuthorizationServer,
    url: str,
    key: str,
    resources: list[str],
    subject: str = "alice",
) -> dict[str, Any]:
    """Exchange ``subject``'s token for each resource through a middleware whose shared cache
    is a RedisGrantCache under ``key``: one entry each in Redis. The cache's counters."""
    cache = RedisGrantCache(url, encryption_keys=[key])
    http_client = auth.http_client()
    middleware = DelegationMiddleware(
        exchanging_app(auth),
        issuer=auth.issuer,
        resource=RESOURCE,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        http_client=http_client,
        shared_cache=cache,
    )
    token = auth.mint(subject, audience=RESOURCE, scope="read")
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            for resource in resources:
                response = await client.get(
                    "/exchange",
                    params={"resource": resource},
                    headers={"authorization": f"Bearer {token}"},
                )
                assert response.status_code == 200
                assert "error" not in response.json()
        return dict(middleware.stats()["caches"]["shared"])
    finally:
        await middleware.aclose()
        await http_client.aclose()


def test_entries_under_another_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    auth: LocalAuthorizationServer,
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as server:
        stats = asyncio.run(write_grants(auth, server.url, KEY_A, [GITHUB, GOOGLE, SLACK]))
        assert stats["write"] == 3

        monkeypatch.setenv(ENV, KEY_B)
        code, out = doctor(capsys, auth.issuer, "--redis", server.url)
        decrypt = redis_checks(out)["redis keys decrypt"]
        assert code == 0, out  # a warning, not a failure
        assert decrypt.status == "WARN"
        assert decrypt.detail == (
            "the probe opens with the key; 3 of 3 sampled entries do not open with any "
            "configured key (written with another key, or with one since dropped)"
        )
        assert ENV in (decrypt.fix or "")
        assert out.splitlines()[-1] == (
            "8 passed, 0 failed, 2 skipped, 1 warned: no failure, but see the WARN lines"
        )
        code, out = doctor(capsys, auth.issuer, "--redis", server.url, "--json")
        document = json.loads(out)
        assert code == 0
        assert document["ok"] is True
        assert [c["status"] for c in document["checks"] if c["name"] in REDIS_CHECKS] == [
            "PASS",
            "PASS",
            "WARN",
            "PASS",
        ]

        # Rotated: the new key first, the old one kept second. Every entry opens with it.
        monkeypatch.setenv(ENV, f"{KEY_B}, {KEY_A}")
        code, out = doctor(capsys, auth.issuer, "--redis", server.url)
        assert code == 0
        assert redis_checks(out)["redis keys decrypt"] == Line(
            "PASS",
            "the probe opens with the first of 2 keys; all 3 sampled entries open (key 2: 3)",
            None,
        )

        # One more entry, written under B by another process: A opens 3 of the 4.
        stats = asyncio.run(write_grants(auth, server.url, KEY_B, [GITHUB], subject="bob"))
        assert stats["write"] == 1
        monkeypatch.setenv(ENV, KEY_A)
        code, out = doctor(capsys, auth.issuer, "--redis", server.url)
        assert redis_checks(out)["redis keys decrypt"].detail == (
            "the probe opens with the key; 1 of 4 sampled entries do not open with any "
            "configured key (written with another key, or with one since dropped); 3 open"
        )

        # Another namespace has none of them.
        code, out = doctor(capsys, auth.issuer, "--redis", server.url, "--redis-namespace", "b")
        assert redis_checks(out)["redis keys decrypt"].detail == (
            "the probe opens with the key; no entries under {b:...}:g: to sample"
        )


def test_subscribers_are_counted(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    """A running cache listens on the channel: the events check counts it."""
    with redis_server(tmp_path) as server:

        async def scenario() -> str:
            cache = RedisGrantCache(server.url, encryption_keys=[KEY_A])
            http_client = auth.http_client()
            middleware = DelegationMiddleware(
                exchanging_app(auth),
                issuer=auth.issuer,
                resource=RESOURCE,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                http_client=http_client,
                shared_cache=cache,
            )
            try:
                token = auth.mint("alice", audience=RESOURCE)
                transport = httpx.ASGITransport(app=middleware)
                async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
                    params = {"resource": GITHUB}
                    headers = {"authorization": f"Bearer {token}"}
                    await client.get("/exchange", params=params, headers=headers)
                # Its subscription is made in the background, with nothing to await: poll.
                deadline = time.monotonic() + 10
                while server.cli("pubsub", "numsub", "asgi-delegation:events").split()[1] != "1":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                # The doctor runs its own event loop: in a thread, while this one keeps going.
                command = ["doctor", "--issuer", auth.issuer, "--resource", RESOURCE]
                code = await asyncio.to_thread(main, [*command, "--redis", server.url])
                assert code == 0
            finally:
                await middleware.aclose()
                await http_client.aclose()
            return capsys.readouterr().out

        out = asyncio.run(scenario())
    assert_nothing_secret(out)
    assert redis_checks(out)["redis events"].detail == f"{EVENTS} (1 other subscriber)"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "$ASGI_DELEGATION_ENCRYPTION_KEYS is not set"),
        (" ", "$ASGI_DELEGATION_ENCRYPTION_KEYS is empty"),
        (
            base64.urlsafe_b64encode(b"k" * 16).decode(),
            "$ASGI_DELEGATION_ENCRYPTION_KEYS[0] must be 32 bytes, not 16",
        ),
        (f"{KEY_A},not-base64-!!", "$ASGI_DELEGATION_ENCRYPTION_KEYS[1] is not base64url text"),
        (f"{KEY_A},{KEY_A}", "$ASGI_DELEGATION_ENCRYPTION_KEYS holds the same key twice"),
    ],
)
def test_encryption_keys_missing_or_invalid(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    auth: LocalAuthorizationServer,
    shared_redis: RedisServer,
    value: str | None,
    problem: str,
) -> None:
    if value is None:
        monkeypatch.delenv(ENV)
    else:
        monkeypatch.setenv(ENV, value)
    hidden = tuple(k for k in (value or "").split(",") if k.strip())
    code, out = doctor(capsys, auth.issuer, "--redis", shared_redis.url, hidden=hidden)
    checks = redis_checks(out)
    assert code == 1
    decrypt = checks["redis keys decrypt"]
    assert decrypt.status == "FAIL"
    assert decrypt.detail == f"no encryption keys: {problem}"
    assert (decrypt.fix or "").startswith(f"set {ENV} to the encryption_keys= given to")
    # Redis itself is still checked (with a throwaway key for the probe).
    assert [checks[n].status for n in ("redis reachable", "redis writable", "redis events")] == [
        "PASS"
    ] * 3

    if value is None:  # the keys are judged even when Redis is unreachable
        nowhere = f"redis://127.0.0.1:{free_port()}/0"
        code, out = doctor(capsys, auth.issuer, "--redis", nowhere)
        assert redis_checks(out)["redis keys decrypt"].detail == f"no encryption keys: {problem}"


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "redis.crt", directory / "redis.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, tmp_path: Path
) -> None:
    require_redis()
    cert, key = tls_files(tmp_path / "tls")
    tls_port = free_port()
    options = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert)]
    options += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
    with redis_server(tmp_path / "redis", options) as server:
        where = f"127.0.0.1:{tls_port}/0"

        code, out = doctor(capsys, auth.issuer, "--redis", f"rediss://{where}")
        reachable = redis_checks(out)["redis reachable"]
        assert code == 1
        assert reachable.detail.startswith(
            f"TLS with {where} failed: its certificate is not trusted (self"
        )
        assert "ssl_ca_certs=" in (reachable.fix or "")

        trusted = f"rediss://{where}?ssl_ca_certs={cert}"
        code, out = doctor(capsys, auth.issuer, "--redis", trusted)
        assert code == 0, out
        assert ping_line(where).fullmatch(redis_checks(out)["redis reachable"].detail)

        # TLS to the plain port: the handshake is never answered.
        plain = f"127.0.0.1:{server.port}/0"
        code, out = doctor(capsys, auth.issuer, "--redis", f"rediss://{plain}")
        reachable = redis_checks(out)["redis reachable"]
        assert reachable.detail == f"{plain} did not answer PING within 0.25 s, the cache's timeout"
        assert "a rediss:// URL to a port without TLS" in (reachable.fix or "")

        # No TLS to the TLS port: the server hangs up.
        code, out = doctor(capsys, auth.issuer, "--redis", f"redis://{where}")
        reachable = redis_checks(out)["redis reachable"]
        assert reachable.detail == f"{where} closed the connection"
        assert "(rediss://)" in (reachable.fix or "")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--redis", "http://cache:hunter2-secret@127.0.0.1:6379"],
            "--redis: the Redis URL must be redis://, rediss:// or unix://",
        ),
        (
            ["--redis", "redis://127.0.0.1", "--redis-namespace", "a b"],
            "--redis-namespace 'a b': namespace must be 1 to 64 printable characters",
        ),
        (
            ["--redis", "redis://127.0.0.1", "--redis-namespace", "{a}"],
            "--redis-namespace '{a}': namespace must be",
        ),
        (["--redis-namespace", "tenant"], "--redis-namespace needs --redis URL"),
        (["--redis-timeout", "1"], "--redis-timeout needs --redis URL"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    argv = ["doctor", "--issuer", "https://as.example", "--resource", RESOURCE, *extra]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("asgi-delegation doctor: ")
    assert message in err
    assert "hunter2-secret" not in err


def test_redis_secrets_are_redacted_whatever_a_check_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL's password (as written, and decoded, in either place redis-py reads it) and
    the keys are among the secrets every line is cleaned of."""
    monkeypatch.setenv(ENV, f" {KEY_A} ,{KEY_B}")
    url = "redis://cache:p%40ss-word-1@127.0.0.1:6379/0?password=other-word-2"
    argv = ["doctor", "--issuer", "https://as.example", "--resource", RESOURCE, "--redis", url]
    options = _options(parser().parse_args(argv))
    said = f"p%40ss-word-1 p@ss-word-1 other-word-2 {KEY_A} {KEY_B}"
    out = render(
        redacted([Check("redis reachable", "FAIL", said, said)], options.secrets), as_json=False
    )
    assert out.count("[redacted]") == 10
    for secret in ("ss-word-1", "other-word-2", KEY_A, KEY_B):
        assert secret not in out


@pytest.mark.parametrize("timeout", ["0", "6", "soon"])
def test_timeout_out_of_range(capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    argv = ["doctor", "--issuer", "https://as.example", "--resource", RESOURCE]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--redis", "redis://127.0.0.1", "--redis-timeout", timeout])
    assert exited.value.code == 2
    assert "--redis-timeout" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["doctor", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse rewraps the option texts
    for shown in (
        "--redis URL",
        "--redis-namespace NAMESPACE",
        "--redis-timeout SECONDS",
        "redis reachable",
        "redis writable",
        "redis keys decrypt",
        "redis events",
        f"${ENV}",
        "WARN",
    ):
        assert shown in text


# -- the SCAN pattern: the namespace's grants, and nothing else ----------------------------------

_NAME = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    min_size=22,
    max_size=22,
)
# Printable, no spaces or braces (the cache's rule), glob's own characters well represented.
_NAMESPACE = st.lists(
    st.one_of(
        st.sampled_from("*?[]\\^:-."),
        st.characters(codec="utf-8", exclude_categories=("C", "Z"), exclude_characters="{}"),
    ),
    min_size=1,
    max_size=20,
).map("".join)


@pytest.fixture(scope="module")
def sync_client(shared_redis: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis(port=shared_redis.port, db=1) as client:  # db 1: the others use db 0
        yield client


@settings(max_examples=60, deadline=None)
@given(namespace=_NAMESPACE, tag=_NAME, item=_NAME)
@example(namespace="*", tag="A" * 22, item="B" * 22)
@example(namespace="a[bc]\\?", tag="A" * 22, item="B" * 22)
def test_grant_pattern_matches_only_the_namespace_grants(
    sync_client: redis.Redis, namespace: str, tag: str, item: str
) -> None:
    ours = f"{{{namespace}:{tag}}}:g:{item}"
    others = [
        f"{{{namespace}:{tag}}}:l:{item}",  # a lease
        f"{{{namespace}:{tag}}}:v",  # a generation
        f"{{{namespace}:x:{tag}}}:g:{item}",  # namespace "NS:x"
        f"{{{namespace}x:{tag}}}:g:{item}",  # namespace "NSx"
        f"{{x{namespace}:{tag}}}:g:{item}",
    ]
    if len(namespace) > 1:
        others.append(f"{{{namespace[:-1]}:{tag}}}:g:{item}")
    sync_client.flushdb()
    for key in (ours, *others):
        sync_client.set(key, b"v")
    matched = set(sync_client.scan_iter(match=grant_pattern(namespace), count=1000))
    assert matched == {ours.encode()}
