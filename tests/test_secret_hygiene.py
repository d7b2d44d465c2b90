"""Secret hygiene: whatever happens, nothing the middleware logs, reports, counts, raises or
answers holds a token, a grant, a client secret, a client assertion or private key material.

Every flow runs (valid and rejected tokens of every kind, exchanges granted, denied by a server
that echoes the request back, unavailable, dropped, not allowed, refreshed in the background,
discovery and JWKS failures) with every client authentication method, every logger at DEBUG
and an ``on_audit`` callback; then all that came out is searched for the secrets, whole and in
pieces (any 16 characters of a signature identify a token as well as the token does). The
authorization server runs on a loopback port; inbound requests are driven straight into the
ASGI application, so the only HTTP client that logs is the middleware's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import anyio
import pytest
from joserfc.jwk import RSAKey

import asgi_delegation._exchange
from asgi_delegation import AccessContext, DelegationMiddleware, ExchangeError, Grant
from asgi_delegation._audit import AuditEvent
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer
from asgi_delegation.testing._serve import loopback_socket, serve_on

from .conftest import (
    CLIENT_ID,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    Clock,
    audit_delivered,
    echo_app,
    exchanger_of,
    read_body,
)

#: A client secret that form encoding changes in every way: ':', ' ', '+', '/', '=', '%', '&'
#: and a non-ASCII letter.
SECRET = "Hyg13ne:s3cr+t/=%&ü-Zq8 kx"
CONSENT = "https://consent.example"
NOT_ALLOWED = "https://not-allowed.example"
BAD_TARGET = "not a resource"
METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "client_assertion_file")
#: What the echoing server repeats in its error_description, one request each.
ECHOES = ("secret", "encoded_secret", "basic", "assertion", "subject_token", "body", "fragments")
B64URL_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")
WINDOW = 16


# -- capturing every log record ----------------------------------------------------------------


class Recorder(logging.Handler):
    """Keeps, for every record, its formatted text (traceback included), args and attributes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[tuple[str, str]] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        label = f"log record {record.name}:{record.levelname}"
        self.names.add(record.name)
        self.texts.append((label, self.format(record)))
        self.texts.append((label + " args", f"{record.args!r} {record.args!s}"))
        self.texts.append((label + " __dict__", repr(vars(record))))


