"""Token introspection (RFC 7662): what the Introspector sends, what it makes of every kind of
answer, and how it holds up under floods and outages. Every test crosses real HTTP to a scripted
introspection server served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from hashlib import sha256
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from asgi_delegation import _clock
from asgi_delegation._audit import Auditor
from asgi_delegation._claims import Common
from asgi_delegation._client_auth import ClientAuth, PrivateKeyJWT, SecretBasic, SecretPost
from asgi_delegation._discovery import Discovery
from asgi_delegation._http import HTTPClient
from asgi_delegation._introspection import MAX_BODY, NEGATIVE_TTL, Introspector
from asgi_delegation._loops import PerLoop
from asgi_delegation._refresh import Unavailable
from asgi_delegation._tokens import InvalidToken, ValidToken
from asgi_delegation.testing import loopback_socket, serve

from .conftest import Clock, read_body

RESOURCE = "http://127.0.0.1:8000/mcp"
OTHER_RESOURCE = "https://other.example/api"
CLIENT_ID = "mcp-server"
CLIENT_SECRET = "s3cr:t +/=%-introspection"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LEEWAY = 30.0
CACHE_TTL = 60.0
MISSING = object()


# -- the scripted introspection server ---------------------------------------------------------


@dataclass
class Reply:
    """One answer of the scripted server. ``body``: bytes as they are, anything else as JSON.
    ``chunks`` > 1 sends the body in that many parts without a Content-Length; ``drop`` breaks
    the connection after the first part; ``hold_body`` waits for the server's gate between the
    headers and the body."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 1
    drop: bool = False
    hold_body: bool = False


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    form: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def fields(self) -> dict[str, str]:
        names = [k for k, _ in self.form]
        assert len(names) == len(set(names)), "a form field was sent twice"
        return dict(self.form)


class Script:
    """An introspection endpoint at ``/introspect`` answering ``answer(form)``, and RFC 8414
    metadata at the root well-known URL naming it (``advertise=False``: naming none)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.endpoint = origin + "/introspect"
        self.answer: Callable[[dict[str, str]], Reply] = lambda form: Reply(body=active())
        self.advertise = True
        self.metadata_status = 200
        self.seen: list[Seen] = []  # introspection requests, in order of arrival
        self.paths: list[str] = []  # every request's path
        #: When not None, every introspection request waits for it before answering.
        self.gate: anyio.Event | None = None
        self.in_flight = 0
        self.peak = 0
        self._arrivals: list[tuple[int, anyio.Event]] = []
        self._crowds: list[tuple[int, anyio.Event]] = []

    def hold(self) -> anyio.Event:
        self.gate = anyio.Event()
        return self.gate

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def arrived(self, count: int) -> None:
        """Until ``count`` introspection requests have arrived."""
        if len(self.seen) < count:
            event = anyio.Event()
            self._arrivals.append((count, event))
            await event.wait()

    async def crowded(self, count: int) -> None:
        """Until ``count`` introspection requests are being answered at once."""
        if self.in_flight < count:
            event = anyio.Event()
            self._crowds.append((count, event))
            await event.wait()

    @staticmethod
    def _tell(waiters: list[tuple[int, anyio.Event]], value: int) -> None:
        for count, event in waiters:
            if value >= count:
                event.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        self.paths.append(path)
        if path == "/.well-known/oauth-authorization-server":
            document: dict[str, Any] = {
                "issuer": self.origin,
                "token_endpoint": self.origin + "/token",
            }
            if self.advertise:
                document["introspection_endpoint"] = self.endpoint
            await _send(send, Reply(self.metadata_status, document))
            return
        if path != "/introspect":
            await _send(send, Reply(404, {"error": "not_found"}))
            return
        body = await read_body(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        form = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
        seen = Seen(scope["method"], path, headers, form)
        self.seen.append(seen)
        self._tell(self._arrivals, len(self.seen))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self._tell(self._crowds, self.in_flight)
        try:
            reply = self.answer(dict(form))
            if self.gate is not None and not reply.hold_body:
                await self.gate.wait()
            await _send(send, reply, self.gate)
        finally:
            self.in_flight -= 1


async def _send(send: Any, reply: Reply, gate: anyio.Event | None = None) -> None:
    body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
    headers = {"content-type": "application/json", **reply.headers}
    if reply.chunks == 1 and not reply.drop:
        headers.setdefault("content-length", str(len(body)))
    elif reply.drop:
        headers["content-length"] = str(len(body) + 1000)
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": raw})
    if reply.hold_body and gate is not None:
        await gate.wait()
    size = max(1, math.ceil(len(body) / reply.chunks))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    if reply.drop:
        await send({"type": "http.response.body", "body": parts[0], "more_body": True})
        raise ConnectionAbortedError("the scripted server breaks the connection")
    for i, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})


def active(**changes: object) -> dict[str, Any]:
    """A well-formed answer for an active token, members changed (``MISSING`` removes one)."""
    now = int(_clock.now())
    body: dict[str, Any] = {
        "active": True,
        "sub": "alice",
        "aud": RESOURCE,
        "iss": "",  # the issuer: filled in by the fixture's default answer
        "scope": "read write",
        "client_id": "the-mcp-client",
        "token_type": "Bearer",
        "exp": now + 3600,
        "iat": now - 10,
    }
    for name, value in changes.items():
        if value is MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def script() -> AsyncIterator[Script]:
    with loopback_socket() as (sock, origin):
        server = Script(origin)
        server.answer = lambda form: Reply(body=active(iss=origin))
        async with serve(server, sock, lifespan="off"):
            try:
                yield server
            finally:
                server.release()  # a held request would keep uvicorn from stopping


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The FetchEvents logged so far, as dicts."""
    caplog.set_level(logging.DEBUG, logger="asgi_delegation.audit")  # a POST that worked: DEBUG

    def events() -> list[dict[str, Any]]:
        return [
            r.audit  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "audit_event", None) == "FetchEvent"
        ]

    return events


