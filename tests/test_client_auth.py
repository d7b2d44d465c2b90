"""Client authentication at the token endpoint (RFC 6749 2.3, RFC 7523): every method through a
real exchange against the local server, which checks the credentials; configuration errors;
secrets kept out of ``repr``; an unreadable client assertion file."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, unquote_plus

import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey

from asgi_delegation import ConfigurationError
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import GITHUB, GOOGLE, SLACK, Gateway, exchanger_of, read_body

#: Every character that needs care: ':' separates id and secret in Basic, ' ', '+', '/', '=' and
#: '%' are special in form encoding and base64, and a non-ASCII letter.
CLIENT = "svc:tools mcp+/=%é"
SECRET = "s3:cr et+/=%ü-7Kq"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- a recording front for the server ----------------------------------------------------------


class Recorder:
    """An ASGI front for the local server: records every token request's headers and form (the
    server's ``exchanges`` has no headers); ``fail_after_processing`` turns the server's next
    answers into 503s *after* the server has seen the request (a proxy timing out, say)."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.fail_after_processing = 0
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/token":
            await self.auth(scope, receive, send)
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append((headers, dict(parse_qsl(body.decode()))))

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        if self.fail_after_processing:
            self.fail_after_processing -= 1

            async def swallow(message: Any) -> None:
                pass

            await self.auth(scope, replay, swallow)
            await send(
                {"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"0")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await self.auth(scope, replay, send)


@pytest.fixture
async def recorder(auth: LocalAuthorizationServer) -> AsyncIterator[Recorder]:
    front = Recorder(auth)
    yield front
    await front.client.aclose()


# -- helpers -----------------------------------------------------------------------------------


def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "client-rsa-1"})


def ec_key() -> ECKey:
    return ECKey.generate_key("P-256")


def public(key: RSAKey | ECKey) -> RSAKey | ECKey:
    return type(key).import_key(key.as_dict(private=False))


def decode(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, unverified."""

    def part(segment: str) -> dict[str, Any]:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        assert isinstance(value, dict)
        return value

    header, payload, _ = jwt.split(".")
    return part(header), part(payload)


def assertion(auth: LocalAuthorizationServer, key: ECKey, client_id: str = CLIENT) -> str:
    """A client assertion (RFC 7523 3) for ``client_id`` signed with ``key``, with a new jti."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": auth.token_endpoint,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 300,
    }
    return LocalAuthorizationServer.sign({"alg": "ES256", "typ": "JWT"}, claims, key)


def replace(path: Path, text: str) -> None:
    """Replace ``path`` atomically, as kubelet does with projected service account tokens."""
    staging = path.with_name(path.name + ".new")
    staging.write_text(text)
    os.replace(staging, path)


async def exchanged(gateway: Gateway, token: str, resource: str) -> dict[str, Any]:
    document = await gateway.exchange(token, resource)
    assert "error" not in document, document["error"]
    (grant,) = document["grants"]
    assert (grant["sub"], grant["aud"], grant["resource"]) == ("alice", resource, resource)
    return dict(grant)


def assert_fresh_assertions(forms: list[dict[str, str]], endpoint: str, alg: str) -> None:
    jtis = set()
    for form in forms:
        assert form["client_id"] == CLIENT
        assert form["client_assertion_type"] == ASSERTION_TYPE
        assert "client_secret" not in form
        header, claims = decode(form["client_assertion"])
        assert header["alg"] == alg
        assert claims["iss"] == claims["sub"] == CLIENT
        assert claims["aud"] == endpoint
        assert isinstance(claims["jti"], str)
        assert len(claims["jti"]) >= 16
        jtis.add(claims["jti"])
        assert claims["exp"] > time.time()
        assert 0 < claims["exp"] - claims["iat"] <= 120
    assert len(jtis) == len(forms), "a jti was sent twice"


# -- each method, end to end -------------------------------------------------------------------


async def test_client_secret_basic(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    recorder: Recorder,
    token: str,
) -> None:
    auth.register_client(CLIENT, secret=SECRET)
    gateway = gateway_factory(client_id=CLIENT, client_secret=SECRET, http_client=recorder.client)
    await exchanged(gateway, token, GITHUB)  # the server accepted the Basic credentials
    form = auth.exchanges[-1]
    assert not {"client_id", "client_secret", "client_assertion"} & form.keys()
    headers, _ = recorder.requests[-1]
    scheme, _, credentials = headers["authorization"].partition(" ")
    assert scheme == "Basic"
    pair = base64.b64decode(credentials, validate=True).decode("ascii")
    encoded_id, colon, encoded_secret = pair.partition(":")
    assert colon
    # RFC 6749 2.3.1: form-urlencoded (UTF-8) before base64, so ':' cannot split them wrongly.
    assert encoded_id == quote_plus(CLIENT, safe="")
    assert encoded_secret == quote_plus(SECRET, safe="")
    assert (unquote_plus(encoded_id), unquote_plus(encoded_secret)) == (CLIENT, SECRET)