class AllLogs:
    """Every logger at DEBUG with ``recorder`` on the root and on every logger that does not
    propagate; ``at_debug()`` again after something reconfigures logging (uvicorn does when a
    server starts). ``restore()`` puts back every level and removes the recorder."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self._saved: dict[logging.Logger, tuple[int, bool, bool]] = {}
        self._attached: set[logging.Logger] = set()
        self.at_debug()

    def at_debug(self) -> None:
        for name in ("asgi_delegation", "asgi_delegation.audit", "httpx", "httpcore", "asyncio"):
            logging.getLogger(name)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
            logging.getLogger(name)
        root = logging.getLogger()
        loggers = [root] + [
            logger
            for logger in list(logging.root.manager.loggerDict.values())
            if isinstance(logger, logging.Logger)
        ]
        for logger in loggers:
            if logger not in self._saved:
                self._saved[logger] = (logger.level, logger.propagate, logger.disabled)
            logger.setLevel(logging.DEBUG)
            logger.disabled = False
            if (logger is root or not logger.propagate) and self.recorder not in logger.handlers:
                logger.addHandler(self.recorder)
                self._attached.add(logger)

    def restore(self) -> None:
        for logger in self._attached:
            logger.removeHandler(self.recorder)
        for logger, (level, propagate, disabled) in self._saved.items():
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


@pytest.fixture
def all_logs() -> Iterator[AllLogs]:
    logs = AllLogs()
    try:
        yield logs
    finally:
        logs.restore()


# -- the authorization server, echoing and recording ------------------------------------------


class Front:
    """The local server on a real port, recording every token request (form and Authorization
    header) and every access token it issues. ``echoes``: the next token requests are denied
    with an ``error_description`` that repeats part of the request (see ``ECHOES``)."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.echoes: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.bodies: list[str] = []
        self.authorizations: list[str] = []
        self.issued: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/token":
            await self.auth(scope, receive, send)
            return
        body = await read_body(receive)
        form = dict(parse_qsl(body.decode()))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.forms.append(form)
        self.bodies.append(body.decode())
        authorization = headers.get("authorization", "")
        if authorization:
            self.authorizations.append(authorization)
        if self.echoes:
            description = self._echo(self.echoes.pop(0), form, body.decode(), authorization)
            document = {"error": "invalid_grant", "error_description": description}
            payload = json.dumps(document).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        chunks: list[bytes] = []

        async def recording(message: Any) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.auth(scope, replay, recording)
        finally:
            try:
                token = json.loads(b"".join(chunks)).get("access_token")
            except (ValueError, AttributeError):
                token = None
            if isinstance(token, str):
                self.issued.append(token)

    @staticmethod
    def _echo(what: str, form: dict[str, str], body: str, authorization: str) -> str:
        secret = form.get("client_secret", "")
        if authorization.startswith("Basic "):
            pair = base64.b64decode(authorization[6:]).decode()
            secret = dict(parse_qsl("secret=" + pair.partition(":")[2]))["secret"]
        subject_token = form.get("subject_token", "")
        signature = subject_token.rpartition(".")[2]
        return {
            "secret": f"wrong secret {secret} for client {form.get('client_id', '?')}",
            "encoded_secret": "client_secret=" + quote_plus(secret, safe=""),
            "basic": f"Authorization: {authorization} refused",
            "assertion": f"client_assertion {form.get('client_assertion', '')} is not valid",
            "subject_token": f"subject_token {subject_token} is not valid",
            "body": f"request: {body}",
            "fragments": f"token ...{signature[-30:]} / {signature[:40]}... not active",
        }[what]


class Forgetful(set[str]):
    """A ``seen_jtis`` that remembers nothing: one client assertion file serves every request."""

    def add(self, element: str) -> None:
        pass


# -- driving the ASGI application --------------------------------------------------------------


@dataclass
class Seen:
    """What came out of the application and the middleware."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    contexts: list[AccessContext] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    errors: list[ExchangeError] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # every bearer token sent in

    def add(self, label: str, value: object) -> None:
        self.texts.append((label, value if isinstance(value, str) else repr(value)))


def hygiene_app(seen: Seen) -> Any:
    """``/exchange?resource=A,B`` exchanges one after the other; ``/prefetch?resource=A,B``
    prefetches them; both answer what the grants and the errors say. Anything else: echo."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/exchange", "/prefetch"):
            await echo_app(scope, receive, send)
            return
        ctx: AccessContext = scope["state"]["access_context"]
        seen.contexts.append(ctx)
        resources = dict(parse_qsl(scope["query_string"].decode()))["resource"].split(",")
        if scope["path"] == "/prefetch":
            await ctx.prefetch(resources)
        document: dict[str, Any] = {"grants": [], "errors": []}
        for resource in resources:
            try:
                grant = ctx.access(resource) if scope["path"] == "/prefetch" else None
                grant = grant or await ctx.exchange(resource)
            except ExchangeError as exc:
                seen.errors.append(exc)
                document["errors"].append(
                    {"class": type(exc).__name__, "error": exc.error, "str": str(exc),
                     "description": exc.error_description, "retry_after": exc.retry_after}
                )  # fmt: skip
                continue
            seen.grants.append(grant)
            document["grants"].append({"repr": repr(grant), "scope": grant.scope})
        seen.errors.extend(ctx.get_errors().values())
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def call(
    app: Any,
    seen: Seen,
    path: str = "/mcp",
    *,
    token: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    query: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request into ``app``; records the answer; returns its status and JSON body."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers or []]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    for name, value in raw:
        if name == b"authorization":
            seen.tokens.append(value.decode().partition(" ")[2])
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": urlencode(query or {}).encode(), "headers": raw,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    seen.add(f"response headers {path}", start.get("headers", []))
    seen.add(f"response body {path}", body.decode("utf-8", "replace"))
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    seen.add(f"response document {path}", document)
    return start["status"], document


async def websocket(app: Any, seen: Seen, token: str | None) -> list[Any]:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    if token is not None:
        seen.tokens.append(token)
    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "headers": headers, "subprotocols": [], "root_path": ""}  # fmt: skip
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Any] = []

    async def receive() -> Any:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    seen.add("websocket messages", sent)
    return sent