@dataclass
class Made:
    introspector: Introspector
    auditor: Auditor
    limiter: PerLoop[anyio.CapacityLimiter]


@pytest.fixture
async def make(script: Script) -> AsyncIterator[Callable[..., Made]]:
    """An Introspector for ``script``'s issuer, options overridden by keyword."""
    clients: list[HTTPClient] = []

    def factory(**options: Any) -> Made:
        http = options.pop("http", None) or HTTPClient(None, timeout=5.0)
        clients.append(http)
        auditor = Auditor(None)
        limiter = options.pop("limiter", None) or PerLoop(partial(anyio.CapacityLimiter, 8))
        issuer = options.pop("issuer", script.origin)
        settings: dict[str, Any] = {
            "issuer": issuer,
            "audiences": frozenset({RESOURCE}),
            "endpoint": script.endpoint,
            "discovery": Discovery(issuer, http, deadline=5.0, auditor=auditor),
            "http": http,
            "client_auth": SecretBasic(CLIENT_ID, CLIENT_SECRET),
            "leeway": LEEWAY,
            "cache_ttl": CACHE_TTL,
            "cache_size": 10_000,
            "limiter": limiter,
            "deadline": 5.0,
            "auditor": auditor,
            "common": Common({}),
        }
        settings.update(options)
        return Made(Introspector(**settings), auditor, limiter)

    yield factory
    for http in clients:
        await http.aclose()


def new_token() -> tuple[bytes, bytes]:
    token = secrets.token_urlsafe(32).encode()
    return token, sha256(token).digest()


async def outcome(introspector: Introspector, token: bytes) -> ValidToken | Exception:
    try:
        return await introspector.introspect(token, sha256(token).digest())
    except (InvalidToken, Unavailable) as exc:
        return exc


# -- the request -------------------------------------------------------------------------------


async def test_request_is_an_authenticated_form_post(
    script: Script, make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    made = make()
    token, digest = new_token()
    valid = await made.introspector.introspect(token, digest)
    (seen,) = script.seen
    assert (seen.method, seen.path) == ("POST", "/introspect")
    assert seen.fields == {"token": token.decode(), "token_type_hint": "access_token"}
    assert seen.header("content-type") == "application/x-www-form-urlencoded"
    assert seen.header("accept") == "application/json"
    scheme, _, credentials = (seen.header("authorization") or "").partition(" ")
    assert scheme == "Basic"
    client_id, _, secret = base64.b64decode(credentials).decode().partition(":")
    assert (unquote_plus(client_id), unquote_plus(secret)) == (CLIENT_ID, CLIENT_SECRET)
    assert valid.subject == "alice"
    assert valid.verified_by == "introspection"
    assert valid.issuer == script.origin
    assert valid.client_id == "the-mcp-client"
    assert valid.claims["sub"] == "alice"
    (event,) = audit()
    assert event["document"] == "introspection"
    assert (event["url"], event["method"], event["outcome"]) == (script.endpoint, "POST", "ok")
    assert made.auditor.stats.fetches["introspection ok"] == 1


async def test_client_secret_post(script: Script, make: Callable[..., Made]) -> None:
    made = make(client_auth=SecretPost(CLIENT_ID, CLIENT_SECRET))
    await made.introspector.introspect(*new_token())
    (seen,) = script.seen
    assert seen.header("authorization") is None
    assert seen.fields["client_id"] == CLIENT_ID
    assert seen.fields["client_secret"] == CLIENT_SECRET


async def test_private_key_jwt_assertion_is_for_the_introspection_endpoint(
    script: Script, make: Callable[..., Made]
) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "introspecting"})
    public = RSAKey.import_key(key.as_dict(private=False))
    made = make(client_auth=PrivateKeyJWT(CLIENT_ID, key))
    for _ in range(2):
        await made.introspector.introspect(*new_token())
    jtis = set()
    for seen in script.seen:
        fields = seen.fields
        assert seen.header("authorization") is None
        assert "client_secret" not in fields
        assert fields["client_id"] == CLIENT_ID
        assert fields["client_assertion_type"] == ASSERTION_TYPE
        assert fields["token_type_hint"] == "access_token"
        decoded = jwt.decode(fields["client_assertion"], public, algorithms=["RS256"])
        claims = decoded.claims
        assert decoded.header["kid"] == "introspecting"
        assert claims["aud"] == script.endpoint
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert 0 < claims["exp"] - claims["iat"] <= 120
        jtis.add(claims["jti"])
    assert len(jtis) == 2, "an assertion was replayed"


async def test_endpoint_from_the_issuer_metadata(script: Script, make: Callable[..., Made]) -> None:
    made = make(endpoint=None)
    valid = await made.introspector.introspect(*new_token())
    assert valid.subject == "alice"
    assert script.paths == ["/.well-known/oauth-authorization-server", "/introspect"]


async def test_configured_endpoint_needs_no_metadata(
    script: Script, make: Callable[..., Made]
) -> None:
    script.metadata_status = 500
    await make().introspector.introspect(*new_token())
    assert script.paths == ["/introspect"]