async def test_client_secret_post(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    recorder: Recorder,
    token: str,
) -> None:
    auth.register_client(CLIENT, secret=SECRET)
    gateway = gateway_factory(
        client_id=CLIENT,
        client_secret=SECRET,
        client_auth="client_secret_post",
        http_client=recorder.client,
    )
    await exchanged(gateway, token, GITHUB)
    form = auth.exchanges[-1]
    assert (form["client_id"], form["client_secret"]) == (CLIENT, SECRET)
    assert "client_assertion" not in form
    headers, _ = recorder.requests[-1]
    assert "authorization" not in headers


@pytest.mark.parametrize(("make_key", "alg"), [(rsa_key, "RS256"), (ec_key, "ES256")])
async def test_private_key_jwt(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    recorder: Recorder,
    token: str,
    make_key: Callable[[], RSAKey | ECKey],
    alg: str,
) -> None:
    key = make_key()
    auth.register_client(CLIENT, public_key=public(key))
    gateway = gateway_factory(
        client_id=CLIENT, private_key=key.as_dict(private=True), http_client=recorder.client
    )
    for resource in (GITHUB, GOOGLE, SLACK):
        await exchanged(gateway, token, resource)
    assert_fresh_assertions(auth.exchanges[-3:], auth.token_endpoint, alg)
    assert all("authorization" not in headers for headers, _ in recorder.requests)
    header, _ = decode(auth.exchanges[-1]["client_assertion"])
    assert header.get("kid") == key.kid


