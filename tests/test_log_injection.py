"""Request data never writes a line of its own into the log or an audit event: control and
other non-printable characters are escaped, and long values are cut."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from asgi_delegation import AuthenticationEvent, ExchangeError, ExchangeEvent
from asgi_delegation._printable import MAX_CHARS, printable
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE, Gateway, audit_delivered

FORGED = "\r\n2026-12-07 INFO asgi_delegation.audit authentication accepted: /admin\x1b[2K\u2028"
RAW = ("\r", "\n", "\x1b", "\u2028")


def clean(text: str) -> bool:
    return not any(char in text for char in RAW)


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("/mcp", "/mcp"),
        ("/é/ü", "/é/ü"),
        ("/x\r\ny", "/x\\r\\ny"),
        ("\x00\x1b[31m\x7f\x85", "\\x00\\x1b[31m\\x7f\\x85"),
        ("a\u2028b\u200bc", "a\\u2028b\\u200bc"),
        ("tab\t", "tab\\t"),
    ],
)
def test_printable(text: str, written: str) -> None:
    assert printable(text) == written


@pytest.mark.parametrize("text", ["x" * 5000, "\n" * 5000])
def test_printable_is_bounded(text: str) -> None:
    written = printable(text)
    assert len(written) == MAX_CHARS
    assert written.endswith("...")
    assert clean(written)


async def test_a_forged_path_is_escaped_in_the_log_and_the_event(
    gateway_factory: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    gateway = gateway_factory(on_audit=events.append)
    caplog.set_level(logging.INFO, "asgi_delegation.audit")
    response = await gateway.get(path="/x%0d%0a2026-12-07%20INFO%20forged%1b%5b2K")
    assert response.status_code == 401
    await audit_delivered(gateway.middleware)
    record = next(r for r in caplog.records if r.name == "asgi_delegation.audit")
    assert clean(record.getMessage())
    assert "/x\\r\\n2026-12-07 INFO forged" in record.getMessage()
    assert clean(record.audit["path"])  # type: ignore[attr-defined]
    [event] = [e for e in events if isinstance(e, AuthenticationEvent)]
    assert event.path == "/x\\r\\n2026-12-07 INFO forged\\x1b[2K"


async def test_a_subject_with_line_breaks_is_escaped_in_events_but_not_for_the_app(
    gateway_factory: Callable[..., Gateway],
    auth: LocalAuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = gateway_factory()
    caplog.set_level(logging.INFO, "asgi_delegation.audit")
    token = auth.mint("alice" + FORGED, audience=RESOURCE, claims={"client_id": "agent" + FORGED})
    response = await gateway.get(token)
    assert response.status_code == 200
    assert response.json()["subject"] == "alice" + FORGED  # the application gets the claim
    for record in caplog.records:
        assert clean(record.getMessage())
        fields = record.audit.values()  # type: ignore[attr-defined]
        assert all(clean(v) for v in fields if isinstance(v, str))


async def test_an_exchange_for_a_forged_resource_is_escaped(
    gateway_factory: Callable[..., Gateway],
    auth: LocalAuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[Any] = []
    gateway = gateway_factory(on_audit=events.append, allowed_resources=["https://api.example"])
    caplog.set_level(logging.INFO, "asgi_delegation")
    answer = await gateway.exchange(auth.mint("alice", audience=RESOURCE), "https://x" + FORGED)
    assert answer["error"]["class"] == "ExchangeNotAllowed"
    await audit_delivered(gateway.middleware)
    for record in caplog.records:
        assert clean(record.getMessage())
    [event] = [e for e in events if isinstance(e, ExchangeEvent)]
    assert clean(event.resource)
    assert event.resource.startswith("https://x\\r\\n")


def test_an_exchange_error_message_is_escaped() -> None:
    error = ExchangeError("https://x" + FORGED, "invalid_target")
    assert clean(str(error))
    assert error.resource == "https://x" + FORGED  # the attribute is the caller's own value
