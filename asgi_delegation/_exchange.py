"""Token exchange (RFC 8693): cached, single-flight, retried, bounded.

Grants are kept by :mod:`._grants` per (subject token, resource, scope): the key holds a SHA-256
of the subject token, never the token, and an exchanger has one client and one token endpoint,
so no user, scope or audience can see another's grant. An entry is served until shortly before
the grant expires; inside the refresh margin one background refresh runs while the still-valid
grant is served; when it fails, a later hit tries again after a backoff. No grant is handed out
after the subject token expires, and an exchange for an expired subject token is refused here.
Failures are not cached.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, NamedTuple, TypeVar

import anyio
import httpx

from . import _clock
from ._audit import Auditor, ExchangeEvent
from ._callbacks import is_async
from ._client_auth import ClientAuth
from ._discovery import Discovery
from ._errors import ExchangeDenied, ExchangeError, ExchangeNotAllowed, ExchangeUnavailable
from ._fetch import HEADERS, BodyRefused, read_capped
from ._grant import Grant
from ._grants import Caller, Entry, Grants, Issued, Look, SharedCache
from ._http import HTTPClient
from ._loops import PerLoop, Slot, cancel
from ._printable import printable
from ._refresh import Unavailable
from ._singleflight import SingleFlight
from ._token_response import UNKNOWN_LIFETIME, error_from, grant_from

logger = logging.getLogger("asgi_delegation")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
TARGETS = ("resource", "audience", "both")

C = TypeVar("C", bound=Caller)
Key = tuple[bytes, str, str | None]  # subject token digest, resource, normalized scope

_MAX_BODY = 64 * 1024
_BACKOFF_BASE, _BACKOFF_CAP, _RETRY_AFTER_CAP = 0.1, 2.0, 5.0
_REFRESH_RETRY_CAP = 30.0  # the longest wait before retrying a failed refresh ahead of expiry
TARGET = re.compile(r"[\x21-\x7e]{1,2048}")


def normalize_scope(scope: str | None) -> str | None:
    if scope is None:
        return None
    if not isinstance(scope, str):
        raise TypeError("scope must be a space-separated string or None")
    return " ".join(sorted(set(scope.split()))) or None


def check_subject(context: Caller, resource: str) -> None:
    """Refuse, as the authorization server would, once the caller's token has expired: no grant
    obtained with it is handed out after that, from the cache or not."""
    if _clock.now() >= context.usable_until:
        raise ExchangeDenied(resource, "invalid_grant", "the subject token has expired")


class _Trace:
    """What one exchange's requests to the token endpoint did, for its audit event."""

    __slots__ = ("attempts", "status")

    def __init__(self) -> None:
        self.attempts = 0
        self.status: int | None = None


_JOINED = _Trace()  # a waiter's: it sent nothing itself (never written to)


_OUTCOMES: dict[type[ExchangeError], str] = {
    ExchangeDenied: "denied",
    ExchangeUnavailable: "unavailable",
    ExchangeNotAllowed: "not_allowed",
}


class _Answer(NamedTuple):
    status: int
    headers: httpx.Headers
    body: bytes