async def test_metadata_without_introspection_endpoint_is_unavailable(
    script: Script, make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    script.advertise = False
    made = make(endpoint=None)
    with pytest.raises(Unavailable):
        await made.introspector.introspect(*new_token())
    assert script.seen == []
    failed = [e for e in audit() if e["document"] == "introspection"]
    assert len(failed) == 1
    assert failed[0]["outcome"] == "failed"
    assert "introspection_endpoint" in failed[0]["detail"]


async def test_metadata_unavailable_is_unavailable(
    script: Script, make: Callable[..., Made]
) -> None:
    script.metadata_status = 503
    with pytest.raises(Unavailable) as caught:
        await make(endpoint=None).introspector.introspect(*new_token())
    assert caught.value.retry_after >= 1
    assert script.seen == []


async def test_non_ascii_token_is_malformed_and_never_sent(
    script: Script, make: Callable[..., Made]
) -> None:
    introspector = make().introspector
    for token in ("café".encode(), b"abc def", b"abc\r\nX: y", b""):
        with pytest.raises(InvalidToken) as caught:
            await introspector.introspect(token, sha256(token).digest())
        assert caught.value.reason == "malformed"
    assert script.seen == []


# -- what a valid answer becomes ---------------------------------------------------------------


async def test_lifetimes_with_a_distant_exp(script: Script, make: Callable[..., Made]) -> None:
    now = int(_clock.now())
    script.answer = lambda form: Reply(body=active(iss=script.origin, exp=now + 3600))
    valid = await make().introspector.introspect(*new_token())
    assert valid.usable_until == now + 3600 + LEEWAY
    assert valid.cache_until == pytest.approx(_clock.now() + CACHE_TTL, abs=5)


async def test_lifetimes_with_a_near_exp(script: Script, make: Callable[..., Made]) -> None:
    now = int(_clock.now())
    script.answer = lambda form: Reply(body=active(iss=script.origin, exp=now + 10))
    valid = await make().introspector.introspect(*new_token())
    assert valid.usable_until == valid.cache_until == now + 10 + LEEWAY


async def test_lifetimes_without_exp(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(body=active(iss=script.origin, exp=MISSING))
    before = _clock.now()
    valid = await make().introspector.introspect(*new_token())
    assert before + CACHE_TTL <= valid.usable_until <= _clock.now() + CACHE_TTL
    assert valid.cache_until == valid.usable_until


async def test_expired_within_leeway_is_still_valid(
    script: Script, make: Callable[..., Made]
) -> None:
    exp = int(_clock.now()) - LEEWAY / 2
    script.answer = lambda form: Reply(body=active(iss=script.origin, exp=exp))
    valid = await make().introspector.introspect(*new_token())
    assert valid.usable_until == exp + LEEWAY


async def test_scopes_come_from_scope_only(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(
        body=active(iss=script.origin, scope=" write  write\tadmin ", scp=["root"], scopes="x")
    )
    made = make(common=Common({"admin": frozenset({"read", "delete"})}))
    valid = await made.introspector.introspect(*new_token())
    assert valid.scopes == {"write", "admin"}
    assert valid.granted == {"write", "admin", "read", "delete"}


async def test_no_scope_is_no_scopes(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(body=active(iss=script.origin, scope=MISSING))
    valid = await make().introspector.introspect(*new_token())
    assert valid.scopes == frozenset()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"aud": [OTHER_RESOURCE, RESOURCE]}, id="aud-list-with-ours"),
        pytest.param({"aud": [RESOURCE]}, id="aud-list-of-one"),
        pytest.param({"aud": "https://second.example/mcp"}, id="aud-second-configured"),
        pytest.param({"iss": MISSING}, id="iss-absent"),
        pytest.param({"token_type": MISSING}, id="token_type-absent"),
        pytest.param({"token_type": "access_token"}, id="token_type-access_token"),
        pytest.param({"token_type": "N_A"}, id="token_type-N_A"),
        pytest.param({"nbf": "soon"}, id="nbf-within-leeway"),
        pytest.param({"iat": "soon"}, id="iat-within-leeway"),
        pytest.param({"iat": MISSING, "client_id": MISSING}, id="iat-and-client_id-absent"),
        pytest.param({"ext": {"nested": [1, {"deep": None}]}}, id="extension-member"),
        pytest.param({"sub": "ü" * 1024}, id="sub-1024-chars"),
    ],
)
async def test_accepted_answers(
    script: Script, make: Callable[..., Made], changes: dict[str, Any]
) -> None:
    # "soon": within the leeway from now.
    changes = {k: int(_clock.now()) + LEEWAY - 5 if v == "soon" else v for k, v in changes.items()}
    changes = {"iss": script.origin, **changes}
    script.answer = lambda form: Reply(body=active(**changes))
    made = make(audiences=frozenset({RESOURCE, "https://second.example/mcp"}))
    valid = await made.introspector.introspect(*new_token())
    assert valid.verified_by == "introspection"
    assert valid.subject == (changes.get("sub") or "alice")


async def test_valid_answers_are_not_cached_here(script: Script, make: Callable[..., Made]) -> None:
    introspector = make().introspector
    token, digest = new_token()
    await introspector.introspect(token, digest)
    await introspector.introspect(token, digest)
    assert len(script.seen) == 2  # the caller's TokenCache keeps them