async def exchange(app: Any, seen: Seen, token: str, *resources: str) -> Any:
    status, document = await call(
        app, seen, "/exchange", token=token, query={"resource": ",".join(resources)}
    )
    assert status == 200
    return document


# -- tokens ------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rejected_tokens(auth: LocalAuthorizationServer, other: RSAKey) -> dict[str, str]:
    """A token for every reason a signed-looking token is refused."""
    good = auth.mint("alice", audience=RESOURCE, scope="read")
    _, payload, signature = good.split(".")
    hs256 = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": auth.kid}).encode())
    return {
        "too_large": auth.mint("alice", audience=RESOURCE, claims={"pad": "x" * 20_000}),
        "malformed": f"{good.split('.')[0]}.{payload[:10]}!{payload[10:]}.{signature}",
        "algorithm": f"{hs256}.{payload}.{signature}",
        "header": auth.mint("alice", audience=RESOURCE, header={"jku": "https://evil.example"}),
        "type": auth.mint("alice", audience=RESOURCE, header={"typ": "id+jwt"}),
        "unknown_key": auth.mint("alice", audience=RESOURCE, scope="read", key=other),
        "bad_signature": auth.mint(
            "alice", audience=RESOURCE, scope="read", key=other, header={"kid": auth.kid}
        ),
        "expired": auth.mint("alice", audience=RESOURCE, scope="read", expires_in=-100),
        "not_yet_valid": auth.mint(
            "alice", audience=RESOURCE, scope="read", claims={"nbf": int(time.time()) + 1000}
        ),
        "wrong_issuer": auth.mint("alice", audience=RESOURCE, claims={"iss": "https://x.example"}),
        "wrong_audience": auth.mint("alice", audience="https://other.example", scope="read"),
        "insufficient_scope": auth.mint("alice", audience=RESOURCE, scope="write"),
    }


def client_assertion(auth: LocalAuthorizationServer, key: RSAKey) -> str:
    now = int(time.time())
    claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": auth.token_endpoint,
              "jti": uuid.uuid4().hex, "iat": now, "exp": now + 600}  # fmt: skip
    return LocalAuthorizationServer.sign(
        {"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims, key
    )


# -- the search --------------------------------------------------------------------------------


def leaks(texts: list[tuple[str, str]], needles: list[tuple[str, str, bool]]) -> list[str]:
    """Where each needle (name, value, whether any 16 characters of it count) appears."""
    haystack = "\n".join(text for _, text in texts)
    windows: dict[str, str] = {}
    for label, text in texts:
        for run in B64URL_RUN.findall(text):
            for i in range(len(run) - WINDOW + 1):
                windows.setdefault(run[i : i + WINDOW], label)
    found = []
    for name, value, pieces in needles:
        if value in haystack:
            where = next(label for label, text in texts if value in text)
            found.append(f"{name} in full, in {where}")
        elif pieces:
            for i in range(len(value) - WINDOW + 1):
                if value[i : i + WINDOW] in windows:
                    found.append(
                        f"{name}: {value[i : i + WINDOW]!r} in {windows[value[i : i + WINDOW]]}"
                    )
                    break
    return found


def signature(jws: str) -> str:
    return jws.rpartition(".")[2]


# -- the flows ---------------------------------------------------------------------------------


async def discovery_failures(origin: str, auth: LocalAuthorizationServer, seen: Seen) -> None:
    """Cold starts with the server down (metadata fails) and with a JWKS that is not there."""
    token = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=10_000)
    for jwks_uri in (None, origin + "/missing-jwks"):
        middleware = DelegationMiddleware(
            hygiene_app(seen), issuer=origin, resource=RESOURCE, client_id=CLIENT_ID,
            client_secret=SECRET, on_audit=seen.events.append, jwks_uri=jwks_uri,
        )  # fmt: skip
        try:
            auth.fail_status = 503 if jwks_uri is None else None
            status, document = await call(middleware, seen, token=token)
            assert (status, document["error"]) == (503, "temporarily_unavailable")
            status, _ = await call(middleware, seen, token=token)  # inside the backoff
            assert status == 503
            await audit_delivered(middleware)
            seen.add("stats", middleware.stats())
            seen.add("middleware", (repr(middleware), str(middleware)))
        finally:
            auth.fail_status = None
            await middleware.aclose()


