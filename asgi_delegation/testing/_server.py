"""LocalAuthorizationServer: an authorization server as a plain ASGI application.

It publishes RFC 8414 and OpenID Connect metadata and a JWKS (with key rotation), and mints
access tokens with any claims and any header, including broken ones on purpose, and opaque
access tokens that its RFC 7662 introspection endpoint answers for. Its token endpoint does
token exchange and the client-credentials grant (which MCP clients use to get a token by
themselves), and clients may register dynamically (RFC 7591). Use it in process
(``http_client()``) or on a loopback port (``serve()``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, GuestProtocol, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from .._jwks import ALGORITHM_KEYS
from .._types import Receive, Scope, Send
from .._urls import secure_url, url_path, well_known_urls
from ._serve import loopback_socket, running_on, serve_on
from ._token_endpoint import (
    AUTH_METHODS,
    CLIENT_CREDENTIALS,
    TOKEN_EXCHANGE,
    Client,
    OAuthError,
    ScriptedAnswer,
    authenticate,
    introspection_response,
    parse_form,
    register,
    token_response,
)

SigningKey = RSAKey | ECKey | OKPKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _generate(algorithm: str) -> SigningKey:
    kty, crv = ALGORITHM_KEYS[algorithm]
    kid = uuid.uuid4().hex
    if kty == "RSA":
        return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": algorithm, "use": "sig"})
    if kty == "EC":
        return ECKey.generate_key(crv, parameters={"kid": kid, "alg": algorithm, "use": "sig"})
    curve: Literal["Ed25519", "Ed448"] = "Ed448" if crv == "Ed448" else "Ed25519"
    return OKPKey.generate_key(curve, parameters={"kid": kid, "use": "sig"})


class LocalAuthorizationServer:
    """A small authorization server for tests and local development.

    ``issuer`` is the issuer identifier it announces (default ``http://127.0.0.1``; ``serve()``
    replaces the origin with the port it listens on and keeps the path). Knobs for tests:
    ``jwks_cache_control`` (the JWKS ``Cache-Control`` header), ``extra_jwks`` (raw JWK dicts
    published after the real keys), ``fail_status`` (every endpoint answers that status) and
    ``requests`` (a counter of requests per path). The token and introspection endpoints each
    have a latency, a queue of scripted answers, the forms they saw and a peak of requests at
    once (``token_*``/``exchanges``, ``introspection_*``/``introspections``).
    """

    def __init__(self, issuer: str = "http://127.0.0.1", *, algorithm: str = "RS256") -> None:
        self.issuer = secure_url(issuer, "issuer")
        if algorithm not in ALGORITHM_KEYS:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._keys: list[SigningKey] = [_generate(algorithm)]
        self.extra_jwks: list[dict[str, Any]] = []
        self.jwks_cache_control: str | None = "max-age=300"
        self.fail_status: int | None = None
        self.requests: Counter[str] = Counter()
        # Token exchange.
        self.clients: dict[str, Client] = {}
        self.exchange_target = "any"
        self.exchange_expires_in: float = 300
        self.grantable_scopes: dict[str, frozenset[str]] = {}
        self.unconsented: set[tuple[str, str]] = set()
        self.token_latency = 0.0
        self.token_answers: list[ScriptedAnswer] = []
        self.exchanges: list[dict[str, str]] = []
        self.token_requests_in_flight = 0
        self.token_requests_peak = 0
        # Introspection. Tokens are known by their SHA-256 only, so that nothing this object
        # holds (short of the forms it saw) gives a token away when a test prints it.
        self._opaque: dict[str, dict[str, Any]] = {}
        self._revoked: set[str] = set()
        self.introspection_latency = 0.0
        self.introspection_answers: list[ScriptedAnswer] = []
        self.introspections: list[dict[str, str]] = []
        self.introspection_requests_in_flight = 0
        self.introspection_requests_peak = 0

    def __repr__(self) -> str:
        return f"LocalAuthorizationServer(issuer={self.issuer!r}, algorithm={self.algorithm!r})"

    # -- keys -------------------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        """The private key new tokens are signed with."""
        return self._keys[-1]

    @property
    def kid(self) -> str:
        return str(self.signing_key.kid)

    def rotate_keys(self, *, keep_previous: bool = True) -> str:
        """Sign with a new key from now on; return its ``kid``. The old keys stay published
        unless ``keep_previous`` is false."""
        key = _generate(self.algorithm)
        self._keys = [*self._keys, key] if keep_previous else [key]
        return str(key.kid)

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        public_key: SigningKey | None = None,
        allowed_resources: Iterable[str] | None = None,
    ) -> Client:
        """Register a client that may exchange tokens: with a ``secret`` (client_secret_basic
        or client_secret_post) and/or a ``public_key`` (private_key_jwt). ``allowed_resources``
        are its dependencies: exchanges for anything else get ``invalid_target``."""
        client = Client(
            client_id,
            secret,
            public_key,
            None if allowed_resources is None else frozenset(allowed_resources),
        )
        self.clients[client_id] = client
        return client

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of ``token`` if this server signed it and it has neither expired nor
        been revoked, else None. Handy for a fake upstream API that checks the delegated tokens
        it receives."""
        if _digest(token) in self._revoked:
            return None
        try:
            claims = jwt.decode(token, self._key_for, algorithms=[self.algorithm]).claims
        except Exception:  # any failure to parse or verify means: not a token of ours
            return None
        exp = claims.get("exp")
        if (
            claims.get("iss") != self.issuer
            or not isinstance(exp, int | float)
            or exp <= time.time()
        ):
            return None
        return claims

    def _key_for(self, guest: GuestProtocol) -> SigningKey:
        kid = guest.headers().get("kid")
        return next(k for k in self._keys if k.kid == kid)

    def jwks(self) -> dict[str, Any]:
        """The published key set (public parts only, plus ``extra_jwks``)."""
        return {"keys": [k.as_dict(private=False) for k in self._keys] + list(self.extra_jwks)}

    # -- tokens -----------------------------------------------------------------------------

    def mint(
        self,
        subject: str = "user",
        *,
        audience: str | list[str] | None = None,
        scope: str | Iterable[str] | None = None,
        expires_in: float = 300,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
        key: SigningKey | None = None,
    ) -> str:
        """A signed access token (RFC 9068 shape) for ``subject``.

        ``claims`` and ``header`` are merged over the defaults and may hold anything, even
        values no real server would send; ``omit`` drops claims or header members by name.
        The header's ``alg`` selects the signature (``none`` gives an empty one).
        """
        body = self._claims(subject, audience, scope, expires_in, {"jti": uuid.uuid4().hex})
        body.update(claims or {})
        signing_key = key or self.signing_key
        head: dict[str, Any] = {"typ": "at+jwt", "alg": self.algorithm, "kid": signing_key.kid}
        head.update(header or {})
        for name in omit:
            body.pop(name, None)
            head.pop(name, None)
        return self.sign(head, body, signing_key)

    def _claims(
        self,
        subject: str,
        audience: str | list[str] | None,
        scope: str | Iterable[str] | None,
        expires_in: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """The default claims of a token of this server, JWT or opaque."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "iat": now,
            "exp": now + expires_in,
            **extra,
            "client_id": "local-client",
        }
        if audience is not None:
            body["aud"] = audience
        if scope is not None:
            body["scope"] = scope if isinstance(scope, str) else " ".join(scope)
        return body

    def mint_opaque(
        self,
        subject: str = "user",
        *,
        audience: str | list[str] | None = None,
        scope: str | Iterable[str] | None = None,
        expires_in: float = 300,
        claims: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
    ) -> str:
        """An opaque access token for ``subject``: random, with no structure (never a JWT), and
        only this server's introspection endpoint knows what it means.

        It is remembered with the claims introspection answers with: ``iss``, ``sub``, ``iat``,
        ``exp``, ``client_id``, and ``aud`` and ``scope`` when given. ``claims`` are merged
        over them and may hold anything, even values no real server would send (``None`` is
        answered as JSON ``null``); ``omit`` drops members by name, as in :meth:`mint`. The
        token is active until its ``exp`` passes (if ``exp`` is a number) or it is revoked.
        """
        body = self._claims(subject, audience, scope, expires_in, {})
        body.update(claims or {})
        for name in omit:
            body.pop(name, None)
        # RFC 6750 b64token characters, and no dot: nobody can mistake it for a JWT.
        token = secrets.token_urlsafe(32)
        self._opaque[_digest(token)] = body
        return token

    def revoke(self, token: str) -> None:
        """Make ``token`` (opaque or a JWT of this server's) inactive: introspection answers
        ``{"active": false}``, :meth:`verify` returns None and exchanges refuse it."""
        self._revoked.add(_digest(token))

    def introspect(self, token: str) -> dict[str, Any] | None:
        """The claims of ``token`` if it is active, else None: what the introspection endpoint
        answers with (after ``"active": true``). Opaque tokens are active until their ``exp``
        (when a number) passes; JWTs as long as :meth:`verify` accepts them."""
        digest = _digest(token)
        claims = self._opaque.get(digest)
        if claims is None:
            return self.verify(token)
        exp = claims.get("exp")
        expired = isinstance(exp, int | float) and not isinstance(exp, bool) and exp <= time.time()
        if expired or digest in self._revoked:
            return None
        return dict(claims)

    @staticmethod
    def sign(header: Mapping[str, Any], claims: Any, key: SigningKey) -> str:
        """Serialize and sign without any checks: ``claims`` may be any JSON value."""
        signing_input = (
            _b64(json.dumps(dict(header)).encode()) + "." + _b64(json.dumps(claims).encode())
        )
        alg = header.get("alg")
        if alg == "none":
            return signing_input + "."
        model = JWSRegistry.algorithms[str(alg)]
        return signing_input + "." + _b64(model.sign(signing_input.encode(), key))

    # -- serving ----------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 authorization server metadata document.

        ``authorization_endpoint`` is published because MCP clients require the member; no
        user is there to log in, so it answers every request with ``unsupported_response_type``.
        """
        base = self.issuer.rstrip("/")
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{base}/jwks",
            "token_endpoint": f"{base}/token",
            "registration_endpoint": f"{base}/register",
            "authorization_endpoint": f"{base}/authorize",
            "introspection_endpoint": f"{base}/introspect",
            "grant_types_supported": [TOKEN_EXCHANGE, CLIENT_CREDENTIALS],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "introspection_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "response_types_supported": [],
        }

    @property
    def token_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/token"

    @property
    def introspection_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/introspect"

    def _routes(self) -> dict[str, str]:
        path = url_path(self.issuer).rstrip("/")
        oauth, _ = well_known_urls(self.issuer, "oauth-authorization-server")
        oidc, _ = well_known_urls(self.issuer, "openid-configuration")
        return {
            urlsplit(oauth).path: "metadata",
            urlsplit(oidc).path: "metadata",
            f"{path}/.well-known/openid-configuration": "metadata",
            f"{path}/jwks": "jwks",
            f"{path}/token": "token",
            f"{path}/register": "register",
            f"{path}/introspect": "introspect",
            f"{path}/authorize": "authorize",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.requests[path] += 1
        route = self._routes().get(path)
        headers: dict[str, str] = {}
        if route in ("token", "register", "introspect") and self.fail_status is None:
            await self._post(route, scope, receive, send)
            return
        if self.fail_status is not None:
            status, document = self.fail_status, {"error": "temporarily_unavailable"}
        elif route == "metadata":
            status, document = 200, self.metadata()
        elif route == "authorize":
            status, document = 400, {"error": "unsupported_response_type"}
        elif route == "jwks":
            status, document = 200, self.jwks()
            if self.jwks_cache_control is not None:
                headers["cache-control"] = self.jwks_cache_control
        else:
            status, document = 404, {"error": "not_found"}
        await _send_json(send, status, document, headers)

    async def _post(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _send_json(send, 405, {"error": "invalid_request"}, {"allow": "POST"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 64 * 1024:
                await _send_json(send, 413, {"error": "invalid_request"}, {})
                return
            if not message.get("more_body"):
                break
        if route == "introspect":
            await self._hold_introspection()
        else:
            await self._hold_token()
        answers = {"token": self.token_answers, "introspect": self.introspection_answers}
        scripted = answers.get(route)
        if scripted:
            await _send_scripted(send, scripted.pop(0))
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        authorization = headers.get("authorization")
        try:
            if route == "register":
                status, document = 201, register(self, body)
            elif route == "introspect":
                form = parse_form(body)
                self.introspections.append(form)
                status, document = 200, introspection_response(self, form, authorization)
            else:
                form = parse_form(body)
                self.exchanges.append(form)
                client = authenticate(self, form, authorization, self.token_endpoint)
                status, document = 200, token_response(self, form, client)
        except OAuthError as exc:
            status = exc.status
            document = {"error": exc.error, "error_description": exc.description}
        extra = {"cache-control": "no-store"}
        if status == 401:
            extra["www-authenticate"] = f'Basic realm="{route}"'
        await _send_json(send, status, document, extra)

    # Requests are counted in flight while they wait out the latency, so that a test sees how
    # many a client sends at once.

    async def _hold_token(self) -> None:
        self.token_requests_in_flight += 1
        self.token_requests_peak = max(self.token_requests_peak, self.token_requests_in_flight)
        try:
            if self.token_latency:
                await anyio.sleep(self.token_latency)
        finally:
            self.token_requests_in_flight -= 1

    async def _hold_introspection(self) -> None:
        self.introspection_requests_in_flight += 1
        self.introspection_requests_peak = max(
            self.introspection_requests_peak, self.introspection_requests_in_flight
        )
        try:
            if self.introspection_latency:
                await anyio.sleep(self.introspection_latency)
        finally:
            self.introspection_requests_in_flight -= 1

    def http_client(self) -> httpx.AsyncClient:
        """An httpx client that reaches this server in process, with no network."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self))

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on ``host:port`` (loopback only; port 0 picks a free one) until the block
        ends; yields the issuer URL, which ``self.issuer`` also takes. Needs uvicorn
        (``pip install 'asgi-delegation[serve]'``)."""
        with loopback_socket(host, port) as (sock, origin):
            self.issuer = origin + url_path(self.issuer)
            async with serve_on(self, sock):
                yield self.issuer

    @contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """``serve()`` for code without an event loop (scripts, synchronous fixtures)."""
        with loopback_socket(host, port) as (sock, origin):
            self.issuer = origin + url_path(self.issuer)
            with running_on(self, sock):
                yield self.issuer


async def _send_scripted(send: Send, answer: ScriptedAnswer) -> None:
    body = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()
    headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
    if answer.drop:  # promise a body, send half of it, and break off
        headers.append((b"content-length", str(len(body) + 100).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": answer.drop})
    if answer.drop:
        raise ConnectionAbortedError("LocalAuthorizationServer: scripted dropped connection")


async def _send_json(send: Send, status: int, document: Any, headers: Mapping[str, str]) -> None:
    body = json.dumps(document).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send(
        {"type": "http.response.start", "status": status, "headers": raw_headers, "trailers": False}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
