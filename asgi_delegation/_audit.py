"""Audit events, counters, and their delivery: who got a token for what, when, and why not.

Every inbound authentication, every exchange and every fetch from the authorization server
becomes an immutable event. Events go to the ``asgi_delegation.audit`` logger (structured:
``record.audit`` is the event as a dict) and to an optional ``on_audit`` callback behind a
bounded queue, taken from it in order by a task of its own: an async callback runs in that task,
a sync one in a worker thread (one thread hop per batch of events). A slow, blocking or failing
callback never slows or breaks a request; what does not fit in the queue is dropped and counted.
Events carry subjects, client ids, resources and a short hash of the token for correlation,
never a token or a secret. Events of level INFO and above also go to the OpenTelemetry sink when
there is one (_otel.py).

Log levels: authentications answered from the validated-token cache and grant-cache hits are
DEBUG (one per request); a token's first acceptance, rejections, exchanges and fetches INFO;
failed exchanges and fetches WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeAlias

import anyio

from . import _clock
from ._callbacks import is_async

logger = logging.getLogger("asgi_delegation.audit")
_errors = logging.getLogger("asgi_delegation")

_QUEUE_SIZE = 10_000


class AuthenticationEvent(NamedTuple):
    """An inbound request was authenticated (``accepted``) or answered here (``rejected``)."""

    at: float  #: Unix time
    outcome: str  #: "accepted" or "rejected"
    reason: str | None  #: why rejected: missing, invalid_request, expired, bad_signature, ...
    status: int  #: the HTTP status answered; 200 when the request went on to the app
    subject: str | None
    client_id: str | None  #: the token's ``client_id`` or ``azp``
    token_id: str | None  #: the first 16 hex digits of the token's SHA-256, for correlation
    path: str
    cached: bool  #: validated from the cache
    issuer: str | None = None  #: the configured issuer that vouched for the token
    verified_by: str | None = None  #: "jwt" (signature) or "introspection" (RFC 7662)


class ExchangeEvent(NamedTuple):
    """A call to ``AccessContext.exchange`` (or a background refresh) ended."""

    at: float
    subject: str
    client_id: str | None  #: the caller's ``client_id`` or ``azp``
    resource: str
    scope: str | None
    outcome: str  #: "granted", "denied", "unavailable" or "not_allowed"
    #: "hit", "miss", "joined" (shared another call's request), "refresh", or "none" (refused
    #: by allowed_resources, for an expired subject token or by the policy before the cache was
    #: consulted)
    cache: str
    latency_ms: float
    status: int | None  #: the token endpoint's last HTTP status, for the call that asked it
    error: str | None  #: the OAuth error code when not granted
    attempts: int  #: requests this call sent to the token endpoint
    issuer: str | None = None  #: the caller's issuer, whose token endpoint was asked


class FetchEvent(NamedTuple):
    """One request to the authorization server: its metadata, its JWKS, or (POST) its token
    endpoint, once per attempt of an exchange."""

    at: float
    document: str  #: "metadata", "jwks", "token" or "introspection"
    url: str
    outcome: str  #: "ok" or "failed" (for the token endpoint: any answer but 200)
    detail: str | None  #: why it failed
    latency_ms: float
    method: str = "GET"


AuditEvent: TypeAlias = AuthenticationEvent | ExchangeEvent | FetchEvent
AuditCallback: TypeAlias = Callable[[AuditEvent], "Awaitable[None] | None"]


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


class Stats:
    """Counters, updated in place on every request (plain integer increments)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.token_hits = 0
        self.token_misses = 0
        self.grant_cache: Counter[str] = Counter()  # hit / miss / joined / refresh / shared
        self.exchanges: Counter[str] = Counter()  # by outcome
        self.exchange_errors: Counter[str] = Counter()  # by OAuth error code
        self.token_endpoint: Counter[str] = Counter()  # by HTTP status, or "network"
        self.fetches: Counter[str] = Counter()  # "jwks ok", "metadata failed", ...
        self.latency_count = 0
        self.latency_total = 0.0
        self.latency_max = 0.0
        self.delivered = 0
        self.dropped = 0
        self.callback_errors = 0
        self.shared: Callable[[], dict[str, Any]] | None = None  # the shared cache's counters

    def exchange_latency(self, milliseconds: float) -> None:
        self.latency_count += 1
        self.latency_total += milliseconds
        self.latency_max = max(self.latency_max, milliseconds)

    def snapshot(self) -> dict[str, Any]:
        count = self.latency_count
        snapshot: dict[str, Any] = {
            "requests": {"accepted": self.accepted, "rejected": dict(self.rejected)},
            "caches": {
                "tokens": {"hits": self.token_hits, "misses": self.token_misses},
                "grants": {
                    k: self.grant_cache[k] for k in ("hit", "miss", "joined", "refresh", "shared")
                },
            },
            "exchanges": {
                "outcomes": dict(self.exchanges),
                "errors": dict(self.exchange_errors),
                "latency_ms": {
                    "count": count,
                    "mean": self.latency_total / count if count else 0.0,
                    "max": self.latency_max,
                },
            },
            "token_endpoint": {"responses": dict(self.token_endpoint)},
            "fetches": dict(self.fetches),
            "audit": {
                "delivered": self.delivered,
                "dropped": self.dropped,
                "callback_errors": self.callback_errors,
            },
        }
        if self.shared is not None:
            snapshot["caches"]["shared"] = self.shared()
        return snapshot


