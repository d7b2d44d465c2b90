"""The circuit breaker in front of the shared cache: when it skips, when it probes, what it
says. Time is the package's clock, moved by the ``clock`` fixture."""

from __future__ import annotations

import logging

import pytest

from asgi_delegation._breaker import Breaker
from tests.conftest import Clock

LOGGER = logging.getLogger("asgi_delegation.tests.breaker")


@pytest.fixture
def breaker() -> Breaker:
    return Breaker(LOGGER, "the thing")


def test_it_opens_after_three_consecutive_failures_only(breaker: Breaker) -> None:
    for _ in range(10):  # failures with successes between them never open it
        breaker.failed("timeout")
        breaker.failed("timeout")
        breaker.succeeded()
    assert not breaker.is_open
    for _ in range(3):
        assert breaker.allows()
        breaker.failed("timeout")
    assert breaker.is_open
    assert not breaker.allows()
    assert breaker.counts["opened"] == 1
    assert breaker.counts["skipped"] == 1


def test_one_probe_per_interval_doubling_to_thirty_seconds(breaker: Breaker, clock: Clock) -> None:
    for _ in range(3):
        breaker.failed("connection")
    waits = []
    for _ in range(8):
        waited = 0.0
        while not breaker.allows():
            clock.advance(0.25)
            waited += 0.25
        assert not breaker.allows()  # the probe is let through alone
        waits.append(waited)
        breaker.failed("connection")  # the probe failed
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_calls_under_way_when_it_opened_do_not_push_the_probe_out(
    breaker: Breaker, clock: Clock
) -> None:
    for _ in range(3):
        breaker.failed("timeout")
    for _ in range(20):  # late failures of calls let through before it opened
        breaker.failed("timeout")
    clock.advance(1.0)
    assert breaker.allows()


def test_a_success_closes_it_and_resets_the_interval(breaker: Breaker, clock: Clock) -> None:
    for _ in range(3):
        breaker.failed("timeout")
    clock.advance(1.0)
    assert breaker.allows()
    breaker.failed("timeout")  # the first probe failed: next one in 2 s
    clock.advance(2.0)
    assert breaker.allows()
    breaker.succeeded()
    assert not breaker.is_open
    assert all(breaker.allows() for _ in range(5))
    for _ in range(3):
        breaker.failed("timeout")
    clock.advance(1.0)  # the interval starts again from 1 s
    assert breaker.allows()


def test_warnings_once_a_minute_per_cause(
    breaker: Breaker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    for _ in range(50):
        breaker.failed("timeout")
        breaker.failed("out_of_memory")
        breaker.noted("connection")
    assert sorted(r.getMessage().split("(")[1].split(")")[0] for r in caplog.records) == [
        "connection",
        "out_of_memory",
        "timeout",
    ]
    clock.advance(59)
    breaker.failed("timeout")
    assert len(caplog.records) == 3
    clock.advance(1)
    breaker.failed("timeout")
    assert len(caplog.records) == 4
    assert breaker.counts["timeout"] == 52
    assert "connection" not in breaker.counts  # noted: warned about, not the breaker's count


def test_it_says_when_it_is_back(
    breaker: Breaker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    breaker.succeeded()
    assert caplog.records == []  # nothing to say when it never opened
    for _ in range(3):
        breaker.failed("timeout")
    breaker.succeeded()
    assert caplog.records[-1].getMessage() == "the thing is reachable again: in use once more"