class Exchanger(Generic[C]):
    def __init__(
        self,
        discovery: Discovery,
        http: HTTPClient,
        *,
        issuer: str,
        client_auth: ClientAuth | None,
        token_endpoint: str | None,
        target: str,
        requested_token_type: str | None,
        allowed_resources: frozenset[str] | None,
        policy: Callable[[C, str, str | None], bool | Awaitable[bool]] | None,
        cache_size: int,
        shared: SharedCache | None,
        refresh_margin: float,
        deadline: float,
        limiter: PerLoop[anyio.CapacityLimiter],
        attempts: int,
        auditor: Auditor,
    ) -> None:
        self._auditor = auditor
        self._discovery = discovery
        self._http = http
        self._issuer = issuer
        self._client_auth = client_auth
        self._token_endpoint = token_endpoint
        self._target = target
        self._requested_token_type = requested_token_type
        self._allowed = allowed_resources
        self._policy = policy
        self._policy_in_thread = policy is not None and not is_async(policy)
        client_id = None if client_auth is None else client_auth.client_id
        self._grants = Grants(
            issuer=issuer,
            identity=(client_id, target, requested_token_type),
            size=cache_size,
            refresh_margin=refresh_margin,
            shared=shared,
        )
        self._deadline = deadline
        # Shared with the other issuers' exchangers and introspection; per loop, since a slot
        # held in a loop that stopped would never be given back.
        self._limiter = limiter
        self._attempts = attempts
        # By (epoch, key): after an invalidation, no request joins a flight that began before it.
        self._flight: SingleFlight[Grant] = SingleFlight()
        self._looking: set[Key] = set()  # keys a request is looking up in the shared cache
        self._background: set[asyncio.Task[Grant]] = set()

    async def exchange(self, context: C, resource: str, scope: str | None) -> Grant:
        started = time.perf_counter()
        try:
            if self._allowed is not None and resource not in self._allowed:
                raise ExchangeNotAllowed(
                    resource, "not_allowed", "the resource is not one of the allowed_resources"
                )
            check_subject(context, resource)
            if self._policy is not None:
                await self._ask_policy(context, resource, scope)
        except ExchangeError as exc:
            self._ended(context, resource, scope, started, "none", _Trace(), exc)
            raise
        key: Key = (context.token_digest, resource, scope)
        now = _clock.monotonic()
        entry = self._grants.get(key, now)
        if entry is not None:
            if now >= entry.refresh_at and not entry.refreshing:
                entry.refreshing = True
                self._refresh_in_background(key, entry, context, resource, scope)
            self._auditor.stats.grant_cache["hit"] += 1
            if self._auditor.wants(logging.DEBUG):
                self._ended(context, resource, scope, started, "hit", _Trace(), None)
            return entry.grant
        grants = self._grants
        task = self._flight.joinable((grants.epoch, key))
        look: Look = "none"
        if task is None and key not in self._looking:
            if grants.sharing(context):  # asked once per request: it may use a breaker's probe
                # Another process's grant, if there is one, without a flight: a shared hit
                # then costs about one round trip. Requests that come meanwhile do not look
                # too: the first of them starts the flight, which looks once for them all.
                self._looking.add(key)
                try:
                    found = await grants.from_shared(key, context)
                finally:
                    self._looking.discard(key)
                if isinstance(found, Grant):
                    check_subject(context, resource)
                    self._ended(context, resource, scope, started, "shared", _JOINED, None)
                    return found
                look = found
                task = self._flight.joinable((grants.epoch, key))
            else:
                look = "skip"
        flight = (grants.epoch, key)
        if task is None:
            cache, trace = "miss", _Trace()
            work = partial(
                self._obtain, key, context, resource, scope, trace, refresh=False, look=look
            )
            task = self._flight.start(flight, work)
        else:  # a burst's waiters share the work and its trace: they add a counter each
            cache, trace = "joined", _JOINED
        try:
            grant = await asyncio.shield(task)
            check_subject(context, resource)  # it may have expired while the request was out
        except ExchangeError as exc:
            self._ended(context, resource, scope, started, cache, trace, exc)
            raise
        if cache == "miss" and trace.attempts == 0:
            cache = "shared"  # another process's grant after all: the token endpoint not asked
        self._ended(context, resource, scope, started, cache, trace, None)
        return grant

    def _ended(
        self,
        context: C,
        resource: str,
        scope: str | None,
        started: float,
        cache: str,
        trace: _Trace,
        error: ExchangeError | None,
    ) -> None:
        """Count and report one exchange (or background refresh) that is over."""
        stats = self._auditor.stats
        outcome = "granted" if error is None else _OUTCOMES[type(error)]
        if cache != "hit":
            if cache != "none":
                stats.grant_cache[cache] += 1
            stats.exchanges[outcome] += 1
            if error is not None:
                stats.exchange_errors[error.error] += 1
        milliseconds = (time.perf_counter() - started) * 1000
        if cache in ("miss", "refresh") and trace.attempts:
            stats.exchange_latency(milliseconds)
        # A hit, or a wait for another request's exchange, is DEBUG: a burst of identical
        # requests costs its waiters a counter each. A grant obtained is an INFO event, logged
        # at DEBUG (see the middleware's acceptance events); a failure is a WARNING.
        if error is not None:
            level = logged_at = logging.WARNING
        else:
            level = logging.DEBUG if cache in ("hit", "joined") else logging.INFO
            logged_at = logging.DEBUG
        if not self._auditor.wants(level, logged_at):
            return
        client_id = context.client_id
        event = ExchangeEvent(
            at=_clock.now(),
            subject=printable(context.subject),
            client_id=None if client_id is None else printable(client_id),
            resource=printable(resource),
            scope=None if scope is None else printable(scope),
            outcome=outcome,
            cache=cache,
            latency_ms=milliseconds,
            status=trace.status,
            error=None if error is None else error.error,
            attempts=trace.attempts,
            issuer=self._issuer,
        )
        self._auditor.emit(
            level,
            event,
            "exchange for %s %s (%s)",
            event.resource,
            outcome,
            cache,
            logged_at=logged_at,
        )

    async def forget(self, context: C, resource: str, scope: str | None, grant: Grant) -> None:
        """Drop ``grant`` from the caches (an upstream API refused it); a newer one stays."""
        await self._grants.discard((context.token_digest, resource, scope), context, grant)

    def invalidate(self, subject: str, *, reached_shared: bool) -> None:
        """Drop ``subject``'s grants from the in-process cache; until the shared cache has
        been told (``reached_shared``), do not read or write its grants there either."""
        self._grants.invalidated(subject.__eq__)
        self._grants.share(subject, reached_shared)

    async def aclose(self) -> None:
        for task in list(self._background):
            if task.get_loop().is_closed():
                self._background.discard(task)  # it will never run again, nor land
            else:
                cancel(task)

    async def _ask_policy(self, context: C, resource: str, scope: str | None) -> None:
        assert self._policy is not None
        if self._policy_in_thread:  # a sync policy may block (a database, a file)
            verdict = await anyio.to_thread.run_sync(self._policy, context, resource, scope)
        else:
            verdict = self._policy(context, resource, scope)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if verdict is not True:
            raise ExchangeNotAllowed(resource, "not_allowed", "the application's policy refused")

    async def _obtain(
        self,
        key: Key,
        context: C,
        resource: str,
        scope: str | None,
        trace: _Trace,
        *,
        refresh: bool,
        look: Look = "none",
    ) -> Grant:
        fetch = partial(self._issue, context.subject_token, resource, scope, trace)
        return await self._grants.obtain(key, context, fetch, refresh=refresh, look=look)

    async def _issue(
        self, subject_token: str, resource: str, scope: str | None, trace: _Trace
    ) -> Issued:
        grant, seconds = await self._request(subject_token, resource, scope, trace)
        lifetime = UNKNOWN_LIFETIME if seconds is None else seconds
        return Issued(grant, _clock.now() + lifetime, lifetime)

    def _refresh_in_background(
        self, key: Key, entry: Entry, context: C, resource: str, scope: str | None
    ) -> None:
        trace = _Trace()
        work = partial(self._obtain, key, context, resource, scope, trace, refresh=True)
        task = self._flight.start((self._grants.epoch, key), work)
        task.add_done_callback(partial(self._retry_unless_replaced, key, entry))
        if task not in self._background:
            self._background.add(task)
            started = time.perf_counter()
            task.add_done_callback(
                partial(self._refreshed, context, resource, scope, started, trace)
            )

    def _retry_unless_replaced(
        self, key: Hashable, entry: Entry, task: asyncio.Task[Grant]
    ) -> None:
        """Let a later hit refresh ``entry`` again, after a backoff, if this refresh did not
        replace it (it failed, or its grant was too short-lived to cache)."""
        if self._grants.peek(key) is not entry:
            return
        delay = random.uniform(entry.backoff / 2, entry.backoff)  # noqa: S311 - jitter
        entry.refresh_at = _clock.monotonic() + delay
        entry.backoff = min(entry.backoff * 2, _REFRESH_RETRY_CAP)
        entry.refreshing = False

    def _refreshed(
        self,
        context: C,
        resource: str,
        scope: str | None,
        started: float,
        trace: _Trace,
        task: asyncio.Task[Grant],
    ) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, ExchangeError):
            # Only the type: an unexpected exception's text is not known to be free of secrets.
            logger.warning(
                "refreshing a grant for %s ahead of expiry failed: %s",
                printable(resource),
                type(error).__name__,
            )
            return
        self._ended(context, resource, scope, started, "refresh", trace, error)

    async def _endpoint(self, resource: str) -> str:
        if self._token_endpoint is not None:
            return self._token_endpoint
        try:
            endpoint = (await self._discovery.get()).token_endpoint
        except Unavailable as exc:
            raise ExchangeUnavailable(
                resource,
                "temporarily_unavailable",
                "the authorization server metadata cannot be fetched",
                retry_after=exc.retry_after,
            ) from None
        if endpoint is None:
            raise ExchangeUnavailable(
                resource, "invalid_response", "the authorization server has no token_endpoint"
            )
        return endpoint

    def _form(self, subject_token: str, resource: str, scope: str | None) -> dict[str, str]:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
        }
        if self._target != "audience":
            form["resource"] = resource
        if self._target != "resource":
            form["audience"] = resource
        if scope is not None:
            form["scope"] = scope
        if self._requested_token_type is not None:
            form["requested_token_type"] = self._requested_token_type
        return form

    async def _request(
        self, subject_token: str, resource: str, scope: str | None, trace: _Trace
    ) -> tuple[Grant, float | None]:
        if not TARGET.fullmatch(resource):
            raise ExchangeNotAllowed(resource[:100], "invalid_target", "not a resource identifier")
        if self._client_auth is None:
            raise ExchangeNotAllowed(
                resource,
                "client_not_configured",
                f"no client credentials are configured for the issuer {self._issuer}",
            )
        endpoint = await self._endpoint(resource)
        give_up_at = anyio.current_time() + self._deadline
        while True:
            # Credentials per attempt: an assertion's jti must not be replayed by a retry.
            form = self._form(subject_token, resource, scope)
            headers = dict(HEADERS)
            try:
                with anyio.fail_after(max(give_up_at - anyio.current_time(), 0)):
                    await self._client_auth.apply(form, headers, endpoint)
            except TimeoutError:  # an OSError too: caught first
                raise ExchangeUnavailable(
                    resource,
                    "temporarily_unavailable",
                    f"the client credentials were not ready within {self._deadline:g} s",
                ) from None
            except OSError as exc:
                raise ExchangeUnavailable(resource, "temporarily_unavailable", str(exc)) from None
            started = time.perf_counter()
            answer = await self._post(endpoint, form, headers, resource, give_up_at)
            trace.attempts += 1
            error: ExchangeError
            if isinstance(answer, ExchangeUnavailable):
                self._auditor.stats.token_endpoint["network"] += 1
                self._auditor.fetched("token", endpoint, started, answer.error_description, "POST")
                error = answer
            else:
                trace.status = answer.status
                self._auditor.stats.token_endpoint[str(answer.status)] += 1
                failure = None if answer.status == 200 else f"answered HTTP {answer.status}"
                self._auditor.fetched("token", endpoint, started, failure, "POST")
                if answer.status == 200:
                    return grant_from(resource, scope, answer.body)
                secrets = (subject_token, *self._client_auth.secrets())
                error = error_from(resource, answer.status, answer.body, answer.headers, secrets)
                if error.error != "temporarily_unavailable":  # only 5xx and 429 are retried
                    raise error
            backoff = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (trace.attempts - 1))
            delay = random.uniform(0, backoff)  # noqa: S311 - jitter, not a secret
            if error.retry_after is not None:
                delay = max(delay, min(error.retry_after, _RETRY_AFTER_CAP))
            if trace.attempts >= self._attempts or anyio.current_time() + delay >= give_up_at:
                raise error
            await anyio.sleep(delay)

    async def _post(
        self,
        endpoint: str,
        form: dict[str, str],
        headers: dict[str, str],
        resource: str,
        give_up_at: float,
    ) -> _Answer | ExchangeUnavailable:
        """One POST with its body read (capped), or the network error to retry after."""
        try:
            with anyio.fail_after(max(give_up_at - anyio.current_time(), 0)):
                async with (
                    Slot(self._limiter.get()),
                    self._http.get().stream(
                        "POST", endpoint, data=form, headers=headers, follow_redirects=False
                    ) as response,
                ):
                    body = await read_capped(response, _MAX_BODY)
        except TimeoutError:
            raise ExchangeUnavailable(
                resource,
                "temporarily_unavailable",
                f"the token endpoint gave no answer within {self._deadline:g} s",
            ) from None
        except BodyRefused as exc:
            raise ExchangeUnavailable(
                resource, "invalid_response", f"the token endpoint answered {exc}"
            ) from None
        except Exception as exc:
            # Anything httpx or the network below it raises (not only httpx.HTTPError): named
            # by its type alone, since its text may quote the request, which holds the token.
            return ExchangeUnavailable(
                resource,
                "temporarily_unavailable",
                f"the token endpoint could not be reached ({type(exc).__name__})",
            )
        return _Answer(response.status_code, response.headers, body)