class Telemetry(Protocol):
    """Gets the events of level INFO and above, and reads the counters when it likes."""

    def observe(self, stats: Stats) -> None: ...

    def record(self, event: AuditEvent) -> None: ...


class Auditor:
    def __init__(self, on_audit: AuditCallback | None, telemetry: Telemetry | None = None) -> None:
        self.stats = Stats()
        self._callback = on_audit
        self._in_thread = on_audit is not None and not is_async(on_audit)
        self._telemetry = telemetry
        if telemetry is not None:
            telemetry.observe(self.stats)
        self._pending: deque[AuditEvent] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None

    def wants(self, level: int, logged_at: int | None = None) -> bool:
        """Whether an event at ``level``, logged at ``logged_at`` (default: ``level``), has
        anyone to go to (build it only then)."""
        return (
            self._callback is not None
            or logger.isEnabledFor(level if logged_at is None else logged_at)
            or (self._telemetry is not None and level >= logging.INFO)
        )

    def emit(
        self,
        level: int,
        event: AuditEvent,
        message: str,
        *args: object,
        logged_at: int | None = None,
    ) -> None:
        """Hand ``event`` to the logger (``message % args``, formatted only if logged, at
        ``logged_at`` when given), the telemetry sink and the callback's queue."""
        log_level = level if logged_at is None else logged_at
        if logger.isEnabledFor(log_level):
            extra = {"audit": event._asdict(), "audit_event": type(event).__name__}
            logger.log(log_level, message, *args, extra=extra)
        if self._telemetry is not None and level >= logging.INFO:
            self._telemetry.record(event)
        if self._callback is None:
            return
        # A worker dies with its event loop (asyncio.run cancels it): then one starts in this
        # loop, since a middleware may outlive the loop it first ran in.
        if self._worker is None or self._worker.done():
            self._start_worker(asyncio.get_running_loop())
        if len(self._pending) >= _QUEUE_SIZE:
            self.stats.dropped += 1
            return
        self._pending.append(event)
        # Woken only when idle: a busy worker finds the new event when it looks again.
        if not self._wake.is_set():
            self._wake.set()

    def _start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop_worker()
        self._loop = loop
        self._wake = asyncio.Event()
        self._worker = loop.create_task(self._deliver(self._pending, self._wake))

    async def _deliver(self, pending: deque[AuditEvent], wake: asyncio.Event) -> None:
        callback, stats = self._callback, self.stats
        assert callback is not None
        while True:
            await wake.wait()
            while pending:
                if self._in_thread:
                    # Abandoned if cancelled: a callback stuck in the thread must not hold up
                    # the shutdown of the loop.
                    await anyio.to_thread.run_sync(self._drain, pending, abandon_on_cancel=True)
                    continue
                event = pending.popleft()
                try:
                    result = callback(event)
                    if result is not None:
                        await result
                    stats.delivered += 1
                except Exception:  # the callback's own failure: logged, never a request's
                    self._failed(event)
            # Cleared only once drained: while set, emit() need not wake the worker again.
            wake.clear()

    def _drain(self, pending: deque[AuditEvent]) -> None:
        """In a worker thread: hand ``pending`` to the sync callback until it is empty,
        events queued meanwhile included."""
        callback, stats = self._callback, self.stats
        assert callback is not None
        while True:
            try:
                event = pending.popleft()  # atomic: the loop thread appends meanwhile
            except IndexError:
                return
            try:
                result = callback(event)
                # A sync callback returns None: no need to ask whether that is awaitable.
                if result is not None and inspect.isawaitable(result):
                    anyio.from_thread.run(_awaited, result)
                stats.delivered += 1
            except Exception:
                self._failed(event)

    def _failed(self, event: AuditEvent) -> None:
        self.stats.callback_errors += 1
        _errors.exception("the on_audit callback failed on a %s", type(event).__name__)

    def _stop_worker(self) -> None:
        """Stop delivering; what is still queued counts as dropped."""
        pending, self._pending = self._pending, deque()
        # One by one: a worker thread may still be taking events from it.
        with contextlib.suppress(IndexError):
            while True:
                pending.popleft()
                self.stats.dropped += 1
        worker = self._worker
        if worker is not None and not worker.done() and not worker.get_loop().is_closed():
            worker.get_loop().call_soon_threadsafe(worker.cancel)
        self._worker = self._loop = None

    def fetched(
        self, document: str, url: str, started: float, error: str | None, method: str = "GET"
    ) -> None:
        """Count and report one request for ``document`` that began at ``started``
        (perf_counter)."""
        outcome = "ok" if error is None else "failed"
        self.stats.fetches[f"{document} {outcome}"] += 1
        level = logging.INFO if error is None else logging.WARNING
        # A POST that worked (an exchange, an introspection) happens per caller: logged at
        # DEBUG, as the acceptances and grants it serves are. Fetched documents stay INFO.
        logged_at = logging.DEBUG if error is None and method == "POST" else level
        if self.wants(level, logged_at):
            milliseconds = (time.perf_counter() - started) * 1000
            event = FetchEvent(_clock.now(), document, url, outcome, error, milliseconds, method)
            self.emit(
                level, event, "%s %s %s: %s", method, document, outcome, url, logged_at=logged_at
            )

    async def aclose(self) -> None:
        self._stop_worker()
