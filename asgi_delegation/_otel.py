"""OpenTelemetry spans and metrics from the audit events (the ``otel`` extra).

Only events of level INFO and above reach this sink: a token's first acceptance, rejections,
exchanges that did not come from the grant cache, and fetches of the authorization server's
metadata and JWKS. A request answered from the validated-token cache (DEBUG) builds nothing and
costs nothing here. Each event becomes a span created after the fact, with explicit start and end
times (the event's ``at`` minus its latency, and ``at``), as a child of the current span:

- ``asgi_delegation.authenticate`` (INTERNAL): ``enduser.id``, ``asgi_delegation.outcome``,
  ``asgi_delegation.reason``, ``asgi_delegation.client_id``, ``asgi_delegation.token_id`` (a
  short hash, for correlation with the audit log), ``asgi_delegation.issuer``,
  ``asgi_delegation.verified_by`` ("jwt" or "introspection"), ``url.path``,
  ``http.response.status_code``. Zero-length: the event does not carry a duration. A rejection
  is an outcome, not an error; only a 5xx answer (no usable keys) sets status ERROR.
- ``asgi_delegation.exchange`` (INTERNAL): ``enduser.id``, ``asgi_delegation.client_id``,
  ``asgi_delegation.resource``, ``asgi_delegation.scope``, ``asgi_delegation.outcome``,
  ``asgi_delegation.cache``, ``asgi_delegation.attempts``, ``asgi_delegation.issuer``,
  ``http.response.status_code`` (the
  token endpoint's last answer), ``error.type`` (the OAuth error code); status ERROR when not
  granted.
- ``GET`` or ``POST`` (CLIENT), one per request to the authorization server (metadata, JWKS,
  and each token-endpoint attempt), with the HTTP semantic conventions:
  ``http.request.method``, ``url.full``, ``url.scheme``, ``server.address``, ``server.port``,
  ``http.response.status_code`` when known, ``error.type`` on failure, and
  ``asgi_delegation.document`` ("metadata", "jwks", "token" or "introspection").

Metrics, from the meter named ``asgi_delegation``:

- ``http.client.request.duration`` (histogram, s) per fetch, with the semantic-convention
  attributes of the span above (no ``url.full``: it is not a metric attribute);
- ``asgi_delegation.exchange.duration`` (histogram, s) by ``asgi_delegation.outcome`` and
  ``asgi_delegation.cache``;
- observable counters read from :class:`~asgi_delegation._audit.Stats` when the reader
  collects, so they cost nothing per request: ``asgi_delegation.requests`` by outcome and
  reason, ``asgi_delegation.cache.hits`` and ``asgi_delegation.cache.misses`` by
  ``asgi_delegation.cache`` ("tokens", "grants" or, with a shared cache, "shared"; a grant
  lookup that joined another call's request or was answered by the shared cache counts as a
  grants miss), ``asgi_delegation.exchanges`` by outcome,
  ``asgi_delegation.token_endpoint.responses`` by ``http.response.status_code`` (or
  ``error.type`` = "network").

Several middlewares may share one meter provider: the observable counters are registered once
per provider and add up the counters of every live middleware.

No attribute ever holds a token, a secret or an exchanged token: events carry none.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from ._audit import AuditEvent, AuthenticationEvent, ExchangeEvent, FetchEvent, Stats
from ._errors import ConfigurationError

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import (
        CallbackOptions,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )
    from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
except ModuleNotFoundError:  # pragma: no cover - exercised only without the otel extra
    AVAILABLE = False
else:
    AVAILABLE = True

_errors = logging.getLogger("asgi_delegation")

SCOPE_NAME = "asgi_delegation"
#: Seconds: the boundaries the semantic conventions advise for HTTP request durations.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_HTTP_STATUS = re.compile(r"answered HTTP (\d{3})$")
_NETWORK_ERROR = re.compile(r"failed: (\w+)$")


def telemetry(
    enabled: bool,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> OpenTelemetrySink | None:
    """The sink for ``DelegationMiddleware(opentelemetry=enabled)``: None when off.

    Off unless asked for: instrumenting costs some microseconds on first-seen tokens and
    rejections, even with no SDK behind the API. ``False`` is off whatever providers are given.
    """
    if not isinstance(enabled, bool):
        raise ConfigurationError("opentelemetry must be True or False")
    if not enabled:
        return None
    if not AVAILABLE:
        raise ConfigurationError(
            "opentelemetry needs the opentelemetry-api package: pip install 'asgi-delegation[otel]'"
        )
    return OpenTelemetrySink(tracer_provider, meter_provider)


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asgi-delegation")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return None


def _seconds_histogram(meter: Meter, name: str, description: str) -> Histogram:
    """A histogram in seconds, with the HTTP semantic conventions' bucket boundaries (the
    SDK's default boundaries suit milliseconds) when the API can advise them (1.30+)."""
    try:
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
    except TypeError:  # pragma: no cover - opentelemetry-api before 1.30
        return meter.create_histogram(name, "s", description)


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


