"""Per-tool scopes: which requests are refused, what the refusal says, and that the application
receives the body byte for byte when the middleware had to read it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_delegation import ConfigurationError, DelegationMiddleware
from asgi_delegation._tool_scopes import MAX_BODY_BYTES
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE, Gateway, read_body

MODERN = "2026-07-28"
TOOLS = {"create_issue": ["repo:write"], "ünï": ["uni"]}


def call(tool: str, *, request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": tool}}


LISTING = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


@dataclass
class Outcome:
    status: int
    headers: dict[bytes, bytes]
    app_body: bytes | None  # what the application read; None: it never ran


class Harness:
    def __init__(self, middleware: DelegationMiddleware, token: Callable[[str], str]) -> None:
        self.middleware = middleware
        self.token = token

    async def post(
        self,
        chunks: list[bytes] | bytes | Any,
        *,
        scope: str = "mcp",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/json",
        method: str = "POST",
    ) -> Outcome:
        if not isinstance(chunks, list):
            chunks = [chunks if isinstance(chunks, bytes) else json.dumps(chunks).encode()]
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        all_headers = [
            (b"authorization", f"Bearer {self.token(scope)}".encode()),
            (b"content-type", content_type),
            *(headers or []),
        ]
        asgi_scope = {
            "type": "http",
            "method": method,
            "path": "/mcp",
            "root_path": "",
            "query_string": b"",
            "headers": all_headers,
        }
        pending = iter(messages)
        sent: list[dict[str, Any]] = []
        received: list[bytes] = []

        async def receive() -> dict[str, Any]:
            return next(pending, {"type": "http.disconnect"})

        async def send(message: Any) -> None:
            sent.append(message)

        original = self.middleware.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await read_body(receive))
            await original(scope, receive, send)

        self.middleware.app = app
        try:
            await self.middleware(asgi_scope, receive, send)
        finally:
            self.middleware.app = original
        start = sent[0]
        return Outcome(start["status"], dict(start["headers"]), received[0] if received else None)


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def harness(gateway_factory: Callable[..., Gateway], auth: LocalAuthorizationServer) -> Harness:
    gateway = gateway_factory(app=ok_app, required_scopes=["mcp"], tool_scopes=TOOLS)
    return Harness(
        gateway.middleware, lambda scope: auth.mint("alice", audience=RESOURCE, scope=scope)
    )


def routing(
    method: str, name: str | None = None, version: str = MODERN
) -> list[tuple[bytes, bytes]]:
    headers = [(b"mcp-protocol-version", version.encode()), (b"mcp-method", method.encode())]
    if name is not None:
        headers.append((b"mcp-name", name.encode()))
    return headers


def challenge(scopes: str) -> bytes:
    return (
        f'Bearer error="insufficient_scope", scope="{scopes}", '
        'error_description="The access token lacks a required scope", '
        f'resource_metadata="http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp"'
    ).encode()


async def test_modern_headers_decide_without_reading_the_body(harness: Harness) -> None:
    body = json.dumps(call("create_issue")).encode()
    refused = await harness.post(body, headers=routing("tools/call", "create_issue"))
    assert refused.status == 403
    assert refused.headers[b"www-authenticate"] == challenge("mcp repo:write")
    assert refused.app_body is None
    allowed = await harness.post(
        [body[:10], body[10:]],
        scope="mcp repo:write",
        headers=routing("tools/call", "create_issue"),
    )
    assert (allowed.status, allowed.app_body) == (200, body)


@pytest.mark.parametrize(
    ("headers", "document", "scope", "status", "needed"),
    [
        pytest.param(routing("tools/list"), LISTING, "mcp", 200, None, id="modern-other-method"),
        pytest.param(
            routing("tools/call", "whoami"), call("whoami"), "mcp", 200, None,
            id="modern-unlisted-tool",
        ),
        pytest.param(
            routing("tools/call", "=?base64?" + base64.b64encode("ünï".encode()).decode() + "?="),
            call("ünï"), "mcp", 403, "mcp uni", id="modern-base64-name",
        ),
        pytest.param(
            routing("tools/call", "=?base64?!!!?="), call("ünï"), "mcp", 200, None,
            id="modern-undecodable-name-left-to-the-sdk",
        ),
        pytest.param([], call("create_issue"), "mcp", 403, "mcp repo:write", id="no-headers-body"),
        pytest.param(
            [], call("create_issue"), "mcp repo:write", 200, None, id="no-headers-granted"
        ),
        pytest.param([], call("whoami"), "mcp", 200, None, id="no-headers-unlisted"),
        pytest.param(
            [], [LISTING, call("create_issue", request_id=2)], "mcp", 403, "mcp repo:write",
            id="batch",
        ),
        pytest.param([], [LISTING, call("whoami")], "mcp", 200, None, id="batch-unlisted"),
        pytest.param(
            routing("tools/list", version="2025-06-18"), call("create_issue"), "mcp", 403,
            "mcp repo:write", id="old-revision-headers-not-trusted",
        ),
        pytest.param(
            routing("tools/list", version="draft"), call("create_issue"), "mcp", 403,
            "mcp repo:write", id="undated-revision-not-trusted",
        ),
        pytest.param(
            [(b"mcp-protocol-version", MODERN.encode())], call("create_issue"), "mcp", 403,
            "mcp repo:write", id="modern-without-method-header",
        ),
        pytest.param(
            [*routing("tools/list"), (b"mcp-method", b"tools/list")], call("create_issue"), "mcp",
            403, "mcp repo:write", id="repeated-routing-header",
        ),
        pytest.param(
            [], {"method": "tools/call", "params": ["create_issue"]}, "mcp", 200, None,
            id="params-not-object",
        ),
        pytest.param(
            [], {"method": "tools/call", "params": {"name": 7}}, "mcp", 200, None,
            id="name-not-string",
        ),
        pytest.param([], "tools/call", "mcp", 200, None, id="json-string"),
    ],
)  # fmt: skip
async def test_requests(
    harness: Harness,
    headers: list[tuple[bytes, bytes]],
    document: Any,
    scope: str,
    status: int,
    needed: str | None,
) -> None:
    body = json.dumps(document).encode()
    outcome = await harness.post(body, scope=scope, headers=headers)
    assert outcome.status == status
    if needed is None:
        assert outcome.app_body == body  # replayed, byte for byte
    else:
        assert outcome.headers[b"www-authenticate"] == challenge(needed)
        assert outcome.app_body is None


@pytest.mark.parametrize(
    ("content_type", "inspected"),
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"text/plain, application/json", True),  # the SDK accepts a list
        (b"application/vnd.api+json", True),
        (b"text/plain", False),
        (b"application/x-www-form-urlencoded", False),
    ],
)
async def test_bodies_that_claim_json_are_inspected(
    harness: Harness, content_type: bytes, inspected: bool
) -> None:
    outcome = await harness.post(call("create_issue"), content_type=content_type)
    assert outcome.status == (403 if inspected else 200)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"\xff\xfe",
        b'{"method": "tools/call", "params": {"name": "create_issue"}',
        b"1" * 5000,
        b"[" * 100_000,
    ],
    ids=["truncated", "not-utf8", "unterminated", "huge-int", "deep"],
)  # fmt: skip
async def test_a_body_that_cannot_be_parsed_is_refused(harness: Harness, body: bytes) -> None:
    outcome = await harness.post(body)
    assert outcome.status == 400
    assert outcome.headers[b"www-authenticate"] == (
        b'Bearer error="invalid_request", error_description="The request body is not valid JSON"'
    )
    assert outcome.app_body is None


async def test_an_oversized_body_is_refused(harness: Harness) -> None:
    chunk = b" " * (1024 * 1024)
    outcome = await harness.post([chunk] * (MAX_BODY_BYTES // len(chunk) + 1))
    assert outcome.status == 413
    assert outcome.app_body is None


async def test_a_body_at_the_cap_is_read(harness: Harness) -> None:
    body = json.dumps(call("whoami")).encode()
    padded = body + b" " * (MAX_BODY_BYTES - len(body))
    outcome = await harness.post([padded[: len(padded) // 2], padded[len(padded) // 2 :]])
    assert (outcome.status, outcome.app_body) == (200, padded)


async def test_other_methods_are_not_inspected(harness: Harness) -> None:
    outcome = await harness.post(b"not json", method="GET")
    assert (outcome.status, outcome.app_body) == (200, b"not json")


async def test_a_body_cut_short_by_a_disconnect_never_reaches_the_application(
    harness: Harness,
) -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())
        await ok_app(scope, receive, send)

    harness.middleware.app = app
    token = harness.token("mcp")
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: Any) -> None:
        pass

    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
    ]
    scope = {
        "type": "http", "method": "POST", "path": "/mcp", "root_path": "", "query_string": b"",
        "headers": headers,
    }  # fmt: skip
    await harness.middleware(scope, receive, send)
    # An unfinished body is not JSON: refused before the application runs.
    assert seen == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.one_of(
    json_values,
    st.builds(call, st.sampled_from(["create_issue", "whoami", "ünï", "CREATE_ISSUE"])),
    st.fixed_dictionaries(
        {"method": st.sampled_from(["tools/call", "tools/list"]), "params": json_values}
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    document=st.one_of(messages, st.lists(messages, max_size=4)), cuts=st.lists(st.integers(0, 400))
)
async def test_no_listed_tool_call_passes_without_its_scope(
    harness: Harness, document: Any, cuts: list[int]
) -> None:
    body = json.dumps(document).encode()
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    outcome = await harness.post(chunks)
    items = document if isinstance(document, list) else [document]
    protected = any(
        isinstance(m, dict)
        and m.get("method") == "tools/call"
        and isinstance(m.get("params"), dict)
        and m["params"].get("name") in TOOLS
        for m in items
    )
    assert outcome.status == (403 if protected else 200)
    if not protected:
        assert outcome.app_body == body


@pytest.mark.parametrize(
    ("tool_scopes", "message"),
    [
        ([("create_issue", ["x"])], "tool_scopes must map tool names"),
        ({"": ["x"]}, "tool_scopes keys must be tool names"),
        ({"create_issue": "repo:write"}, "must be a list of scopes, not a string"),
        ({"create_issue": ["repo write"]}, "not an RFC 6749 scope token"),
    ],
)
def test_configuration_errors(
    auth: LocalAuthorizationServer, tool_scopes: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DelegationMiddleware(ok_app, issuer=auth.issuer, resource=RESOURCE, tool_scopes=tool_scopes)