async def test_claims_are_read_only(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(body=active(iss=script.origin, ext={"roles": ["a"]}))
    valid = await make().introspector.introspect(*new_token())
    with pytest.raises(TypeError):
        valid.claims["sub"] = "mallory"  # type: ignore[index]
    assert valid.claims["ext"]["roles"] == ("a",)


# -- hostile and odd answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Invalid:
    reason: str
    member: str | None = None


UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Raw:
    """A valid answer with members written verbatim (what json.dumps cannot write)."""

    literals: dict[str, str]

    def body(self, issuer: str) -> bytes:
        base = active(iss=issuer)
        for name in self.literals:
            base.pop(name, None)
        members = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in base.items()]
        members += [f"{json.dumps(k)}: {v}" for k, v in self.literals.items()]
        return ("{" + ", ".join(members) + "}").encode()


def raw(**literals: str) -> Raw:
    return Raw(literals)


@dataclass(frozen=True)
class Later:
    """Changes to a valid answer worked out when it is sent, from (issuer, now)."""

    changes: Callable[[str, float], dict[str, Any]]


def answer(
    body: bytes | dict[str, Any] | Raw | Later | None = None, status: int = 200, **options: Any
) -> Callable[[str, float], Reply]:
    """A Reply for a row: ``body`` is bytes as they are, changes to a valid answer (a dict, or
    a ``Later``), or a ``Raw`` answer; None: a valid answer."""

    def make(issuer: str, now: float) -> Reply:
        content: Any
        if body is None:
            content = active(iss=issuer)
        elif isinstance(body, bytes):
            content = body
        elif isinstance(body, Raw):
            content = body.body(issuer)
        elif isinstance(body, Later):
            content = active(**{"iss": issuer, **body.changes(issuer, now)})
        else:
            content = active(**{"iss": issuer, **body})
        return Reply(status, content, **options)

    return make


def row(reply: Callable[[str, float], Reply], expect: Invalid | str, id: str) -> Any:
    return pytest.param(reply, expect, id=id)


DEEP = b'{"active": true, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BIG = json.dumps({**active(), "padding": "x" * MAX_BODY}).encode()
REFRESH_URN = "urn:ietf:params:oauth:token-type:refresh_token"

