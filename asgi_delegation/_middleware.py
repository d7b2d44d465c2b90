"""DelegationMiddleware: the pure ASGI middleware that authenticates every request."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from hashlib import sha256
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl

import anyio
import httpx
from joserfc.jwk import ECKey, OKPKey, RSAKey

from . import _clock
from ._answers import Answer, Answers
from ._audit import AuditCallback, Auditor, AuthenticationEvent
from ._claims import Common
from ._client_auth import from_environment
from ._context import AccessContext
from ._current import _current
from ._errors import ConfigurationError
from ._exchange import Exchanger
from ._grants import SharedCache
from ._http import HTTPClient
from ._issuer import DEFAULT_ALGORITHMS, Issuer
from ._loops import PerLoop
from ._mcp_principal import sdk_principal
from ._metadata import ResourceMetadata
from ._otel import telemetry
from ._printable import MAX_CHARS, printable
from ._refresh import Unavailable
from ._scopes import implied_scopes, scope_list
from ._tokens import InvalidToken, TokenCache, ValidToken
from ._tool_scopes import ToolScopes
from ._trust import Shared, Trust, unverified_issuer
from ._types import ASGIApp, Message, Receive, Scope, Send
from ._urls import secure_url

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .redis import RedisGrantCache

#: The application's exchange policy: ``policy(context, resource, scope)`` is True to allow.
Policy = Callable[[AccessContext, str, "str | None"], "bool | Awaitable[bool]"]

_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def _tool_scopes(value: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigurationError("tool_scopes must map tool names to lists of scopes")
    if not all(isinstance(tool, str) and tool for tool in value):
        raise ConfigurationError("tool_scopes keys must be tool names")
    return {tool: scope_list(scopes, f"tool_scopes[{tool!r}]") for tool, scopes in value.items()}


def _issuers(value: Iterable[Issuer]) -> list[Issuer]:
    if isinstance(value, Issuer | str):
        raise ConfigurationError("issuers must be a list of Issuer(...)")
    configs = list(value)
    if not configs or not all(isinstance(config, Issuer) for config in configs):
        raise ConfigurationError("issuers must be a non-empty list of Issuer(...)")
    names = [config.issuer for config in configs]
    if len(set(names)) != len(names):
        raise ConfigurationError("issuers names the same issuer twice")
    if sum(config._introspection for config in configs) > 1:
        # An opaque token says nothing of its issuer: it must never reach a server that did
        # not issue it, so only one issuer may take them.
        raise ConfigurationError("at most one issuer may have introspection=True")
    return configs


def _bounded(value: float, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a number")
    if not low <= value <= high:
        raise ConfigurationError(f"{what} must be between {low:g} and {high:g}")
    return value


class DelegationMiddleware:
    """Authenticate every HTTP request and WebSocket handshake with a bearer JWT.

    Wrap any ASGI application. Requests with a valid token reach the application with an
    :class:`AccessContext` at ``scope["state"]["access_context"]`` and from
    :func:`current_access_context`; the others are answered here with RFC 6750 challenges. The
    RFC 9728 protected resource metadata is served at ``/.well-known/oauth-protected-resource``
    (and its path-suffixed form), under the mount when the middleware is mounted. With
    ``tool_scopes``, MCP tool calls also need their tools' scopes.
    """

    def __init__(
        self,
        # Any ASGI application, however its callable is typed (Starlette's types, asgiref's
        # TypedDicts as Quart uses, none): the middleware passes on what the server gives it.
        app: Callable[..., Awaitable[None]],
        *,
        issuer: str | None = None,
        issuers: Iterable[Issuer] | None = None,
        resource: str,
        audience: str | Iterable[str] | None = None,
        required_scopes: Iterable[str] = (),
        tool_scopes: Mapping[str, Iterable[str]] | None = None,
        scope_hierarchy: Mapping[str, Iterable[str]] | None = None,
        scopes_supported: Iterable[str] | None = None,
        public_paths: Iterable[str] = (),
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        introspection: bool = False,
        introspection_endpoint: str | None = None,
        introspect_jwts: bool = False,
        introspection_cache_ttl: float = 60.0,
        leeway: float = 30.0,
        max_token_bytes: int = 16 * 1024,
        require_at_jwt: bool = False,
        jwks_uri: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        http_timeout: float = 10.0,
        jwks_refetch_cooldown: float = 30.0,
        token_cache_size: int = 10_000,
        client_id: str | None = None,
        client_secret: str | None = None,
        client_auth: str | None = None,
        private_key: Mapping[str, Any] | RSAKey | ECKey | OKPKey | None = None,
        client_assertion_file: str | os.PathLike[str] | None = None,
        token_endpoint: str | None = None,
        exchange_target: str = "resource",
        requested_token_type: str | None = None,
        allowed_resources: Iterable[str] | None = None,
        policy: Policy | None = None,
        grant_cache_size: int = 10_000,
        shared_cache: RedisGrantCache | None = None,
        refresh_margin: float = 60.0,
        exchange_timeout: float = 10.0,
        max_concurrent_exchanges: int = 32,
        exchange_attempts: int = 3,
        on_audit: AuditCallback | None = None,
        opentelemetry: bool = False,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.app: ASGIApp = app
        resource = secure_url(resource, "resource")
        per_issuer = {
            "audience": audience is not None,
            "algorithms": algorithms is not DEFAULT_ALGORITHMS,
            "jwks_uri": jwks_uri is not None,
            "token_endpoint": token_endpoint is not None,
            "introspection": introspection is not False,
            "introspection_endpoint": introspection_endpoint is not None,
            "introspect_jwts": introspect_jwts is not False,
            "client_id": client_id is not None,
            "client_secret": client_secret is not None,
            "client_auth": client_auth is not None,
            "private_key": private_key is not None,
            "client_assertion_file": client_assertion_file is not None,
            "exchange_target": exchange_target != "resource",
            "requested_token_type": requested_token_type is not None,
        }
        if issuers is not None:
            if issuer is not None:
                raise ConfigurationError("issuer and issuers are mutually exclusive: give one")
            given = [name for name, set_ in per_issuer.items() if set_]
            if given:
                raise ConfigurationError(
                    f"with issuers=, {', '.join(given)} belong in each Issuer(...), not here"
                )
            configs = _issuers(issuers)
        elif issuer is None:
            raise ConfigurationError("issuer (or issuers) is required")
        else:
            client_id, client_secret = from_environment(
                client_id, client_secret, private_key, client_assertion_file
            )
            configs = [
                Issuer(
                    issuer,
                    audience=audience,
                    algorithms=algorithms,
                    jwks_uri=jwks_uri,
                    token_endpoint=token_endpoint,
                    introspection=introspection,
                    introspection_endpoint=introspection_endpoint,
                    introspect_jwts=introspect_jwts,
                    client_id=client_id,
                    client_secret=client_secret,
                    client_auth=client_auth,
                    private_key=private_key,
                    client_assertion_file=client_assertion_file,
                    exchange_target=exchange_target,
                    requested_token_type=requested_token_type,
                )
            ]
        required = scope_list(required_scopes, "required_scopes")
        self._required = frozenset(required)
        tools = _tool_scopes(tool_scopes or {})
        implied = implied_scopes(scope_hierarchy)
        # Tool scopes stay out by default: MCP clients ask for every advertised scope when the
        # challenge names none, and a tool's scope is better asked for by step-up, when needed.
        supported = (
            required
            if scopes_supported is None
            else scope_list(scopes_supported, "scopes_supported")
        )
        self._public_exact, self._public_prefixes = self._public_paths(public_paths)
        timeout = _bounded(http_timeout, "http_timeout", 0.1, 120)
        if isinstance(allowed_resources, str):
            raise ConfigurationError("allowed_resources must be a list of resources, not a string")
        if policy is not None and not callable(policy):
            raise ConfigurationError("policy must be a callable")
        if shared_cache is not None and not isinstance(shared_cache, SharedCache):
            raise ConfigurationError("shared_cache must be a RedisGrantCache")
        if on_audit is not None and not callable(on_audit):
            raise ConfigurationError("on_audit must be a callable")
        cooldown = _bounded(jwks_refetch_cooldown, "jwks_refetch_cooldown", 0, 86400)
        leeway = _bounded(leeway, "leeway", 0, 300)
        max_token_bytes = int(_bounded(max_token_bytes, "max_token_bytes", 256, 1024 * 1024))
        token_cache_size = int(_bounded(token_cache_size, "token_cache_size", 1, 10_000_000))
        introspection_cache_ttl = _bounded(
            introspection_cache_ttl, "introspection_cache_ttl", 0, 3600
        )
        grant_cache_size = int(_bounded(grant_cache_size, "grant_cache_size", 1, 10_000_000))
        refresh_margin = _bounded(refresh_margin, "refresh_margin", 0, 3600)
        exchange_timeout = _bounded(exchange_timeout, "exchange_timeout", 0.1, 120)
        max_concurrent_exchanges = int(
            _bounded(max_concurrent_exchanges, "max_concurrent_exchanges", 1, 10_000)
        )
        exchange_attempts = int(_bounded(exchange_attempts, "exchange_attempts", 1, 10))
        sink = telemetry(opentelemetry, tracer_provider, meter_provider)
        # Every argument is checked by now: nothing below can fail and leave a client open.
        self._http = HTTPClient(http_client, timeout=timeout)
        self._auditor = auditor = Auditor(on_audit, sink)
        self._stats = auditor.stats
        self._tokens = TokenCache(token_cache_size)
        self._shared: SharedCache | None = shared_cache
        if shared_cache is not None:
            auditor.stats.shared = shared_cache.stats
        # One budget for requests to authorization servers: exchanges and introspections alike.
        limiter = PerLoop(partial(anyio.CapacityLimiter, max_concurrent_exchanges))
        shared = Shared(
            resource=resource,
            http=self._http,
            auditor=auditor,
            tokens=self._tokens,
            common=Common(implied),
            limiter=limiter,
            timeout=timeout,
            cooldown=cooldown,
            leeway=leeway,
            max_token_bytes=max_token_bytes,
            require_at_jwt=require_at_jwt,
            introspection_cache_ttl=introspection_cache_ttl,
            token_cache_size=token_cache_size,
            exchanger=partial(
                Exchanger,
                allowed_resources=(
                    None if allowed_resources is None else frozenset(allowed_resources)
                ),
                policy=policy,
                cache_size=grant_cache_size,
                shared=shared_cache,
                refresh_margin=refresh_margin,
                deadline=exchange_timeout,
                limiter=limiter,
                attempts=exchange_attempts,
                auditor=auditor,
            ),
        )
        trusts = [Trust(config, shared) for config in configs]
        self._trusts = {trust.issuer: trust for trust in trusts}
        self._max_token_bytes = max_token_bytes
        # One issuer: its exchanger and its JWT validation need no routing.
        self._only = trusts[0] if len(trusts) == 1 else None
        self._exchanger = self._only.exchanger if self._only is not None else None
        self._opaque = next((trust for trust in trusts if trust.opaque), None)
        self._metadata = ResourceMetadata(resource, list(self._trusts), supported)
        self._exempt = self._public_exact | self._metadata.paths
        self._answers = Answers(self._metadata.url, sorted(self._required))
        self._mounted: dict[str, Answers] = {}  # by root_path: the challenges name their URL
        self._tools = ToolScopes(tools, sorted(self._required)) if tools else None
        self._principal = sdk_principal(resource)

    @staticmethod
    def _public_paths(paths: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
        if isinstance(paths, str):
            raise ConfigurationError("public_paths must be a list of paths, not a string")
        paths = tuple(paths)
        if not all(isinstance(p, str) and p.startswith("/") for p in paths):
            raise ConfigurationError("public_paths entries must be paths starting with '/'")
        # An entry ending in '/' covers everything below it; any other entry is exact.
        return (
            frozenset(p for p in paths if not p.endswith("/") or p == "/"),
            tuple(p for p in paths if p.endswith("/") and p != "/"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            await self._guard(scope, receive, send, kind == "http")
        elif kind == "lifespan":
            await self.app(scope, receive, self._closing_client_on_shutdown(send))
        else:
            await self.app(scope, receive, send)

    async def _guard(self, scope: Scope, receive: Receive, send: Send, http: bool) -> None:
        path: str = scope["path"]
        answers = self._answers
        if scope.get("root_path"):
            path, answers = self._within_mount(scope)
        if path in self._exempt:  # one lookup on the way of every other request
            if http and path in self._metadata.paths:
                await self._metadata.serve(scope["method"], send)
                return
            if path in self._public_exact:
                await self.app(scope, receive, send)
                return
        if self._public_prefixes and self._under_public_prefix(path):
            await self.app(scope, receive, send)
            return
        if http and scope["method"] == "OPTIONS" and _is_preflight(scope):
            # The application's CORS handling answers it, unauthenticated; an application that
            # treats it as any other request must not hand out a body without a token.
            await self.app(scope, receive, _without_body(send))
            return
        outcome = self._authenticate(scope, answers)
        if type(outcome) is not AccessContext:
            if isinstance(outcome, _Unsettled):
                outcome, receive = await self._settle(scope, receive, answers, outcome)
            if isinstance(outcome, Answer):
                if http:
                    await outcome.send_http(send)
                else:
                    await receive()  # the websocket.connect event, answered by the refusal
                    await outcome.refuse_websocket(send)
                return
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["access_context"] = outcome
        current = _current.set(outcome)
        principal = self._principal
        if principal is not None:
            entered = principal.enter(scope, outcome)
        try:
            await self.app(scope, receive, send)
        finally:
            if principal is not None:
                principal.exit(entered)
            _current.reset(current)

    def _within_mount(self, scope: Scope) -> tuple[str, Answers]:
        """The path as the wrapped application routes it, and the answers naming the metadata
        URL that reaches this middleware, when it is mounted under a prefix (``root_path``)."""
        path: str = scope["path"]
        mount: str = scope["root_path"]
        if not path.startswith(mount):
            return path, self._answers
        answers = self._mounted.get(mount)
        if answers is None:
            answers = Answers(self._metadata.url_under(mount), sorted(self._required))
            if len(self._mounted) < 16:  # an application is mounted in one place or a few
                self._mounted[mount] = answers
        return path[len(mount) :] or "/", answers

    def _under_public_prefix(self, path: str) -> bool:
        return not _DOT_SEGMENT.search(path) and path.startswith(self._public_prefixes)

    def _authenticate(self, scope: Scope, answers: Answers) -> AccessContext | Answer | _Unsettled:
        """The access context or the refusal when no await is needed to decide (the token
        validated before, no tool scopes to read from the body: most requests), else what
        :meth:`_settle` goes on with. Not a coroutine, for the requests it decides."""
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if header is not None:
                    return self._refused(scope, _TWO_HEADERS)
                header = value
        query = scope["query_string"]
        # The name may arrive percent-encoded (access%5Ftoken): then only parsing can tell.
        if (b"access_token" in query or b"%" in query) and _query_has_token(query):
            answer = _TOKEN_IN_HEADER_AND_QUERY if header is not None else _TOKEN_IN_QUERY
            return self._refused(scope, answer)
        if header is None:
            return self._refused(scope, answers.missing)
        if header.startswith(b"Bearer "):  # the spelling clients send: one copy, no more
            token = header[7:]
        else:
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer":
                return self._refused(scope, answers.missing)
        token = token.strip(b" ")
        if not token:
            return self._refused(scope, _EMPTY_TOKEN)
        digest = sha256(token).digest()
        valid = self._tokens.get(digest)
        stats = self._stats
        if valid is None:
            stats.token_misses += 1
            return _Unsettled(token, digest, None)
        stats.token_hits += 1
        if self._tools is not None and scope["type"] == "http":
            return _Unsettled(token, digest, valid)
        return self._admit(scope, answers, token, digest, valid, True)

    async def _settle(
        self, scope: Scope, receive: Receive, answers: Answers, unsettled: _Unsettled
    ) -> tuple[AccessContext | Answer, Receive]:
        """The access context or the refusal of a token not validated before, or of a request
        whose tools' scopes are in its body; and the ``receive`` to go on with."""
        token, digest, valid = unsettled
        cached = valid is not None
        if valid is None:
            try:
                valid = await self._verify(token, digest)
            except InvalidToken as exc:
                answer = answers.invalid_token(exc.reason)
                return self._refused(scope, answer, digest), receive
            except Unavailable as exc:
                return self._refused(scope, Answers.unavailable(exc.retry_after), digest), receive
        # Any spelling of POST: a server that normalizes the method must not skip the check.
        tools = self._tools
        if tools is not None and scope["type"] == "http" and scope["method"].upper() == "POST":
            if not self._required <= valid.granted:  # told before any body is read
                answer = answers.insufficient_scope
                return self._refused(scope, answer, digest, valid, cached=cached), receive
            refusal, receive = await tools.check(scope, receive, valid.granted)
            if refusal is not None:
                if not isinstance(refusal, Answer):
                    refusal = answers.insufficient_scope_for(refusal)
                return self._refused(scope, refusal, digest, valid, cached=cached), receive
        return self._admit(scope, answers, token, digest, valid, cached), receive

    def _admit(
        self,
        scope: Scope,
        answers: Answers,
        token: bytes,
        digest: bytes,
        valid: ValidToken,
        cached: bool,
    ) -> AccessContext | Answer:
        required = self._required
        if required and not required <= valid.granted:
            answer = answers.insufficient_scope
            return self._refused(scope, answer, digest, valid, cached=cached)
        self._stats.accepted += 1
        # A token's first acceptance is an INFO event (its later requests only DEBUG ones),
        # logged at DEBUG: in a process that logs at INFO, as MCP servers do, writing a line
        # for every new caller would cost more than validating its token.
        if self._auditor.wants(logging.DEBUG if cached else logging.INFO, logging.DEBUG):
            self._audit(scope, None, digest, valid, cached)
        exchanger = self._exchanger or self._trusts[valid.issuer].exchanger
        return AccessContext(valid, token, digest, exchanger)

    async def _verify(self, token: bytes, digest: bytes) -> ValidToken:
        """Validate a token not seen before with its issuer's pieces, and cache the result;
        raises :class:`InvalidToken` (401) or ``Unavailable`` (503)."""
        if len(token) > self._max_token_bytes:
            raise InvalidToken("too_large")
        if token.count(b".") == 2:  # a JWT: never introspected unless it verifies first
            trust = self._only or self._trusts.get(unverified_issuer(token))
            if trust is None:
                raise InvalidToken("wrong_issuer")
            valid = await trust.verify_jwt(token, digest)
        elif self._opaque is not None:
            valid = await self._opaque.verify_opaque(token, digest)
        else:
            raise InvalidToken("malformed")
        self._tokens.put(digest, valid)
        return valid

    def _refused(
        self,
        scope: Scope,
        answer: Answer,
        digest: bytes | None = None,
        valid: ValidToken | None = None,
        *,
        cached: bool = False,
    ) -> Answer:
        self._auditor.stats.rejected[answer.reason] += 1
        if self._auditor.wants(logging.INFO):
            self._audit(scope, answer, digest, valid, cached)
        return answer

    def _audit(
        self,
        scope: Scope,
        answer: Answer | None,
        digest: bytes | None,
        valid: ValidToken | None,
        cached: bool,
    ) -> None:
        accepted = answer is None
        path: str = scope["path"]
        # tuple.__new__ skips the NamedTuple's Python-level __new__: this runs once per request.
        event: AuthenticationEvent = tuple.__new__(
            AuthenticationEvent,
            (
                _clock.now(),
                "accepted" if accepted else "rejected",
                None if answer is None else answer.reason,
                200 if answer is None else answer.status,
                None if valid is None else valid.shown_subject,
                None if valid is None else valid.shown_client_id,
                None if digest is None else digest[:8].hex(),
                path if path.isprintable() and len(path) <= MAX_CHARS else printable(path),
                cached,
                None if valid is None else valid.issuer,
                None if valid is None else valid.verified_by,
            ),
        )
        level = logging.DEBUG if accepted and cached else logging.INFO
        self._auditor.emit(
            level,
            event,
            "authentication %s: %s",
            event.reason or "accepted",
            event.path,
            logged_at=logging.DEBUG if accepted else level,
        )

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters: requests by outcome, cache hits and misses, exchanges by
        outcome and error, token-endpoint responses by status, fetches, audit delivery."""
        return self._auditor.stats.snapshot()

    async def invalidate_grants(self, subject: str) -> None:
        """Stop handing out ``subject``'s cached grants (offboarding, revoked consent): at once
        in this process and, with a ``shared_cache``, in Redis and every other process within
        half a second. Applies to the subject (``sub``) at every configured issuer.

        Raises :class:`SharedCacheUnavailable` when Redis cannot be told: the grants are gone
        here, and this process neither reads nor writes the subject's grants in Redis until an
        invalidation succeeds, but other processes may serve theirs until they expire; call
        again."""
        if not isinstance(subject, str) or not subject:
            raise TypeError("subject must be a non-empty string: the token's sub claim")
        exchangers = [trust.exchanger for trust in self._trusts.values()]
        for exchanger in exchangers:
            exchanger.invalidate(subject, reached_shared=self._shared is None)
        if self._shared is None:
            return
        await self._shared.invalidate(list(self._trusts), subject)
        # Again: an exchange in this process may have read the old grant from Redis while the
        # new generation was on its way, and cached it.
        for exchanger in exchangers:
            exchanger.invalidate(subject, reached_shared=True)

    async def aclose(self) -> None:
        """Stop background grant refreshes, close the HTTP client the middleware made for the
        running event loop (never one passed as ``http_client``) and the shared cache's
        connections in it. Done automatically at
        lifespan shutdown. The middleware goes on working: the next request that needs the
        authorization server makes a new client. Safe to call again, and from any loop."""
        for trust in self._trusts.values():
            await trust.exchanger.aclose()
        if self._shared is not None:
            await self._shared.aclose()
        await self._auditor.aclose()
        await self._http.aclose()

    def _closing_client_on_shutdown(self, send: Send) -> Send:
        async def send_then_close(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.aclose()
            await send(message)

        return send_then_close


class _Unsettled(NamedTuple):
    """A request whose authentication needs an await: its token, digest, and the validated
    token when cached."""

    token: bytes
    digest: bytes
    valid: ValidToken | None


def _is_preflight(scope: Scope) -> bool:
    # A CORS preflight never carries credentials; the application's CORS handling answers it.
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def _without_body(send: Send) -> Send:
    """``send`` for a response that keeps its status and headers but carries no body."""

    async def headers_only(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [
                (k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"
            ]
            message = {**message, "headers": [*headers, (b"content-length", b"0")]}
        elif kind != "http.response.trailers":
            if message.get("more_body", False):
                return  # a body chunk, or a path or file to send (extensions): nothing goes
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return headers_only


def _query_has_token(query: bytes) -> bool:
    return any(name == "access_token" for name, _ in parse_qsl(query.decode("latin-1")))


_TWO_HEADERS = Answers.invalid_request("The request has more than one Authorization header")
_TOKEN_IN_QUERY = Answers.invalid_request("Access tokens are not accepted in the query string")
_TOKEN_IN_HEADER_AND_QUERY = Answers.invalid_request(
    "The request carries an access token both in the header and the query string"
)
_EMPTY_TOKEN = Answers.invalid_request("The bearer token is empty")