async def test_private_key_jwt_with_a_joserfc_key(
    auth: LocalAuthorizationServer, gateway_factory: Callable[..., Gateway], token: str
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    gateway = gateway_factory(client_id=CLIENT, private_key=key)
    await exchanged(gateway, token, GITHUB)
    await exchanged(gateway, token, GOOGLE)
    assert_fresh_assertions(auth.exchanges[-2:], auth.token_endpoint, "ES256")


async def test_private_key_jwt_retry_sends_a_fresh_assertion(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    recorder: Recorder,
    token: str,
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    gateway = gateway_factory(
        client_id=CLIENT,
        private_key=key.as_dict(private=True),
        http_client=recorder.client,
        exchange_attempts=2,
    )
    # The server sees the first request (and its jti), but the answer is lost to a 503.
    recorder.fail_after_processing = 1
    document = await gateway.exchange(token, GITHUB)
    assert len(recorder.requests) == 2
    first, second = (form["client_assertion"] for _, form in recorder.requests)
    assert decode(first)[1]["jti"] != decode(second)[1]["jti"]
    assert document["grants"][0]["sub"] == "alice"


# -- a client assertion file -------------------------------------------------------------------


async def test_client_assertion_file_is_re_read_when_replaced(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    tmp_path: Path,
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    path = tmp_path / "token"
    first = assertion(auth, key)
    path.write_text(first + "\n")
    gateway = gateway_factory(client_id=CLIENT, client_assertion_file=path)
    await exchanged(gateway, token, GITHUB)
    form = auth.exchanges[-1]
    assert (form["client_id"], form["client_assertion_type"]) == (CLIENT, ASSERTION_TYPE)
    assert form["client_assertion"] == first
    assert "client_secret" not in form

    second = assertion(auth, key)
    replace(path, second)
    await exchanged(gateway, token, GOOGLE)  # another resource: not a cache hit
    assert auth.exchanges[-1]["client_assertion"] == second

    # Not replaced: the same assertion again, and the server refuses a jti it has seen.
    document = await gateway.exchange(token, SLACK)
    assert auth.exchanges[-1]["client_assertion"] == second
    assert document["error"]["class"] == "ExchangeDenied"
    assert document["error"]["error"] == "invalid_client"


async def test_client_assertion_file_rewritten_in_place(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    tmp_path: Path,
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    path = tmp_path / "token"
    path.write_text(assertion(auth, key))
    gateway = gateway_factory(client_id=CLIENT, client_assertion_file=str(path))
    await exchanged(gateway, token, GITHUB)
    second = assertion(auth, key)
    path.write_text(second)  # same inode, new mtime
    await exchanged(gateway, token, GOOGLE)
    assert auth.exchanges[-1]["client_assertion"] == second


async def test_client_assertion_file_rewritten_within_one_timestamp_tick(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    tmp_path: Path,
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    path = tmp_path / "token"
    first = assertion(auth, key)
    path.write_text(first)
    gateway = gateway_factory(client_id=CLIENT, client_assertion_file=path)
    await exchanged(gateway, token, GITHUB)
    stat = path.stat()
    second = assertion(auth, key)
    while len(second) != len(first):  # ES256 signatures are fixed-size; iat may tick over
        second = assertion(auth, key)
    path.write_text(second)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    document = await gateway.exchange(token, GOOGLE)
    assert auth.exchanges[-1]["client_assertion"] == second
    assert "error" not in document


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"eyJ\xff\xfe.invalid")


def _too_large(path: Path) -> None:
    path.write_text("A" * (64 * 1024 + 1))


@pytest.mark.parametrize("spoil", [_missing, _directory, _not_utf8, _too_large])
async def test_unreadable_assertion_file(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    tmp_path: Path,
    spoil: Callable[[Path], None],
) -> None:
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    path = tmp_path / "token"
    spoil(path)
    gateway = gateway_factory(client_id=CLIENT, client_assertion_file=path)
    document = await gateway.exchange(token, GITHUB)  # answered: no crash
    error = document["error"]
    assert (error["class"], error["error"]) == ("ExchangeUnavailable", "temporarily_unavailable")
    assert "A" * 100 not in (error["description"] or "")
    assert auth.requests["/token"] == 0  # nothing was sent without credentials

    # The file turns up (a failure is not cached): the next exchange uses it.
    if path.is_dir():
        path.rmdir()
    good = assertion(auth, key)
    replace(path, good)
    await exchanged(gateway, token, GITHUB)
    assert auth.exchanges[-1]["client_assertion"] == good


# -- wrong credentials -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize(
    ("client_id", "secret"),
    [(CLIENT, SECRET + "x"), (CLIENT, SECRET.upper()), (CLIENT + "x", SECRET)],
    ids=["wrong-secret", "wrong-case", "unknown-client"],
)
async def test_wrong_secret_is_invalid_client(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    method: str,
    client_id: str,
    secret: str,
) -> None:
    auth.register_client(CLIENT, secret=SECRET)
    gateway = gateway_factory(client_id=client_id, client_secret=secret, client_auth=method)
    document = await gateway.exchange(token, GITHUB)
    assert (document["error"]["class"], document["error"]["error"]) == (
        "ExchangeDenied",
        "invalid_client",
    )
    assert secret not in json.dumps(document, ensure_ascii=False)
    assert auth.requests["/token"] == 1  # a denial is not retried


async def test_unregistered_key_is_invalid_client(
    auth: LocalAuthorizationServer, gateway_factory: Callable[..., Gateway], token: str
) -> None:
    auth.register_client(CLIENT, public_key=public(ec_key()))
    gateway = gateway_factory(client_id=CLIENT, private_key=ec_key().as_dict(private=True))
    document = await gateway.exchange(token, GITHUB)
    assert (document["error"]["class"], document["error"]["error"]) == (
        "ExchangeDenied",
        "invalid_client",
    )


# -- credentials from the environment ----------------------------------------------------------


async def test_credentials_from_the_environment(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    recorder: Recorder,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYCARD_CLIENT_ID", CLIENT)
    monkeypatch.setenv("KEYCARD_CLIENT_SECRET", SECRET)
    auth.register_client(CLIENT, secret=SECRET)
    gateway = gateway_factory(client_id=None, client_secret=None, http_client=recorder.client)
    client_auth = exchanger_of(gateway.middleware)._client_auth
    assert client_auth is not None
    assert client_auth.client_id == CLIENT
    assert type(client_auth).__name__ == "SecretBasic"
    await exchanged(gateway, token, GITHUB)
    headers, _ = recorder.requests[-1]
    pair = base64.b64decode(headers["authorization"].removeprefix("Basic ")).decode()
    assert pair == f"{quote_plus(CLIENT, safe='')}:{quote_plus(SECRET, safe='')}"


async def test_arguments_win_over_the_environment(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYCARD_CLIENT_ID", "someone-else")
    monkeypatch.setenv("KEYCARD_CLIENT_SECRET", "not-the-secret")
    auth.register_client(CLIENT, secret=SECRET)
    gateway = gateway_factory(client_id=CLIENT, client_secret=SECRET)
    await exchanged(gateway, token, GITHUB)


async def test_environment_secret_is_not_mixed_with_a_private_key(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYCARD_CLIENT_ID", CLIENT)
    monkeypatch.setenv("KEYCARD_CLIENT_SECRET", SECRET)
    key = ec_key()
    auth.register_client(CLIENT, public_key=public(key))
    gateway = gateway_factory(client_id=None, private_key=key.as_dict(private=True))
    await exchanged(gateway, token, GITHUB)
    form = auth.exchanges[-1]
    assert "client_secret" not in form
    assert form["client_id"] == CLIENT


# -- configuration errors ----------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYCARD_CLIENT_ID", raising=False)
    monkeypatch.delenv("KEYCARD_CLIENT_SECRET", raising=False)


RSA = rsa_key()
EC = ec_key()
PRIVATE_PARTS = [
    str(RSA.as_dict(private=True)[name]) for name in ("d", "p", "q", "dp", "dq", "qi")
] + [str(EC.as_dict(private=True)["d"])]


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"client_id": None, "client_secret": SECRET}, id="secret-without-client_id"),
        pytest.param(
            {"client_id": None, "private_key": EC.as_dict(private=True)},
            id="key-without-client_id",
        ),
        pytest.param(
            {"client_id": None, "client_assertion_file": "/var/run/token"},
            id="file-without-client_id",
        ),
        pytest.param({"client_auth": "private_key_jwt"}, id="private_key_jwt-without-a-key"),
        pytest.param(
            {"private_key": EC.as_dict(private=True), "client_assertion_file": "/var/run/token"},
            id="key-and-file",
        ),
        pytest.param(
            {"client_auth": "client_secret_jwt"}, id="unknown-client_auth-client_secret_jwt"
        ),
        pytest.param({"client_auth": "tls_client_auth"}, id="unknown-client_auth-tls"),
        pytest.param({"client_auth": "none"}, id="unknown-client_auth-none"),
        pytest.param({"client_auth": "Client_Secret_Basic"}, id="unknown-client_auth-case"),
        pytest.param({"private_key": RSA.as_dict(private=False)}, id="public-rsa-jwk"),
        pytest.param({"private_key": EC.as_dict(private=False)}, id="public-ec-jwk"),
        pytest.param({"private_key": public(RSA)}, id="public-joserfc-key"),
        pytest.param({"private_key": {"kty": "oct", "k": "c2VjcmV0"}}, id="symmetric-jwk"),
        pytest.param({"private_key": {"kty": "RSA", "n": "AQAB"}}, id="malformed-jwk"),
        pytest.param({"private_key": "-----BEGIN PRIVATE KEY-----"}, id="pem-string"),
        pytest.param(
            {"private_key": ECKey.generate_key("secp256k1").as_dict(private=True)},
            id="curve-without-a-default-alg",
        ),
        pytest.param(
            {"client_auth": "client_secret_post", "private_key": EC.as_dict(private=True)},
            id="post-without-a-secret",
        ),
        pytest.param({"client_secret": ""}, id="empty-secret"),
    ],
)
def test_configuration_errors(
    gateway_factory: Callable[..., Gateway], options: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        gateway_factory(**options)
    message = str(caught.value)
    assert SECRET not in message
    assert not any(part in message for part in PRIVATE_PARTS)


# -- repr ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"client_secret": SECRET}, "SecretBasic"),
        ({"client_secret": SECRET, "client_auth": "client_secret_post"}, "SecretPost"),
        ({"private_key": RSA.as_dict(private=True)}, "PrivateKeyJWT"),
        ({"private_key": EC}, "PrivateKeyJWT"),
        ({"client_assertion_file": "ASSERTION"}, "AssertionFile"),
    ],
    ids=["basic", "post", "rsa-jwk", "ec-key", "assertion-file"],
)
async def test_repr_shows_no_secret(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    tmp_path: Path,
    options: dict[str, Any],
    kind: str,
) -> None:
    auth.register_client(CLIENT, secret=SECRET, public_key=public(RSA))
    written = ""
    if options.get("client_assertion_file") == "ASSERTION":
        auth.register_client(CLIENT, public_key=public(EC))
        path = tmp_path / "token"
        written = assertion(auth, EC)
        path.write_text(written)
        options = {"client_assertion_file": path}
    elif "private_key" in options and options["private_key"] is EC:
        auth.register_client(CLIENT, public_key=public(EC))
    gateway = gateway_factory(client_id=CLIENT, **options)
    await exchanged(gateway, token, GITHUB)  # credentials in use: loaded, headers built
    client_auth = exchanger_of(gateway.middleware)._client_auth
    assert type(client_auth).__name__ == kind
    basic = base64.b64encode(
        f"{quote_plus(CLIENT, safe='')}:{quote_plus(SECRET, safe='')}".encode()
    ).decode()
    forbidden = [SECRET, quote_plus(SECRET, safe=""), basic, *PRIVATE_PARTS]
    if written:
        forbidden += [written, written.split(".")[2]]
    for shown in (repr(client_auth), str(client_auth), repr(gateway.middleware._exchanger)):
        assert CLIENT in shown or shown.startswith("<")
        for secret in forbidden:
            assert secret not in shown