async def every_flow(
    middleware: DelegationMiddleware,
    auth: LocalAuthorizationServer,
    front: Front,
    seen: Seen,
    clock: Clock,
    method: str,
) -> None:
    alice = auth.mint("alice", audience=RESOURCE, scope="read", expires_in=10_000)
    bob = auth.mint("bob", audience=RESOURCE, scope="read", expires_in=10_000)

    # Accepted: first seen, from the cache, and on a WebSocket.
    for _ in range(2):
        assert (await call(middleware, seen, token=alice))[0] == 200
    assert (await websocket(middleware, seen, alice))[0]["type"] == "websocket.accept"

    # Refused: every way a request can be.
    other = RSAKey.generate_key(2048, parameters={"kid": "not-the-servers"})
    for reason, token in rejected_tokens(auth, other).items():
        status, document = await call(middleware, seen, token=token)
        assert status == (403 if reason == "insufficient_scope" else 401), reason
    assert (await call(middleware, seen))[0] == 401
    assert (await call(middleware, seen, headers=[("authorization", "Bearer ")]))[0] == 400
    assert (await call(middleware, seen, headers=[("authorization", f"Basic {alice}")]))[0] == 401
    two = [("authorization", f"Bearer {alice}"), ("authorization", f"Bearer {bob}")]
    assert (await call(middleware, seen, headers=two))[0] == 400
    assert (await call(middleware, seen, query={"access_token": alice}))[0] == 400
    assert (await call(middleware, seen, token=bob, query={"access_token": alice}))[0] == 400
    assert (await websocket(middleware, seen, None))[0]["type"] == "websocket.close"

    # Exchanges: granted, from the cache, shared, and prefetched.
    assert (await exchange(middleware, seen, alice, GITHUB, GITHUB))["grants"]
    shared = await asyncio.gather(*(exchange(middleware, seen, bob, GOOGLE) for _ in range(3)))
    assert all(document["grants"] for document in shared)
    _, prefetched = await call(
        middleware, seen, "/prefetch", token=bob, query={"resource": f"{GITHUB},{SLACK}"}
    )
    assert [e["error"] for e in prefetched["errors"]] == ["invalid_target"]

    # Denied by the server: honestly, and echoing the request back in every way.
    assert (await exchange(middleware, seen, alice, SLACK))["errors"][0]["error"] == (
        "invalid_target"
    )
    auth.unconsented.add(("alice", CONSENT))
    assert (await exchange(middleware, seen, alice, CONSENT))["errors"][0]["error"] == (
        "access_denied"
    )
    front.echoes += ECHOES
    for n, echo in enumerate(ECHOES):
        document = await exchange(middleware, seen, alice, f"https://echo.example/{n}")
        assert document["errors"][0]["error"] == "invalid_grant", echo

    # Unavailable: 5xx, then a connection dropped mid-answer, on every attempt.
    auth.token_answers += [ScriptedAnswer(503, {"error": "down"}, {"retry-after": "0"})] * 2
    document = await exchange(middleware, seen, alice, "https://flaky.example")
    assert document["errors"][0]["error"] == "temporarily_unavailable"
    auth.token_answers += [ScriptedAnswer(200, b'{"access_token": "x', drop=True)] * 2
    document = await exchange(middleware, seen, alice, "https://dropped.example")
    assert document["errors"][0]["error"] == "temporarily_unavailable"

    # Not allowed here: by allowed_resources, and not a resource identifier at all.
    assert (await exchange(middleware, seen, alice, NOT_ALLOWED))["errors"][0]["error"] == (
        "not_allowed"
    )
    assert (await exchange(middleware, seen, alice, BAD_TARGET))["errors"][0]["error"] == (
        "invalid_target"
    )

    # Refreshed in the background: once granted, once denied by an echoing server.
    for refresh_echo in (None, "subject_token"):
        clock.advance(250)  # alice's GitHub grant is inside its refresh margin
        if refresh_echo is not None:
            front.echoes.append(refresh_echo)
        assert (await exchange(middleware, seen, alice, GITHUB))["grants"]
        tasks = list(exchanger_of(middleware)._background)
        assert tasks
        await asyncio.gather(*tasks, return_exceptions=True)
    await audit_delivered(middleware)

    outcomes = {(type(e).__name__, getattr(e, "cache", None), e.outcome) for e in seen.events}
    assert ("ExchangeEvent", "refresh", "granted") in outcomes
    assert ("ExchangeEvent", "refresh", "denied") in outcomes
    assert ("ExchangeEvent", "joined", "granted") in outcomes
    stats = middleware.stats()
    assert stats["audit"] == {"delivered": len(seen.events), "dropped": 0, "callback_errors": 0}
    assert stats["token_endpoint"]["responses"]["network"] == 2
    if method == "private_key_jwt":
        assert all("client_assertion" in form for form in front.forms)