ROWS = [
    # -- the answer's shape: the server's fault, a 503 ------------------------------------------
    row(answer(b"<html>Welcome</html>"), UNAVAILABLE, "not-json"),
    row(answer(b""), UNAVAILABLE, "empty-body"),
    row(answer(b"[]"), UNAVAILABLE, "json-array"),
    row(answer(b'"active"'), UNAVAILABLE, "json-string"),
    row(answer(b"null"), UNAVAILABLE, "json-null"),
    row(answer(b'{"active": true, "active": false}'), UNAVAILABLE, "duplicate-active"),
    row(answer(raw(sub='"alice", "sub": "mallory"')), UNAVAILABLE, "duplicate-sub"),
    row(answer(b'{"active": true, "sub": "\xff"}'), UNAVAILABLE, "not-utf8"),
    row(answer(DEEP), UNAVAILABLE, "nested-100000-deep"),
    row(answer({"active": MISSING}), UNAVAILABLE, "active-missing"),
    row(answer(b"{}"), UNAVAILABLE, "empty-object"),
    row(answer({"active": "true"}), UNAVAILABLE, "active-string"),
    row(answer({"active": 1}), UNAVAILABLE, "active-one"),
    row(answer({"active": None}), UNAVAILABLE, "active-null"),
    row(answer({"active": [True]}), UNAVAILABLE, "active-list"),
    row(answer({"sub": None}), UNAVAILABLE, "sub-null"),
    row(answer({"sub": 42}), UNAVAILABLE, "sub-number"),
    row(answer({"sub": ["alice"]}), UNAVAILABLE, "sub-list"),
    row(answer({"exp": "soon"}), UNAVAILABLE, "exp-string"),
    row(answer({"exp": None}), UNAVAILABLE, "exp-null"),
    row(answer({"exp": True}), UNAVAILABLE, "exp-true"),
    row(answer(raw(exp="1e999")), UNAVAILABLE, "exp-1e999"),
    row(answer(raw(exp="-1e999")), UNAVAILABLE, "exp-minus-1e999"),
    row(answer(raw(exp="NaN")), UNAVAILABLE, "exp-NaN"),
    row(answer(raw(exp="Infinity")), UNAVAILABLE, "exp-Infinity"),
    row(answer({"exp": 10**20}), UNAVAILABLE, "exp-huge-integer"),
    row(answer(raw(exp="9" * 5000)), UNAVAILABLE, "exp-5000-digits"),
    row(answer({"nbf": "yesterday"}), UNAVAILABLE, "nbf-string"),
    row(answer({"iat": [0]}), UNAVAILABLE, "iat-list"),
    row(answer({"scope": ["read", "write"]}), UNAVAILABLE, "scope-list"),
    row(answer({"scope": None}), UNAVAILABLE, "scope-null"),
    row(answer({"scope": 7}), UNAVAILABLE, "scope-number"),
    row(answer({"aud": 42}), UNAVAILABLE, "aud-number"),
    row(answer({"aud": None}), UNAVAILABLE, "aud-null"),
    row(answer({"aud": [RESOURCE, 1]}), UNAVAILABLE, "aud-list-with-number"),
    row(answer({"aud": {"aud": RESOURCE}}), UNAVAILABLE, "aud-object"),
    row(answer({"iss": 1}), UNAVAILABLE, "iss-number"),
    row(answer({"iss": None}), UNAVAILABLE, "iss-null"),
    row(answer({"client_id": 12}), UNAVAILABLE, "client_id-number"),
    row(answer({"token_type": ["Bearer"]}), UNAVAILABLE, "token_type-list"),
    row(answer({"username": False}), UNAVAILABLE, "username-false"),
    row(answer({"jti": {}}), UNAVAILABLE, "jti-object"),
    # The shape is judged before the verdict: a broken answer is never a 401.
    row(answer({"exp": "soon", "aud": "nobody"}), UNAVAILABLE, "broken-and-wrong-audience"),
    # -- the transport: the server's fault too --------------------------------------------------
    row(answer(BIG), UNAVAILABLE, "over-256KiB"),
    row(answer(BIG, chunks=40), UNAVAILABLE, "over-256KiB-chunked"),
    row(
        answer(gzip.compress(json.dumps(active()).encode()), headers={"content-encoding": "gzip"}),
        UNAVAILABLE,
        "gzip",
    ),
    row(answer(drop=True), UNAVAILABLE, "connection-dropped"),
    row(answer({"error": "server_error"}, 500), UNAVAILABLE, "HTTP-500"),
    row(answer(b"Bad Gateway", 502), UNAVAILABLE, "HTTP-502"),
    row(answer(b"", 503, headers={"retry-after": "3600"}), UNAVAILABLE, "HTTP-503"),
    row(answer({"error": "slow_down"}, 429), UNAVAILABLE, "HTTP-429"),
    row(answer({"error": "invalid_request"}, 400), UNAVAILABLE, "HTTP-400"),
    row(answer({"error": "invalid_client"}, 401), UNAVAILABLE, "HTTP-401"),
    row(answer({"error": "access_denied"}, 403), UNAVAILABLE, "HTTP-403"),
    row(answer(b"", 404), UNAVAILABLE, "HTTP-404"),
    row(answer(b"", 204), UNAVAILABLE, "HTTP-204-no-body"),
    # Only a 2xx answer is read, whatever another one's body says.
    row(answer(None, 400), UNAVAILABLE, "HTTP-400-saying-active"),
    row(answer(None, 404), UNAVAILABLE, "HTTP-404-saying-active"),
    row(answer(None, 500), UNAVAILABLE, "HTTP-500-saying-active"),
    row(answer({"active": False}, 503), UNAVAILABLE, "HTTP-503-saying-inactive"),
    row(answer(b"", 302, headers={"location": "/elsewhere"}), UNAVAILABLE, "HTTP-302"),
    row(answer(b"", 307, headers={"location": "/elsewhere"}), UNAVAILABLE, "HTTP-307"),
    # -- well-formed answers that disqualify the token: a 401 -----------------------------------
    row(answer(b'{"active": false}'), Invalid("inactive"), "inactive"),
    row(answer({"active": False}), Invalid("inactive"), "inactive-with-claims"),
    row(answer({"active": False, "exp": "soon"}), Invalid("inactive"), "inactive-rest-unread"),
    row(answer({"sub": MISSING}), Invalid("malformed", "sub"), "sub-missing"),
    row(answer({"sub": ""}), Invalid("malformed", "sub"), "sub-empty"),
    row(answer({"sub": "a" * 1025}), Invalid("malformed", "sub"), "sub-too-long"),
    row(answer({"aud": MISSING}), Invalid("wrong_audience"), "aud-missing"),
    row(answer({"aud": ""}), Invalid("wrong_audience"), "aud-empty-string"),
    row(answer({"aud": []}), Invalid("wrong_audience"), "aud-empty-list"),
    row(answer({"aud": OTHER_RESOURCE}), Invalid("wrong_audience"), "aud-other"),
    row(answer({"aud": [OTHER_RESOURCE, ""]}), Invalid("wrong_audience"), "aud-list-others"),
    row(answer({"aud": RESOURCE.upper()}), Invalid("wrong_audience"), "aud-case"),
    row(answer({"aud": RESOURCE + "/"}), Invalid("wrong_audience"), "aud-trailing-slash"),
    row(answer({"iss": "https://evil.example"}), Invalid("wrong_issuer"), "iss-other"),
    row(
        answer(Later(lambda i, n: {"iss": i + "/"})), Invalid("wrong_issuer"), "iss-trailing-slash"
    ),
    row(answer(Later(lambda i, n: {"iss": i.upper()})), Invalid("wrong_issuer"), "iss-case"),
    row(answer({"iss": ""}), Invalid("wrong_issuer"), "iss-empty"),
    row(answer(Later(lambda i, n: {"exp": n - 3600})), Invalid("expired"), "expired"),
    row(answer(Later(lambda i, n: {"exp": n - LEEWAY})), Invalid("expired"), "expired-at-leeway"),
    row(answer({"exp": 0}), Invalid("expired"), "exp-zero"),
    row(answer({"exp": -(2**52)}), Invalid("expired"), "exp-very-negative"),
    row(answer(Later(lambda i, n: {"nbf": n + 3600})), Invalid("not_yet_valid"), "nbf-future"),
    row(answer(Later(lambda i, n: {"iat": n + 3600})), Invalid("not_yet_valid"), "iat-future"),
    row(answer({"token_type": "refresh_token"}), Invalid("type", "token_type"), "refresh"),
    row(answer({"token_type": "Refresh_Token"}), Invalid("type", "token_type"), "refresh-case"),
    row(answer({"token_type": REFRESH_URN}), Invalid("type", "token_type"), "refresh-urn"),
    row(
        answer({"token_type": REFRESH_URN.upper()}),
        Invalid("type", "token_type"),
        "refresh-urn-upper",
    ),
    row(answer({"token_type": "DPoP"}), Invalid("type", "token_type"), "dpop-bound"),
    row(
        answer({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}),
        Invalid("type", "cnf"),
        "mtls-bound",
    ),
]


