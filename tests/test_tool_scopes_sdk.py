"""Per-tool scopes against the official MCP SDK, served by uvicorn and driven over HTTP.

The property: for every combination of headers and body that the SDK would run a listed tool
for, the middleware required that tool's scopes. Each generated request is sent twice, with a
token that has the tool's scope (does the SDK run it?) and with one that lacks it (it must not
run). The generator spans what two readers of a request can disagree about: repeated
``Content-Type`` and routing headers, media-type case, lists and charset parameters, batches,
duplicate member names, escapes and whitespace in the JSON, body encodings, compression and
chunked bodies, and the routing headers of revision 2026-07-28 agreeing or not with the body.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mcp.server.mcpserver import MCPServer

from asgi_delegation import DelegationMiddleware
from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve

MODERN = "2026-07-28"
LEGACY = "2025-06-18"
LISTED = "secret"  # needs TOOL_SCOPE
TOOL_SCOPE = "tool:secret"
SPELLINGS = {  # the listed tool's name as JSON text: every one decodes to "secret"
    "plain": '"secret"',
    "escaped": '"secr\\u0065t"',
    "all-escaped": '"' + "".join(f"\\u{ord(c):04x}" for c in "secret") + '"',
}
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}


@dataclass
class Server:
    url: str
    runs: list[str] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, LocalAuthorizationServer]]:
    with loopback_socket() as (auth_sock, issuer), loopback_socket() as (sock, origin):
        auth = LocalAuthorizationServer(issuer)
        served = Server(origin + "/mcp")
        mcp = MCPServer("scoped")

        @mcp.tool()
        async def secret() -> str:
            served.runs.append("secret")
            return "ran"

        @mcp.tool()
        async def whoami() -> str:
            served.runs.append("whoami")
            return "ran"

        app = DelegationMiddleware(
            mcp.streamable_http_app(stateless_http=True, json_response=True),
            issuer=issuer,
            resource=served.url,
            required_scopes=["mcp"],
            tool_scopes={LISTED: [TOOL_SCOPE]},
        )
        async with serve(auth, auth_sock), serve(app, sock):
            yield served, auth


@dataclass
class Request:
    headers: list[tuple[str, str]]
    body: bytes
    chunks: int

    def content(self) -> bytes | AsyncIterator[bytes]:
        if self.chunks <= 1:
            return self.body
        size = max(1, len(self.body) // self.chunks)

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(self.body), size):
                yield self.body[start : start + size]

        return chunked()


def message(name_json: str, modern: bool, duplicate: str | None, spaced: bool) -> str:
    """One tools/call as JSON text, written by hand so that members can repeat."""
    sep = ",\n  " if spaced else ","
    colon = " :  " if spaced else ":"
    params = [f'"name"{colon}{name_json}', f'"arguments"{colon}{{}}']
    if modern:
        params.append(f'"_meta"{colon}{json.dumps(META)}')
    if duplicate == "name-after":
        params.append(f'"name"{colon}"whoami"')
    elif duplicate == "name-before":
        params.insert(0, f'"name"{colon}"whoami"')
    members = ['"jsonrpc"' + colon + '"2.0"', '"id"' + colon + "1"]
    if duplicate == "method-before":
        members.append(f'"method"{colon}"tools/list"')
    members.append(f'"method"{colon}"tools/call"')
    if duplicate == "method-after":
        members.append(f'"method"{colon}"tools/list"')
    members.append('"params"' + colon + "{" + sep.join(params) + "}")
    return "{" + sep.join(members) + "}"


# Content-Type headers the SDK runs a request with: it reads the first header only.
SDK_CONTENT_TYPES = [
    ["application/json"],
    ["application/json; charset=utf-8"],
    ["application/json, text/plain"],
    ["application/json", "text/plain"],
    ["application/json", "application/json"],
]
# And ones it may not; which is fine: the property is only that the listed tool never runs
# without its scope.
OTHER_CONTENT_TYPES = [
    ["Application/JSON"],
    ["application/json;charset=UTF-16"],
    ["text/plain, application/json"],
    ["text/plain", "application/json"],
    ["text/plain"],
    [],
]
TWISTS = (
    "unlisted tool",
    "duplicate member",
    "batch",
    "encoding",
    "content type",
    "version",
    "method header",
    "name header",
    "repeated routing header",
    "gzip",
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """A request the SDK runs the listed tool for, with none, one or two twists."""
    count = draw(st.sampled_from([0, 0, 1, 2]))
    twists = draw(st.lists(st.sampled_from(TWISTS), min_size=count, max_size=count, unique=True))
    modern = draw(st.booleans())
    tool = "whoami" if "unlisted tool" in twists else LISTED
    name_json = (
        SPELLINGS[draw(st.sampled_from(sorted(SPELLINGS)))] if tool == LISTED else '"whoami"'
    )
    duplicate = None
    if "duplicate member" in twists:
        duplicate = draw(
            st.sampled_from(["name-after", "name-before", "method-before", "method-after"])
        )
    text = message(name_json, modern, duplicate, draw(st.booleans()))
    if "batch" in twists:
        text = draw(
            st.sampled_from([f"[{text}]", f'[{{"jsonrpc": "2.0", "method": "ping"}}, {text}]'])
        )
    encoding = "utf-8"
    if "encoding" in twists:
        encoding = draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-16-be", "utf-32"]))
    body = text.encode(encoding)
    headers = [("Accept", "application/json, text/event-stream")]
    if "content type" in twists:
        headers += [("Content-Type", value) for value in draw(st.sampled_from(OTHER_CONTENT_TYPES))]
    else:
        headers += [("Content-Type", value) for value in draw(st.sampled_from(SDK_CONTENT_TYPES))]
    version = MODERN if modern else draw(st.sampled_from([LEGACY, None]))
    if "version" in twists:
        version = draw(
            st.sampled_from([v for v in (MODERN, LEGACY, "2027-01-01", None) if v != version])
        )
    if version is not None:
        headers.append(("MCP-Protocol-Version", version))
    if modern:
        method = (
            draw(st.sampled_from(["tools/list", "ping"]))
            if "method header" in twists
            else "tools/call"
        )
        headers.append(("Mcp-Method", method))
        name = tool
        if "name header" in twists:
            name = draw(
                st.sampled_from([n for n in ("whoami", LISTED, "", "=?base64?x?=") if n != tool])
            )
        elif draw(st.booleans()):
            name = "=?base64?" + base64.b64encode(tool.encode()).decode() + "?="
        headers.append(("Mcp-Name", name))
    if "repeated routing header" in twists:
        headers.append(
            draw(
                st.sampled_from(
                    [("Mcp-Method", "ping"), ("Mcp-Name", "whoami"), ("Mcp-Method", "tools/call")]
                )
            )
        )
    if "gzip" in twists:
        headers.append(("Content-Encoding", "gzip"))
        body = gzip.compress(body)
    elif draw(st.booleans()):
        headers.append(("Content-Encoding", "identity"))
    return Request(headers, body, draw(st.sampled_from([1, 2, 7])))


async def send(client: httpx.AsyncClient, url: str, token: str, request: Request) -> int:
    headers = [("Authorization", f"Bearer {token}"), *request.headers]
    answer = await client.post(url, headers=headers, content=request.content())
    return answer.status_code


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
# The bypass that made this test: the SDK reads the first Content-Type and runs the tool.
@example(
    request=Request(
        [
            ("Accept", "application/json, text/event-stream"),
            ("Content-Type", "application/json"),
            ("Content-Type", "text/plain"),
        ],
        message(SPELLINGS["plain"], False, None, False).encode(),
        1,
    )
)
async def test_the_sdk_never_runs_a_listed_tool_without_its_scope(
    server: tuple[Server, LocalAuthorizationServer], request: Request, ran_listed: list[int]
) -> None:
    served, auth = server
    scoped = auth.mint("alice", audience=served.url, scope=f"mcp {TOOL_SCOPE}")
    unscoped = auth.mint("alice", audience=served.url, scope="mcp")
    async with httpx.AsyncClient(timeout=10) as client:
        before = served.runs.count(LISTED)
        await send(client, served.url, scoped, request)
        ran_listed.append(served.runs.count(LISTED) - before)
        before = served.runs.count(LISTED)
        status = await send(client, served.url, unscoped, request)
    assert served.runs.count(LISTED) == before, (status, request)


@pytest.fixture(scope="module")
def ran_listed() -> Any:
    runs: list[int] = []
    yield runs
    # Not vacuous: the generator must often build requests the SDK does run the tool for.
    assert sum(1 for n in runs if n) >= len(runs) // 4, runs