def _server(url: str) -> dict[str, Any]:
    """``url.scheme``, ``server.address`` and ``server.port`` of ``url``."""
    parts = urlsplit(url)
    attributes: dict[str, Any] = {"url.scheme": parts.scheme}
    if parts.hostname:
        attributes["server.address"] = parts.hostname
    try:
        port = parts.port
    except ValueError:  # pragma: no cover - configured URLs are checked
        port = None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    if port is not None:
        attributes["server.port"] = port
    return attributes


def _fetch_outcome(event: FetchEvent) -> tuple[int | None, str | None]:
    """The HTTP status the fetch got, when known, and the ``error.type`` of a failure."""
    if event.outcome == "ok":
        return 200, None
    detail = event.detail or ""
    if match := _HTTP_STATUS.search(detail):
        return int(match[1]), match[1]
    if match := _NETWORK_ERROR.search(detail):
        return None, match[1]
    if "took longer than" in detail:
        return None, "timeout"
    return None, "invalid_response"


def _without_none(attributes: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in attributes.items() if value is not None}


_Key = tuple[tuple[str, Any], ...]  # a set of attributes, hashable


def _observations(counts: Counter[_Key]) -> list[Observation]:
    return [Observation(value, dict(attributes)) for attributes, value in counts.items()]


class _Observed:
    """The observable counters of one meter provider, summed over the middlewares using it."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._stats: weakref.WeakSet[Stats] = weakref.WeakSet()
        meter.create_observable_counter(
            "asgi_delegation.requests", [self._requests], "{request}", "Requests authenticated"
        )
        meter.create_observable_counter(
            "asgi_delegation.cache.hits", [self._hits], "{lookup}", "Cache hits"
        )
        meter.create_observable_counter(
            "asgi_delegation.cache.misses", [self._misses], "{lookup}", "Cache misses"
        )
        meter.create_observable_counter(
            "asgi_delegation.exchanges", [self._exchanges], "{exchange}", "Token exchanges"
        )
        meter.create_observable_counter(
            "asgi_delegation.token_endpoint.responses",
            [self._responses],
            "{response}",
            "Answers of the token endpoint",
        )

    def add(self, stats: Stats) -> None:
        with self._lock:
            self._stats.add(stats)

    def _snapshots(self) -> list[dict[str, Any]]:
        # Runs on the metric reader's thread; snapshot() copies each counter in one C call.
        with self._lock:
            every = list(self._stats)
        return [stats.snapshot() for stats in every]

    def _requests(self, options: CallbackOptions) -> list[Observation]:
        counts: Counter[_Key] = Counter()
        for snapshot in self._snapshots():
            requests = snapshot["requests"]
            counts[(("asgi_delegation.outcome", "accepted"),)] += requests["accepted"]
            for reason, n in requests["rejected"].items():
                counts[
                    (("asgi_delegation.outcome", "rejected"), ("asgi_delegation.reason", reason))
                ] += n
        return _observations(counts)

    def _hits(self, options: CallbackOptions) -> list[Observation]:
        counts: Counter[_Key] = Counter()
        for snapshot in self._snapshots():
            caches = snapshot["caches"]
            counts[(("asgi_delegation.cache", "tokens"),)] += caches["tokens"]["hits"]
            counts[(("asgi_delegation.cache", "grants"),)] += caches["grants"]["hit"]
            if "shared" in caches:
                counts[(("asgi_delegation.cache", "shared"),)] += caches["shared"]["hit"]
        return _observations(counts)

    def _misses(self, options: CallbackOptions) -> list[Observation]:
        counts: Counter[_Key] = Counter()
        for snapshot in self._snapshots():
            caches = snapshot["caches"]
            grants = caches["grants"]
            counts[(("asgi_delegation.cache", "tokens"),)] += caches["tokens"]["misses"]
            counts[(("asgi_delegation.cache", "grants"),)] += (
                grants["miss"] + grants["joined"] + grants["shared"]
            )
            if "shared" in caches:
                counts[(("asgi_delegation.cache", "shared"),)] += caches["shared"]["miss"]
        return _observations(counts)

    def _exchanges(self, options: CallbackOptions) -> list[Observation]:
        counts: Counter[_Key] = Counter()
        for snapshot in self._snapshots():
            for outcome, n in snapshot["exchanges"]["outcomes"].items():
                counts[(("asgi_delegation.outcome", outcome),)] += n
        return _observations(counts)

    def _responses(self, options: CallbackOptions) -> list[Observation]:
        counts: Counter[_Key] = Counter()
        for snapshot in self._snapshots():
            for status, n in snapshot["token_endpoint"]["responses"].items():
                if status.isdigit():
                    counts[(("http.response.status_code", int(status)),)] += n
                else:  # "network": no answer
                    counts[(("error.type", status),)] += n
        return _observations(counts)


# One set of observable counters per meter provider: the SDK keeps only the first callbacks
# registered under a name, so a second middleware's would be ignored.
_observed: weakref.WeakKeyDictionary[object, _Observed] = weakref.WeakKeyDictionary()
_observed_lock = threading.Lock()


class OpenTelemetrySink:
    """Spans and metrics from audit events; see the module's documentation."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        version = _version()
        self._tracer = trace.get_tracer(SCOPE_NAME, version, tracer_provider)
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter(SCOPE_NAME, version)
        self._fetch_duration = _seconds_histogram(
            meter,
            "http.client.request.duration",
            "Duration of HTTP client requests to the authorization server",
        )
        self._exchange_duration = _seconds_histogram(
            meter,
            "asgi_delegation.exchange.duration",
            "Duration of token exchanges not answered from the grant cache",
        )
        with _observed_lock:
            try:
                observed = _observed.get(provider)
                if observed is None:
                    observed = _observed[provider] = _Observed(meter)
            except TypeError:  # a provider that cannot be weakly referenced: not shared
                observed = _Observed(meter)
        self._observed = observed

    def observe(self, stats: Stats) -> None:
        """Report ``stats`` through the observable counters."""
        self._observed.add(stats)

    def record(self, event: AuditEvent) -> None:
        """Turn one event into a span and measurements; never raises."""
        try:
            if isinstance(event, AuthenticationEvent):
                self._authenticated(event)
            elif isinstance(event, ExchangeEvent):
                self._exchanged(event)
            else:
                self._fetched(event)
        except Exception:  # telemetry must never break a request
            _errors.exception("recording a %s for OpenTelemetry failed", type(event).__name__)

    def _span(
        self,
        name: str,
        kind: SpanKind,
        event: AuditEvent,
        latency_ms: float,
        attributes: dict[str, Any],
        error: str | None,
    ) -> None:
        end = _nanoseconds(event.at)
        start = min(end, _nanoseconds(event.at - latency_ms / 1000))
        span = self._tracer.start_span(
            name, kind=kind, attributes=_without_none(attributes), start_time=start
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end)

    def _authenticated(self, event: AuthenticationEvent) -> None:
        failed = event.status >= 500
        attributes = {
            "enduser.id": event.subject,
            "asgi_delegation.outcome": event.outcome,
            "asgi_delegation.reason": event.reason,
            "asgi_delegation.client_id": event.client_id,
            "asgi_delegation.token_id": event.token_id,
            "asgi_delegation.issuer": event.issuer,
            "asgi_delegation.verified_by": event.verified_by,
            "url.path": event.path,
            "http.response.status_code": event.status,
            "error.type": event.reason if failed else None,
        }
        error = event.reason if failed else None
        self._span("asgi_delegation.authenticate", SpanKind.INTERNAL, event, 0.0, attributes, error)

    def _exchanged(self, event: ExchangeEvent) -> None:
        failed = event.outcome != "granted"
        attributes = {
            "enduser.id": event.subject,
            "asgi_delegation.client_id": event.client_id,
            "asgi_delegation.resource": event.resource,
            "asgi_delegation.scope": event.scope,
            "asgi_delegation.outcome": event.outcome,
            "asgi_delegation.cache": event.cache,
            "asgi_delegation.attempts": event.attempts,
            "asgi_delegation.issuer": event.issuer,
            "http.response.status_code": event.status,
            "error.type": event.error if failed else None,
        }
        error = (event.error or event.outcome) if failed else None
        self._span(
            "asgi_delegation.exchange",
            SpanKind.INTERNAL,
            event,
            event.latency_ms,
            attributes,
            error,
        )
        self._exchange_duration.record(
            event.latency_ms / 1000,
            {"asgi_delegation.outcome": event.outcome, "asgi_delegation.cache": event.cache},
        )

    def _fetched(self, event: FetchEvent) -> None:
        status, error_type = _fetch_outcome(event)
        attributes = {
            "http.request.method": event.method,
            **_server(event.url),
            "http.response.status_code": status,
            "error.type": error_type,
        }
        measured = _without_none(attributes)
        span_attributes = {
            **measured,
            "url.full": event.url,
            "asgi_delegation.document": event.document,
        }
        error = None if event.outcome == "ok" else (event.detail or "failed")
        self._span(event.method, SpanKind.CLIENT, event, event.latency_ms, span_attributes, error)
        self._fetch_duration.record(event.latency_ms / 1000, measured)