@pytest.mark.parametrize(("reply", "expect"), ROWS)
async def test_hostile_answers(
    script: Script,
    make: Callable[..., Made],
    audit: Callable[[], list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
    reply: Callable[[str, float], Reply],
    expect: Invalid | str,
) -> None:
    made = make()
    token, _ = new_token()
    script.answer = lambda form: reply(script.origin, int(_clock.now()))
    results = [await outcome(made.introspector, token) for _ in range(2)]
    for result in results:
        if expect == UNAVAILABLE:
            assert type(result) is Unavailable, result
            assert 1 <= result.retry_after <= 5
        else:
            assert isinstance(expect, Invalid)
            assert type(result) is InvalidToken, result
            assert (result.reason, result.member) == (expect.reason, expect.member)
    events = audit()
    if expect == UNAVAILABLE:
        # Never cached: each attempt asks again, and each is a failed FetchEvent.
        assert len(script.seen) == 2
        assert [e["outcome"] for e in events] == ["failed", "failed"]
        assert made.auditor.stats.fetches["introspection failed"] == 2
    else:
        # A verdict: remembered, so the replay did not reach the server.
        assert len(script.seen) == 1
        assert [e["outcome"] for e in events] == ["ok"]
    assert "/elsewhere" not in script.paths
    # No detail repeats what the server sent, nor the token or the secret.
    for text in [str(r) for r in results] + [e["detail"] or "" for e in events]:
        assert token.decode() not in text
        assert CLIENT_SECRET not in text
        assert "Welcome" not in text
        assert "mallory" not in text
    assert token.decode() not in caplog.text


@pytest.mark.parametrize(
    ("status", "detail"),
    [
        (500, "answered HTTP 500"),
        (503, "answered HTTP 503"),
        (429, "answered HTTP 429"),
        (404, "answered HTTP 404"),
        (400, "answered HTTP 400"),
        (401, "refused this middleware's client credentials (HTTP 401)"),
        (403, "refused this middleware's client credentials (HTTP 403)"),
        (302, "answered a redirect (HTTP 302), which is not followed"),
    ],
)
async def test_each_status_is_named_in_the_event(
    script: Script,
    make: Callable[..., Made],
    audit: Callable[[], list[dict[str, Any]]],
    status: int,
    detail: str,
) -> None:
    script.answer = lambda form: Reply(status, active(iss=script.origin))
    with pytest.raises(Unavailable):
        await make().introspector.introspect(*new_token())
    (event,) = audit()
    assert (event["outcome"], event["detail"]) == ("failed", detail)


async def test_redirect_is_not_followed(
    script: Script, make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    script.answer = lambda form: Reply(302, b"", {"location": script.origin + "/elsewhere"})
    with pytest.raises(Unavailable):
        await make().introspector.introspect(*new_token())
    assert script.paths == ["/introspect"]
    (event,) = audit()
    assert "redirect" in event["detail"]


async def test_2xx_with_a_valid_body_is_accepted(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(201, active(iss=script.origin))
    valid = await make().introspector.introspect(*new_token())
    assert valid.subject == "alice"


async def test_exactly_256KiB_is_read(script: Script, make: Callable[..., Made]) -> None:
    body = json.dumps(active(iss=script.origin, padding="")).encode()
    padded = body.replace(b'"padding": ""', b'"padding": "' + b"x" * (MAX_BODY - len(body)) + b'"')
    assert len(padded) == MAX_BODY
    script.answer = lambda form: Reply(body=padded, chunks=7)
    valid = await make().introspector.introspect(*new_token())
    assert len(valid.claims["padding"]) == MAX_BODY - len(body)


# -- the negative cache ------------------------------------------------------------------------


async def test_negative_cache_forgets_after_its_ttl(
    script: Script, make: Callable[..., Made], clock: Clock
) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make().introspector
    token, digest = new_token()
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await introspector.introspect(token, digest)
    assert len(script.seen) == 1
    clock.advance(NEGATIVE_TTL - 0.5)
    with pytest.raises(InvalidToken):
        await introspector.introspect(token, digest)
    assert len(script.seen) == 1
    clock.advance(1)
    # Active by now: nothing stale is served.
    script.answer = lambda form: Reply(body=active(iss=script.origin))
    assert (await introspector.introspect(token, digest)).subject == "alice"
    assert len(script.seen) == 2


async def test_negative_cache_is_bounded_oldest_out(
    script: Script, make: Callable[..., Made]
) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make(cache_size=3).introspector
    tokens = [new_token() for _ in range(4)]
    for token, digest in tokens:
        with pytest.raises(InvalidToken):
            await introspector.introspect(token, digest)
    assert len(script.seen) == 4
    for token, digest in tokens[1:]:  # still remembered
        with pytest.raises(InvalidToken):
            await introspector.introspect(token, digest)
    assert len(script.seen) == 4
    with pytest.raises(InvalidToken):  # pushed out by the fourth
        await introspector.introspect(*tokens[0])
    assert len(script.seen) == 5
    assert len(introspector._negative) == 3


async def test_negative_cache_lets_expired_entries_go(
    script: Script, make: Callable[..., Made], clock: Clock
) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make().introspector
    for _ in range(20):
        with pytest.raises(InvalidToken):
            await introspector.introspect(*new_token())
    assert len(introspector._negative) == 20
    clock.advance(NEGATIVE_TTL)
    with pytest.raises(InvalidToken):
        await introspector.introspect(*new_token())
    assert len(introspector._negative) == 1  # not 21: an attack's old tokens do not pile up


async def test_negative_cache_is_keyed_by_digest(script: Script, make: Callable[..., Made]) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make().introspector
    token, digest = new_token()
    with pytest.raises(InvalidToken):
        await introspector.introspect(token, digest)
    assert list(introspector._negative) == [digest]
    assert all(token.decode() not in repr(entry) for entry in introspector._negative.values())


# -- floods ------------------------------------------------------------------------------------


async def _crowd(introspector: Introspector, token: bytes, count: int) -> list[Any]:
    results: list[Any] = [None] * count

    async def one(i: int) -> None:
        results[i] = await outcome(introspector, token)

    async with anyio.create_task_group() as tasks:
        for i in range(count):
            tasks.start_soon(one, i)
    return results


@pytest.mark.parametrize(
    "verdict",
    [
        pytest.param(lambda issuer: Reply(body=active(iss=issuer)), id="valid"),
        pytest.param(lambda issuer: Reply(body={"active": False}), id="inactive"),
        pytest.param(lambda issuer: Reply(500, b"down"), id="unavailable"),
    ],
)
async def test_100_concurrent_introspections_of_one_token_send_one_request(
    script: Script, make: Callable[..., Made], verdict: Callable[[str], Reply]
) -> None:
    introspector = make().introspector
    token, _ = new_token()
    script.answer = lambda form: verdict(script.origin)
    gate = script.hold()
    async with anyio.create_task_group() as tasks:
        results: list[Any] = []

        async def crowd() -> None:
            results.extend(await _crowd(introspector, token, 100))

        tasks.start_soon(crowd)
        await script.arrived(1)  # every caller has joined by the time the request arrives
        gate.set()
    assert len(script.seen) == 1
    assert len(results) == 100
    first = results[0]
    assert all(r is first for r in results), "every waiter gets the one result or exception"
    assert isinstance(first, ValidToken | InvalidToken | Unavailable)


async def test_50_bad_tokens_replayed_3_times_send_50_requests(
    script: Script, make: Callable[..., Made], clock: Clock
) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make().introspector
    tokens = [new_token()[0] for _ in range(50)]
    results: list[Any] = []

    async def one(token: bytes) -> None:
        results.append(await outcome(introspector, token))

    for _ in range(3):
        async with anyio.create_task_group() as tasks:
            for token in tokens:
                tasks.start_soon(one, token)
    assert len(results) == 150
    assert all(isinstance(r, InvalidToken) and r.reason == "inactive" for r in results)
    assert len(script.seen) == 50
    assert {s.fields["token"] for s in script.seen} == {t.decode() for t in tokens}
    clock.advance(NEGATIVE_TTL)
    async with anyio.create_task_group() as tasks:
        for token in tokens:
            tasks.start_soon(one, token)
    assert len(script.seen) == 100


async def test_concurrency_is_bounded_by_the_limiter(
    script: Script, make: Callable[..., Made]
) -> None:
    made = make(limiter=PerLoop(partial(anyio.CapacityLimiter, 3)))
    gate = script.hold()
    tokens = [new_token()[0] for _ in range(20)]
    results: list[Any] = []

    async def one(token: bytes) -> None:
        results.append(await outcome(made.introspector, token))

    async with anyio.create_task_group() as tasks:
        for token in tokens:
            tasks.start_soon(one, token)
        await script.crowded(3)
        await anyio.wait_all_tasks_blocked()
        statistics = made.limiter.get().statistics()
        assert statistics.borrowed_tokens == 3
        assert statistics.tasks_waiting == 17
        gate.set()
    assert all(isinstance(r, ValidToken) for r in results), results
    assert len(script.seen) == 20
    assert script.peak == 3


async def test_limiter_slot_is_waited_for_within_the_deadline(
    script: Script, make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    limiter = PerLoop(partial(anyio.CapacityLimiter, 1))
    quick = make(limiter=limiter, deadline=0.3).introspector
    async with limiter.get():  # an exchange holds the only slot
        # fail_after: a wait for the slot beyond the deadline fails the test, not hangs it.
        with anyio.fail_after(5), pytest.raises(Unavailable):
            await quick.introspect(*new_token())
    assert script.seen == []
    (event,) = audit()
    assert event["detail"] == (
        "not sent: the limit of 1 concurrent requests to the authorization server was reached "
        "for all of 0.3 s"
    )
    # Once the slot is free, a waiting introspection goes out.
    patient = make(limiter=limiter).introspector
    results: list[Any] = []
    async with anyio.create_task_group() as tasks, limiter.get():

        async def one() -> None:
            results.append(await outcome(patient, new_token()[0]))

        tasks.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        assert limiter.get().statistics().tasks_waiting == 1
        assert script.seen == []
    assert isinstance(results[0], ValidToken)
    assert len(script.seen) == 1


# -- outages -----------------------------------------------------------------------------------


async def test_server_down(
    make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    with loopback_socket() as (_, origin):
        pass  # closed: nothing listens there any more
    made = make(endpoint=origin + "/introspect")
    with pytest.raises(Unavailable):
        await made.introspector.introspect(*new_token())
    (event,) = audit()
    assert event["url"] == origin + "/introspect"
    assert event["detail"] == "could not be reached (ConnectError)"


@pytest.mark.parametrize("hold_body", [False, True], ids=["no-headers", "no-body"])
async def test_slow_server_is_unavailable_after_the_deadline(
    script: Script,
    make: Callable[..., Made],
    audit: Callable[[], list[dict[str, Any]]],
    hold_body: bool,
) -> None:
    script.hold()  # never set within the test
    script.answer = lambda form: Reply(body=active(iss=script.origin), hold_body=hold_body)
    made = make(deadline=0.25)
    started = anyio.current_time()
    with anyio.fail_after(2), pytest.raises(Unavailable):
        await made.introspector.introspect(*new_token())
    assert anyio.current_time() - started < 1
    assert len(script.seen) == 1
    (event,) = audit()
    assert event["detail"] == "no answer within 0.25 s"


async def test_retry_after_backs_off_and_resets(script: Script, make: Callable[..., Made]) -> None:
    introspector = make().introspector
    script.answer = lambda form: Reply(500, b"")
    delays = []
    for _ in range(5):
        result = await outcome(introspector, new_token()[0])
        assert isinstance(result, Unavailable)
        delays.append(result.retry_after)
    assert delays == [1, 2, 4, 5, 5]
    script.answer = lambda form: Reply(body=active(iss=script.origin))
    await introspector.introspect(*new_token())
    script.answer = lambda form: Reply(500, b"")
    result = await outcome(introspector, new_token()[0])
    assert isinstance(result, Unavailable)
    assert result.retry_after == 1


async def test_client_credentials_that_fail_are_unavailable(
    script: Script, make: Callable[..., Made], audit: Callable[[], list[dict[str, Any]]]
) -> None:
    class Broken:
        client_id = CLIENT_ID

        async def apply(self, form: dict[str, str], headers: dict[str, str], url: str) -> None:
            raise RuntimeError(f"cannot sign for {form['token']}")

        def secrets(self) -> tuple[str, ...]:
            return ()

    broken: ClientAuth = Broken()
    token, digest = new_token()
    with pytest.raises(Unavailable) as caught:
        await make(client_auth=broken).introspector.introspect(token, digest)
    assert script.seen == []
    (event,) = audit()
    assert event["detail"] == "the client credentials failed (RuntimeError)"
    assert token.decode() not in str(caught.value)


# -- cancellation ------------------------------------------------------------------------------


async def test_a_cancelled_caller_does_not_cancel_the_shared_request(
    script: Script, make: Callable[..., Made]
) -> None:
    introspector = make().introspector
    token, digest = new_token()
    gate = script.hold()
    leader = anyio.CancelScope()
    results: list[Any] = []

    async def first() -> None:
        with leader:
            await introspector.introspect(token, digest)
            results.append("the cancelled caller went on")

    async def second() -> None:
        results.append(await introspector.introspect(token, digest))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        tasks.start_soon(second)
        await script.arrived(1)
        leader.cancel()
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert leader.cancelled_caught
    (valid,) = results
    assert isinstance(valid, ValidToken)
    assert len(script.seen) == 1


async def test_a_verdict_lands_when_every_caller_has_gone(
    script: Script, make: Callable[..., Made]
) -> None:
    script.answer = lambda form: Reply(body={"active": False})
    introspector = make().introspector
    token, digest = new_token()
    gate = script.hold()
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tasks:

        async def only() -> None:
            with scope:
                await introspector.introspect(token, digest)

        tasks.start_soon(only)
        await script.arrived(1)
        scope.cancel()
    assert scope.cancelled_caught
    flight = introspector._flight._flights[digest]
    assert not flight.done()
    gate.set()
    with anyio.fail_after(5):
        await asyncio.wait({flight})
    assert digest in introspector._negative
    with pytest.raises(InvalidToken):
        await introspector.introspect(token, digest)
    assert len(script.seen) == 1


# -- secrets -----------------------------------------------------------------------------------


class LeakyTransport(httpx.AsyncHTTPTransport):
    """Sends the request for real, then fails with the request in its message, as a
    transport's error may: an httpx error, or (``kind``) any other exception."""

    def __init__(self, kind: type[Exception]) -> None:
        super().__init__()
        self.kind = kind

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        await response.aclose()
        raise self.kind(f"bad answer to {request.content!r} {request.headers!r}")


async def test_nothing_secret_reaches_logs_events_or_exceptions(
    script: Script, make: Callable[..., Made], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, _ = new_token()
    echo = token.decode() + " " + CLIENT_SECRET
    answers = [
        Reply(500, echo.encode()),
        Reply(401, {"error": "invalid_client", "error_description": echo}),
        Reply(200, b"not json " + echo.encode()),
        Reply(302, b"", {"location": "/elsewhere?" + token.decode()}),
        Reply(200, {"active": True, "sub": echo, "aud": echo}),
    ]
    texts: list[str] = []
    made = make()
    for reply in answers:
        script.answer = partial(lambda reply, form: reply, reply)
        result = await outcome(made.introspector, token)
        texts += [str(result), repr(result)]
    for kind in (httpx.RemoteProtocolError, RuntimeError):
        leaky = httpx.AsyncClient(transport=LeakyTransport(kind))
        try:
            result = await outcome(make(http=HTTPClient(leaky, timeout=5)).introspector, token)
        finally:
            await leaky.aclose()
        assert isinstance(result, Unavailable)
        texts += [str(result), repr(result)]
    texts.append(repr(made.introspector))
    # The package's own records; httpcore's DEBUG records quote what the server sent back
    # (the redirect's Location here), which is no more secret than the server makes it.
    ours = [r for r in caplog.records if r.name.startswith("asgi_delegation")]
    assert ours
    texts += [r.getMessage() for r in ours]
    texts += [json.dumps(getattr(r, "audit", None)) for r in ours]
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    for text in texts:
        assert token.decode() not in text
        assert CLIENT_SECRET not in text
        assert basic[:20] not in text
    for record in caplog.records:  # no request's credentials in anyone's records
        assert CLIENT_SECRET not in record.getMessage()
        assert basic[:20] not in record.getMessage()
    assert len(script.seen) == 7  # the leaky transports' requests reached the server too
