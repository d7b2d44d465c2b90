"""OpenTelemetry spans and metrics from the audit events, checked with the SDK's in-memory
exporter and reader (providers passed explicitly: the global ones are never touched)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from inspect import signature
from typing import Any

import pytest
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from asgi_delegation import ConfigurationError, DelegationMiddleware, _otel
from asgi_delegation._audit import Auditor, FetchEvent
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import CLIENT_SECRET, GITHUB, RESOURCE, SLACK, Gateway, echo_app, exchanger_of

ISSUER = "http://127.0.0.1"
METADATA_URL = f"{ISSUER}/.well-known/oauth-authorization-server"
JWKS_URL = f"{ISSUER}/jwks"
#: Histograms take the advised bucket boundaries from opentelemetry 1.30 on.
ADVISED_BUCKETS = (
    "explicit_bucket_boundaries_advisory" in signature(Meter.create_histogram).parameters
)


@dataclass
class Telemetry:
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    tracer_provider: TracerProvider = field(default_factory=TracerProvider)
    meter_provider: MeterProvider = field(init=False)

    def __post_init__(self) -> None:
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def options(self) -> dict[str, Any]:
        return {
            "opentelemetry": True,
            "tracer_provider": self.tracer_provider,
            "meter_provider": self.meter_provider,
        }

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """The finished spans of the middleware (not the test's own), oldest first."""
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.instrumentation_scope is not None
            and s.instrumentation_scope.name == "asgi_delegation"
            and (name is None or s.name == name)
        ]

    def only(self, name: str) -> ReadableSpan:
        spans = self.spans(name)
        assert len(spans) == 1, [s.name for s in self.spans()]
        return spans[0]

    def metrics(self) -> dict[str, list[Any]]:
        """Every data point by metric name."""
        data = self.reader.get_metrics_data()
        points: dict[str, list[Any]] = {}
        if data is None:
            return points
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points

    def values(
        self, name: str, collected: dict[str, list[Any]] | None = None
    ) -> dict[frozenset[tuple[str, Any]], Any]:
        """The points of counter ``name`` (their value) or histogram ``name`` (their count),
        by attribute set, from ``collected`` or a collection made now."""
        result = {}
        for point in (self.metrics() if collected is None else collected).get(name, []):
            value = point.count if isinstance(point, HistogramDataPoint) else point.value
            result[frozenset((point.attributes or {}).items())] = value
        return result


def attrs(**kw: Any) -> frozenset[tuple[str, Any]]:
    return frozenset((k.replace("__", "."), v) for k, v in kw.items())


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