@pytest.mark.parametrize("method", METHODS)
async def test_nothing_secret_comes_out(
    all_logs: AllLogs,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    method: str,
) -> None:
    monkeypatch.setattr(asgi_delegation._exchange, "_BACKOFF_BASE", 0.001)
    auth = LocalAuthorizationServer()
    front = Front(auth)
    seen = Seen()
    key = RSAKey.generate_key(2048, parameters={"kid": "client-key"})
    assertion_file = tmp_path / "client-assertion"
    with loopback_socket() as (sock, origin):
        auth.issuer = origin
        uses_secret = method.startswith("client_secret")
        client = auth.register_client(
            CLIENT_ID,
            secret=SECRET if uses_secret else None,
            public_key=None if uses_secret else RSAKey.import_key(key.as_dict(private=False)),
            allowed_resources=[GITHUB, GOOGLE, CONSENT],
        )
        client.seen_jtis = Forgetful()
        methods: dict[str, dict[str, Any]] = {
            "client_secret_basic": {"client_secret": SECRET},
            "client_secret_post": {"client_secret": SECRET, "client_auth": "client_secret_post"},
            "private_key_jwt": {"private_key": key.as_dict(private=True)},
            "client_assertion_file": {"client_assertion_file": assertion_file},
        }
        options = methods[method]
        assertion_file.write_text(client_assertion(auth, key) + "\n")
        middleware = DelegationMiddleware(
            hygiene_app(seen),
            issuer=origin,
            resource=RESOURCE,
            client_id=CLIENT_ID,
            required_scopes=["read"],
            allowed_resources=[GITHUB, GOOGLE, SLACK, CONSENT, BAD_TARGET,
                               "https://flaky.example", "https://dropped.example",
                               *(f"https://echo.example/{n}" for n in range(len(ECHOES)))],
            exchange_attempts=2,
            on_audit=seen.events.append,
            **options,
        )  # fmt: skip
        try:
            async with serve_on(front, sock):
                all_logs.at_debug()  # uvicorn has just configured its own loggers
                with anyio.fail_after(20):
                    await every_flow(middleware, auth, front, seen, clock, method)
                    await discovery_failures(origin, auth, seen)
                seen.add("stats", middleware.stats())
        finally:
            await middleware.aclose()

    # Everything that came out.
    texts = [*seen.texts, *all_logs.recorder.texts]
    for event in seen.events:
        texts.append((f"event {type(event).__name__}", f"{event!r} {event._asdict()!r}"))
    for ctx in seen.contexts:
        texts.append(("AccessContext", f"{ctx!r} {ctx!s}"))
    for grant in seen.grants:
        texts.append(("Grant", f"{grant!r} {grant!s}"))
    for error in seen.errors:
        texts.append(
            (f"{type(error).__name__}", f"{error!r} {error!s} {error.args!r} {vars(error)!r}")
        )
    client_auth = exchanger_of(middleware)._client_auth
    texts.append(("client auth", f"{client_auth!r} {client_auth!s}"))
    texts.append(("middleware", f"{middleware!r} {middleware!s}"))
    texts.append(("exchanger", f"{middleware._exchanger!r} {middleware._exchanger!s}"))

    # The flows happened, and were logged.
    assert {"asgi_delegation", "asgi_delegation.audit", "httpx", "httpcore.http11"} <= (
        all_logs.recorder.names
    )
    assert any(name.startswith("uvicorn") for name in all_logs.recorder.names)
    assert len(seen.errors) > 10
    assert any("[redacted]" in text for _, text in texts)

    # What must never come out.
    issued = {*front.issued, *(grant.access_token for grant in seen.grants)}
    assert len(issued) >= 4
    assertions = {form["client_assertion"] for form in front.forms if "client_assertion" in form}
    if method == "client_assertion_file":
        assertions.add(assertion_file.read_text().strip())
    assert bool(assertions) == (not method.startswith("client_secret"))
    needles: list[tuple[str, str, bool]] = []
    for n, token in enumerate(dict.fromkeys(seen.tokens)):
        if token:
            needles += [(f"inbound token #{n}", token, False)]
        if len(signature(token)) >= WINDOW:
            needles += [(f"inbound token #{n}'s signature", signature(token), True)]
    for n, token in enumerate(issued):
        needles += [(f"exchanged token #{n}", token, False)]
        needles += [(f"exchanged token #{n}'s signature", signature(token), True)]
    for n, jws in enumerate(assertions):
        needles += [(f"client assertion #{n}", jws, False)]
        needles += [(f"client assertion #{n}'s signature", signature(jws), True)]
    needles += [
        ("client secret", SECRET, False),
        ("form-encoded client secret", quote_plus(SECRET, safe=""), False),
        ("form-encoded client secret (quote)", quote_plus(SECRET), False),
    ]
    for n, authorization in enumerate(set(front.authorizations)):
        needles.append((f"Basic credentials #{n}", authorization.partition(" ")[2], False))
    private = key.as_dict(private=True)
    for member in ("d", "p", "q", "dp", "dq", "qi"):
        needles.append((f"private key member {member}", str(private[member]), True))
    assert leaks(texts, needles) == []


def test_the_search_finds_what_it_looks_for() -> None:
    """The search itself: whole values, and any 16 characters of a signature."""
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + "A" * 8 + "Bc_d-EfGhIjKlMnOpQrStUv"
    needles = [("token", token, False), ("signature", signature(token), True)]
    assert leaks([("clean", "nothing to see: alice, [redacted]")], needles) == []
    assert leaks([("log", f"token={token}")], needles) == [
        "token in full, in log",
        "signature in full, in log",
    ]
    assert leaks([("log", "sig ...EfGhIjKlMnOpQrStUv")], needles) == [
        "signature: 'EfGhIjKlMnOpQrSt' in log"
    ]
    assert leaks([("log", "sig ...GhIjKlMnOpQrStU")], needles) == []  # only 15 of them
