"""Per-tool scopes: which requests are refused, what the refusal says, and that the application
receives the body byte for byte. (tests/test_tool_scopes_sdk.py holds the same rules against
the official MCP SDK under uvicorn.)"""

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
from asgi_delegation._tool_scopes import MAX_BODY_BYTES, _encoding
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
        content_type: bytes | None = b"application/json",
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
            *([] if content_type is None else [(b"content-type", content_type)]),
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


async def test_modern_headers_and_the_body_are_both_read(harness: Harness) -> None:
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


def bad_request(description: str) -> bytes:
    return f'Bearer error="invalid_request", error_description="{description}"'.encode()


async def test_two_content_types_are_refused(harness: Harness) -> None:
    # The bypass this rule closes: the SDK reads the first Content-Type and runs the tool,
    # while a reader of the last one would have skipped the body.
    outcome = await harness.post(call("create_issue"), headers=[(b"content-type", b"text/plain")])
    assert outcome.status == 400
    assert outcome.headers[b"www-authenticate"] == bad_request(
        "The request has more than one Content-Type header"
    )
    assert outcome.app_body is None


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
            routing("tools/call", "=?base64?!!!?="), call("ünï"), "mcp", 403, "mcp uni",
            id="modern-undecodable-name-the-body-decides",
        ),
        pytest.param(
            routing("tools/call", "create_issue"), call("whoami"), "mcp", 403, "mcp repo:write",
            id="header-names-a-listed-tool-the-body-does-not",
        ),
        pytest.param(
            routing("tools/list"), call("create_issue"), "mcp", 403, "mcp repo:write",
            id="header-hides-the-call-the-body-makes",
        ),
        pytest.param(
            [], [call("create_issue"), call("ünï", request_id=2)], "mcp", 403,
            "mcp repo:write uni", id="batch-of-two-listed-tools-names-both",
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
        pytest.param([], "tools/call", "mcp", 200, None, id="json-string"),
        pytest.param(
            [], {"method": "Tools/Call", "params": {"name": "create_issue"}}, "mcp", 200, None,
            id="method-is-case-sensitive-as-in-the-sdk",
        ),
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
    ("headers", "document", "description"),
    [
        pytest.param(
            [*routing("tools/list"), (b"mcp-method", b"tools/call")], LISTING,
            "The request repeats an MCP routing header", id="repeated-method-header",
        ),
        pytest.param(
            [*routing("tools/call", "whoami"), (b"mcp-name", b"create_issue")], call("whoami"),
            "The request repeats an MCP routing header", id="repeated-name-header",
        ),
        pytest.param(
            [(b"mcp-protocol-version", b"2025-06-18"), *routing("tools/list")], LISTING,
            "The request repeats an MCP routing header", id="repeated-version-header",
        ),
        pytest.param(
            [], {"method": "tools/call", "params": ["create_issue"]},
            "The request calls a tool without naming it", id="params-not-object",
        ),
        pytest.param(
            [], {"method": "tools/call", "params": {"name": 7}},
            "The request calls a tool without naming it", id="name-not-string",
        ),
        pytest.param(
            [], [LISTING, {"method": "tools/call"}],
            "The request calls a tool without naming it", id="batch-with-a-nameless-call",
        ),
        pytest.param(
            [(b"content-encoding", b"gzip")], call("whoami"),
            "Compressed request bodies are not accepted", id="gzip",
        ),
        pytest.param(
            [(b"content-encoding", b"Deflate ")], LISTING,
            "Compressed request bodies are not accepted", id="deflate",
        ),
    ],
)  # fmt: skip
async def test_requests_that_cannot_be_read_unambiguously_are_refused(
    harness: Harness, headers: list[tuple[bytes, bytes]], document: Any, description: str
) -> None:
    body = json.dumps(document).encode()
    outcome = await harness.post(body, scope="mcp repo:write uni", headers=headers)
    assert outcome.status == 400
    assert outcome.headers[b"www-authenticate"] == bad_request(description)
    assert outcome.app_body is None


async def test_identity_content_encoding_is_plain(harness: Harness) -> None:
    outcome = await harness.post(call("create_issue"), headers=[(b"content-encoding", b"identity")])
    assert outcome.status == 403


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", '
        b'"name": "create_issue"}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "method": "tools/list", '
        b'"params": {"name": "create_issue"}}',
        b'{"params": {"name": "create_issue"}, "params": {"name": "whoami"}, '
        b'"method": "tools/call"}',
    ],
    ids=["name", "method", "params"],
)
async def test_duplicate_member_names_are_refused(harness: Harness, body: bytes) -> None:
    for content_type in (b"application/json", b"text/plain"):
        outcome = await harness.post(body, content_type=content_type)
        assert outcome.status == 400
        assert outcome.headers[b"www-authenticate"] == bad_request(
            "The request body repeats a JSON member name"
        )


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON; charset=utf-8",
        b"application/json; charset=latin-1",
        b"text/plain, application/json",
        b"application/vnd.api+json",
        b"text/plain",  # the SDK's stateless transport reads the body whatever it says
        b"application/x-www-form-urlencoded",
        None,
    ],
)
async def test_every_json_body_is_inspected_whatever_its_content_type(
    harness: Harness, content_type: bytes | None
) -> None:
    outcome = await harness.post(call("create_issue"), content_type=content_type)
    assert outcome.status == 403


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32-be"])
async def test_bodies_in_every_json_encoding_are_inspected(harness: Harness, encoding: str) -> None:
    # json.loads reads these from bytes, and so does the SDK's stateless transport.
    body = json.dumps(call("create_issue")).encode(encoding)
    assert (await harness.post(body)).status == 403
    allowed = await harness.post(body, scope="mcp repo:write")
    assert (allowed.status, allowed.app_body) == (200, body)


@pytest.mark.parametrize("method", ["post", "Post"])
async def test_post_is_recognized_in_any_case(harness: Harness, method: str) -> None:
    assert (await harness.post(call("create_issue"), method=method)).status == 403


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (b"text/plain", 200),
        (b"application/x-www-form-urlencoded", 200),
        (b"application/json", 400),
        (b"text/x-json", 400),
        (None, 400),
    ],
)
async def test_a_body_that_is_not_json_goes_on_only_when_it_says_so(
    harness: Harness, content_type: bytes | None, status: int
) -> None:
    outcome = await harness.post(b"title=hello&tools/call", content_type=content_type)
    assert outcome.status == status
    assert outcome.app_body == (b"title=hello&tools/call" if status == 200 else None)


async def test_routing_headers_count_even_when_the_body_is_not_json(harness: Harness) -> None:
    outcome = await harness.post(
        b"not json", content_type=b"text/plain", headers=routing("tools/call", "create_issue")
    )
    assert outcome.status == 403


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
    assert outcome.headers[b"www-authenticate"] == bad_request("The request body is not valid JSON")
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
    calls = [
        m
        for m in (document if isinstance(document, list) else [document])
        if isinstance(m, dict) and m.get("method") == "tools/call"
    ]
    nameless = any(
        not isinstance(m.get("params"), dict) or not isinstance(m["params"].get("name"), str)
        for m in calls
    )
    protected = any(m["params"]["name"] in TOOLS for m in calls) if not nameless else False
    assert outcome.status == (400 if nameless else 403 if protected else 200)
    if outcome.status == 200:
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


@given(st.binary(max_size=8) | st.builds(lambda b: b"{" + b, st.binary(max_size=8)))
def test_the_body_encoding_is_the_one_json_loads_reads(body: bytes) -> None:
    assert _encoding(body) == json.detect_encoding(body)