@pytest.fixture
def minted(auth: LocalAuthorizationServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token ``auth`` signs from now on, exchanged ones included."""
    tokens: list[str] = []
    original = auth.mint

    def mint(*args: Any, **kwargs: Any) -> str:
        tokens.append(original(*args, **kwargs))
        return tokens[-1]

    monkeypatch.setattr(auth, "mint", mint)
    return tokens


@pytest.fixture
def traced(gateway_factory: Callable[..., Gateway], telemetry: Telemetry) -> Gateway:
    return gateway_factory(**telemetry.options)


async def under_span(telemetry: Telemetry, call: Any) -> tuple[Any, int]:
    """Await ``call`` inside a span of the test's own; the result and that span's id."""
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as parent:
        result = await call
    return result, parent.get_span_context().span_id


def assert_child_of(span: ReadableSpan, parent_id: int) -> None:
    assert span.parent is not None
    assert span.parent.span_id == parent_id


def assert_timed(span: ReadableSpan) -> None:
    assert span.start_time is not None
    assert span.end_time is not None
    assert 0 <= span.end_time - span.start_time < 10**10


# -- authentication -------------------------------------------------------------------------


async def test_first_seen_acceptance_spans_and_fetches(
    traced: Gateway, telemetry: Telemetry, token: str
) -> None:
    response, parent = await under_span(telemetry, traced.get(token))
    assert response.status_code == 200

    span = telemetry.only("asgi_delegation.authenticate")
    assert span.kind is SpanKind.INTERNAL
    assert_child_of(span, parent)
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time == span.start_time  # the event carries no duration
    attributes = dict(span.attributes or {})
    token_id = attributes.pop("asgi_delegation.token_id")
    assert isinstance(token_id, str)
    assert len(token_id) == 16
    assert attributes == {
        "enduser.id": "alice",
        "asgi_delegation.outcome": "accepted",
        "asgi_delegation.client_id": "local-client",
        "asgi_delegation.issuer": "http://127.0.0.1",
        "asgi_delegation.verified_by": "jwt",
        "url.path": "/mcp",
        "http.response.status_code": 200,
    }

    metadata, jwks = telemetry.spans("GET")
    for fetch, url, document in ((metadata, METADATA_URL, "metadata"), (jwks, JWKS_URL, "jwks")):
        assert fetch.kind is SpanKind.CLIENT
        assert_child_of(fetch, parent)
        assert_timed(fetch)
        assert fetch.status.status_code is StatusCode.UNSET
        assert dict(fetch.attributes or {}) == {
            "http.request.method": "GET",
            "url.full": url,
            "url.scheme": "http",
            "server.address": "127.0.0.1",
            "server.port": 80,
            "http.response.status_code": 200,
            "asgi_delegation.document": document,
        }

    collected = telemetry.metrics()
    assert telemetry.values("http.client.request.duration", collected) == {
        attrs(
            http__request__method="GET",
            url__scheme="http",
            server__address="127.0.0.1",
            server__port=80,
            http__response__status_code=200,
        ): 2
    }
    (point,) = collected["http.client.request.duration"]
    if ADVISED_BUCKETS:
        assert tuple(point.explicit_bounds) == _otel.DURATION_BUCKETS  # seconds, not ms
    assert telemetry.values("asgi_delegation.requests", collected) == {
        attrs(asgi_delegation__outcome="accepted"): 1
    }


async def test_a_cached_request_makes_no_span(
    traced: Gateway, telemetry: Telemetry, token: str
) -> None:
    assert (await traced.get(token)).status_code == 200
    telemetry.exporter.clear()
    # Nobody wants DEBUG: the warm path builds no event at all.
    assert not traced.middleware._auditor.wants(logging.DEBUG)

    for _ in range(3):
        response, _ = await under_span(telemetry, traced.get(token))
        assert response.status_code == 200
    assert telemetry.spans() == []

    assert telemetry.values("asgi_delegation.requests") == {
        attrs(asgi_delegation__outcome="accepted"): 4
    }
    assert (
        telemetry.values("asgi_delegation.cache.hits")[attrs(asgi_delegation__cache="tokens")] == 3
    )
    assert (
        telemetry.values("asgi_delegation.cache.misses")[attrs(asgi_delegation__cache="tokens")]
        == 1
    )


async def test_debug_logging_does_not_turn_warm_requests_into_spans(
    traced: Gateway, telemetry: Telemetry, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await traced.get(token)).status_code == 200
    telemetry.exporter.clear()
    with caplog.at_level(logging.DEBUG, logger="asgi_delegation.audit"):
        assert (await traced.get(token)).status_code == 200
    assert any(getattr(r, "audit", {}).get("cached") for r in caplog.records)
    assert telemetry.spans() == []


async def test_rejections(
    traced: Gateway, telemetry: Telemetry, auth: LocalAuthorizationServer
) -> None:
    expired = auth.mint("bob", audience=RESOURCE, expires_in=-3600)
    response, parent = await under_span(telemetry, traced.get(expired))
    assert response.status_code == 401
    assert (await traced.get(None)).status_code == 401

    first, second = telemetry.spans("asgi_delegation.authenticate")
    assert_child_of(first, parent)
    assert first.status.status_code is StatusCode.UNSET  # a refusal is an outcome, not an error
    assert first.attributes is not None
    assert first.attributes["asgi_delegation.outcome"] == "rejected"
    assert first.attributes["asgi_delegation.reason"] == "expired"
    assert first.attributes["http.response.status_code"] == 401
    assert "enduser.id" not in first.attributes  # the token was not accepted
    assert "error.type" not in first.attributes
    assert second.attributes is not None
    assert second.attributes["asgi_delegation.reason"] == "missing"
    assert "asgi_delegation.token_id" not in second.attributes

    assert telemetry.values("asgi_delegation.requests") == {
        attrs(asgi_delegation__outcome="accepted"): 0,
        attrs(asgi_delegation__outcome="rejected", asgi_delegation__reason="expired"): 1,
        attrs(asgi_delegation__outcome="rejected", asgi_delegation__reason="missing"): 1,
    }


async def test_authorization_server_down(
    traced: Gateway, telemetry: Telemetry, auth: LocalAuthorizationServer, token: str
) -> None:
    auth.fail_status = 503
    response, parent = await under_span(telemetry, traced.get(token))
    assert response.status_code == 503

    span = telemetry.only("asgi_delegation.authenticate")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "keys_unavailable"
    assert span.attributes["http.response.status_code"] == 503

    fetches = telemetry.spans("GET")
    assert fetches
    for fetch in fetches:
        assert_child_of(fetch, parent)
        assert fetch.status.status_code is StatusCode.ERROR
        assert fetch.status.description is not None
        assert "HTTP 503" in fetch.status.description
        assert fetch.attributes is not None
        assert fetch.attributes["http.response.status_code"] == 503
        assert fetch.attributes["error.type"] == "503"
    durations = telemetry.values("http.client.request.duration")
    (failed,) = durations
    assert dict(failed)["error.type"] == "503"
    assert durations[failed] == len(fetches)


async def test_a_network_failure_is_an_error_type_without_status(
    gateway_factory: Callable[..., Gateway], telemetry: Telemetry, token: str
) -> None:
    # Nothing listens on port 9 of the loopback interface.
    gateway = gateway_factory(
        jwks_uri="http://127.0.0.1:9/jwks", http_client=None, **telemetry.options
    )
    assert (await gateway.get(token)).status_code == 503
    fetch = telemetry.spans("GET")[0]
    assert fetch.attributes is not None
    assert fetch.attributes["server.port"] == 9
    assert fetch.attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in fetch.attributes


# -- exchanges -------------------------------------------------------------------------------


async def test_exchange_miss_hit_and_denial(
    traced: Gateway, telemetry: Telemetry, auth: LocalAuthorizationServer, token: str
) -> None:
    assert (await traced.get(token)).status_code == 200  # keys fetched, token cached
    telemetry.exporter.clear()

    answer, parent = await under_span(telemetry, traced.exchange(token, GITHUB, "repo"))
    assert answer["grants"][0]["resource"] == GITHUB
    span = telemetry.only("asgi_delegation.exchange")
    assert span.kind is SpanKind.INTERNAL
    assert_child_of(span, parent)
    assert_timed(span)
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "enduser.id": "alice",
        "asgi_delegation.client_id": "local-client",
        "asgi_delegation.resource": GITHUB,
        "asgi_delegation.scope": "repo",
        "asgi_delegation.outcome": "granted",
        "asgi_delegation.cache": "miss",
        "asgi_delegation.attempts": 1,
        "asgi_delegation.issuer": "http://127.0.0.1",
        "http.response.status_code": 200,
    }
    post = telemetry.only("POST")  # the request to the token endpoint, a CLIENT span
    assert post.kind is SpanKind.CLIENT
    assert_child_of(post, parent)
    assert {
        k: v
        for k, v in (post.attributes or {}).items()
        if k in ("http.request.method", "url.full", "http.response.status_code")
    } == {
        "http.request.method": "POST",
        "url.full": auth.token_endpoint,
        "http.response.status_code": 200,
    }

    telemetry.exporter.clear()
    await traced.exchange(token, GITHUB, "repo")  # a grant-cache hit: DEBUG, no span
    assert telemetry.spans() == []

    auth.unconsented.add(("alice", SLACK))
    answer, parent = await under_span(telemetry, traced.exchange(token, SLACK))
    assert answer["error"]["error"] == "access_denied"
    denied = telemetry.only("asgi_delegation.exchange")
    assert_child_of(denied, parent)
    assert denied.status.status_code is StatusCode.ERROR
    assert denied.status.description == "access_denied"
    assert denied.attributes is not None
    assert denied.attributes["asgi_delegation.outcome"] == "denied"
    assert denied.attributes["error.type"] == "access_denied"
    assert denied.attributes["http.response.status_code"] == 400
    assert "asgi_delegation.scope" not in denied.attributes

    assert telemetry.values("asgi_delegation.exchange.duration") == {
        attrs(asgi_delegation__outcome="granted", asgi_delegation__cache="miss"): 1,
        attrs(asgi_delegation__outcome="denied", asgi_delegation__cache="miss"): 1,
    }
    assert telemetry.values("asgi_delegation.exchanges") == {
        attrs(asgi_delegation__outcome="granted"): 1,
        attrs(asgi_delegation__outcome="denied"): 1,
    }
    assert telemetry.values("asgi_delegation.cache.hits") == {
        attrs(asgi_delegation__cache="tokens"): 3,
        attrs(asgi_delegation__cache="grants"): 1,
    }
    assert telemetry.values("asgi_delegation.cache.misses") == {
        attrs(asgi_delegation__cache="tokens"): 1,
        attrs(asgi_delegation__cache="grants"): 2,
    }
    assert telemetry.values("asgi_delegation.token_endpoint.responses") == {
        attrs(http__response__status_code=200): 1,
        attrs(http__response__status_code=400): 1,
    }


async def test_a_policy_refusal_and_an_unreachable_token_endpoint(
    gateway_factory: Callable[..., Gateway],
    telemetry: Telemetry,
    auth: LocalAuthorizationServer,
    token: str,
) -> None:
    gateway = gateway_factory(allowed_resources=[GITHUB, SLACK], **telemetry.options)
    answer = await gateway.exchange(token, "https://elsewhere.example")
    assert answer["error"]["error"] == "not_allowed"
    refused = telemetry.only("asgi_delegation.exchange")
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert refused.attributes["asgi_delegation.outcome"] == "not_allowed"
    assert refused.attributes["asgi_delegation.attempts"] == 0
    assert "http.response.status_code" not in refused.attributes

    telemetry.exporter.clear()
    auth.fail_status = 500
    answer = await gateway.exchange(token, GITHUB)
    assert answer["error"]["class"] == "ExchangeUnavailable"
    failed = telemetry.only("asgi_delegation.exchange")
    assert failed.attributes is not None
    assert failed.attributes["asgi_delegation.outcome"] == "unavailable"
    assert failed.attributes["error.type"] == "temporarily_unavailable"
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["asgi_delegation.attempts"] == 3
    assert telemetry.values("asgi_delegation.token_endpoint.responses") == {
        attrs(http__response__status_code=500): 3
    }


async def test_a_background_refresh_is_a_span_of_the_request_that_started_it(
    traced: Gateway,
    telemetry: Telemetry,
    auth: LocalAuthorizationServer,
    clock: Any,
) -> None:
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 300
    await traced.exchange(token, GITHUB)
    clock.advance(250)  # inside the refresh margin: served from the cache, refreshed behind
    telemetry.exporter.clear()
    _, parent = await under_span(telemetry, traced.exchange(token, GITHUB))
    await asyncio.gather(*exchanger_of(traced.middleware)._background)
    refresh = telemetry.only("asgi_delegation.exchange")
    assert_child_of(refresh, parent)
    assert refresh.attributes is not None
    assert refresh.attributes["asgi_delegation.cache"] == "refresh"
    assert refresh.attributes["asgi_delegation.outcome"] == "granted"
    assert telemetry.values("asgi_delegation.exchange.duration") == {
        attrs(asgi_delegation__outcome="granted", asgi_delegation__cache="miss"): 1,
        attrs(asgi_delegation__outcome="granted", asgi_delegation__cache="refresh"): 1,
    }


# -- hygiene and switches --------------------------------------------------------------------


async def test_no_token_or_secret_in_any_attribute(
    traced: Gateway,
    telemetry: Telemetry,
    auth: LocalAuthorizationServer,
    minted: list[str],
) -> None:
    token = auth.mint("alice", audience=RESOURCE, scope="read write")
    assert (await traced.get(token)).status_code == 200
    await traced.exchange(token, GITHUB, "repo")
    await traced.exchange(token, GITHUB, "repo")
    auth.unconsented.add(("alice", SLACK))
    await traced.exchange(token, SLACK)
    assert (await traced.get(token + "x")).status_code == 401
    assert len(minted) == 2  # the caller's token and the GitHub grant

    values: list[str] = []
    for span in telemetry.spans():
        values += [span.name, str(span.status.description)]
        values += [f"{k}={v!r}" for k, v in (span.attributes or {}).items()]
    for points in telemetry.metrics().values():
        for point in points:
            values += [f"{k}={v!r}" for k, v in (point.attributes or {}).items()]
    assert len(telemetry.spans()) >= 6
    secrets = [*minted, token + "x", CLIENT_SECRET]
    for value in values:
        assert "eyJ" not in value, value
        for secret in secrets:
            assert secret not in value
            assert secret[-20:] not in value


async def test_opentelemetry_false_produces_nothing(
    gateway_factory: Callable[..., Gateway], telemetry: Telemetry, token: str
) -> None:
    gateway = gateway_factory(**{**telemetry.options, "opentelemetry": False})
    assert gateway.middleware._auditor.wants(logging.INFO) is logging.getLogger(
        "asgi_delegation.audit"
    ).isEnabledFor(logging.INFO)
    assert (await gateway.get(token)).status_code == 200
    await gateway.exchange(token, GITHUB)
    assert (await gateway.get(None)).status_code == 401
    assert telemetry.exporter.get_finished_spans() == ()
    assert telemetry.metrics() == {}


def test_opentelemetry_switch(
    monkeypatch: pytest.MonkeyPatch, auth: LocalAuthorizationServer, telemetry: Telemetry
) -> None:
    def make(**options: Any) -> DelegationMiddleware:
        return DelegationMiddleware(echo_app, issuer=auth.issuer, resource=RESOURCE, **options)

    assert make()._auditor._telemetry is None  # off unless asked for
    assert make(**telemetry.options)._auditor._telemetry is not None
    with pytest.raises(ConfigurationError, match="True or False"):
        make(opentelemetry="yes")
    monkeypatch.setattr(_otel, "AVAILABLE", False)
    assert make()._auditor._telemetry is None
    assert make(opentelemetry=False)._auditor._telemetry is None
    with pytest.raises(ConfigurationError, match=r"asgi-delegation\[otel\]"):
        make(opentelemetry=True)


async def test_middlewares_sharing_a_meter_provider_add_up(
    gateway_factory: Callable[..., Gateway], telemetry: Telemetry, token: str
) -> None:
    one = gateway_factory(**telemetry.options)
    two = gateway_factory(**telemetry.options)
    for gateway in (one, two, two):
        assert (await gateway.get(token)).status_code == 200
    assert telemetry.values("asgi_delegation.requests") == {
        attrs(asgi_delegation__outcome="accepted"): 3
    }
    assert (
        telemetry.values("asgi_delegation.cache.misses")[attrs(asgi_delegation__cache="tokens")]
        == 2
    )


def test_a_failing_tracer_never_breaks_a_request(
    caplog: pytest.LogCaptureFixture, telemetry: Telemetry
) -> None:
    sink = _otel.OpenTelemetrySink(telemetry.tracer_provider, telemetry.meter_provider)

    class Broken:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter on fire")

    sink._tracer = Broken()  # type: ignore[assignment]
    event = FetchEvent(0.0, "jwks", JWKS_URL, "ok", None, 1.0)
    sink.record(event)  # no exception
    assert "recording a FetchEvent for OpenTelemetry failed" in caplog.text


def test_counters_are_read_at_collection_and_forget_collected_middlewares(
    telemetry: Telemetry,
) -> None:
    auditor = Auditor(
        None, _otel.OpenTelemetrySink(telemetry.tracer_provider, telemetry.meter_provider)
    )
    auditor.stats.accepted = 5
    auditor.stats.token_endpoint["network"] = 2
    assert telemetry.values("asgi_delegation.requests") == {
        attrs(asgi_delegation__outcome="accepted"): 5
    }
    assert telemetry.values("asgi_delegation.token_endpoint.responses") == {
        attrs(error__type="network"): 2
    }
    auditor.stats.accepted += 1
    assert telemetry.values("asgi_delegation.requests") == {
        attrs(asgi_delegation__outcome="accepted"): 6
    }
    del auditor
    gc.collect()
    assert not telemetry.metrics().get("asgi_delegation.requests")
