"""Per-tool scopes for MCP servers: calling a listed tool needs its scopes too (MCP step-up).

The middleware refuses such a call with 403 ``insufficient_scope`` naming every scope needed,
so a client that supports step-up asks the authorization server for them and retries.

The application, not the middleware, decides which tool runs, so the middleware must read
every request the way any MCP server could, or refuse it. The rules, for every POST:

- The body is what servers dispatch on, so it is always read (at most ``MAX_BODY_BYTES``, else
  413) and replayed byte for byte. It is parsed as Python's ``json`` reads bytes (UTF-8, -16 or
  -32, as the MCP SDK's stateless transport does), every ``tools/call`` in it is found, a batch
  included, and each one's tool needs its scopes. A call whose tool cannot be told (no
  ``params`` object, a name that is not a string) is refused with 400.
- The ``Mcp-Method`` / ``Mcp-Name`` routing headers (revision 2026-07-28) name a tool too: its
  scopes are needed as well, whatever the body says. Servers must refuse headers that disagree
  with the body; needing both tools' scopes makes a server that does not still safe.
- Refused with 400, because two readers could disagree about them: a repeated
  ``Content-Type`` or routing header (the SDK reads the first, other code the last), duplicate
  JSON member names (parsers keep the first or the last), and a compressed body (a server that
  decompresses would see what the middleware did not).
- A body that is not JSON is refused with 400, unless its one ``Content-Type`` names no JSON
  media type: then no JSON-RPC server runs it, and it goes on (a form post, an upload).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ._answers import Answer, Answers
from ._types import Message, Receive, Scope

#: The body of a POST read to find the tool, at most.
MAX_BODY_BYTES = 4 * 1024 * 1024
_BASE64_SENTINEL = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)
_TOO_LARGE = Answer(413, "invalid_request", "The request body is too large", [], "body_too_large")
_NOT_JSON = Answers.invalid_request("The request body is not valid JSON", "body_not_json")
_DUPLICATE_MEMBER = Answers.invalid_request(
    "The request body repeats a JSON member name", "body_ambiguous"
)
_TWO_CONTENT_TYPES = Answers.invalid_request(
    "The request has more than one Content-Type header", "body_ambiguous"
)
_TWO_ROUTING_HEADERS = Answers.invalid_request(
    "The request repeats an MCP routing header", "body_ambiguous"
)
_COMPRESSED = Answers.invalid_request(
    "Compressed request bodies are not accepted", "body_ambiguous"
)
_UNKNOWN_TOOL = Answers.invalid_request(
    "The request calls a tool without naming it", "tool_unknown"
)
_ROUTING = frozenset({b"mcp-method", b"mcp-name", b"mcp-protocol-version"})


Needed = tuple[str, ...]


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateMember
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members)


class ToolScopes:
    def __init__(self, tool_scopes: Mapping[str, Needed], required: Iterable[str]) -> None:
        """``tool_scopes``: already checked scope tokens by tool name. What a refusal names:
        the ``required`` scopes (needed for every request), then the tools' own."""
        required = tuple(required)
        self._needed: dict[str, tuple[frozenset[str], Needed]] = {}
        for tool, scopes in tool_scopes.items():
            needed = tuple(dict.fromkeys((*required, *scopes)))
            self._needed[tool] = (frozenset(needed), needed)

    async def check(
        self, scope: Scope, receive: Receive, granted: frozenset[str]
    ) -> tuple[Needed | Answer | None, Receive]:
        """For a POST: the scopes to ask for when a listed tool is called without them, an
        answer for a request that cannot be read unambiguously, or None when it may go on; and
        the ``receive`` the application must use from now on (a replay of the body)."""
        content_type: bytes | None = None
        method = name = None
        seen: set[bytes] = set()
        for header, value in scope["headers"]:
            if header == b"content-type":
                if content_type is not None:
                    return _TWO_CONTENT_TYPES, receive
                content_type = value
            elif header in _ROUTING:
                if header in seen:
                    return _TWO_ROUTING_HEADERS, receive
                seen.add(header)
                if header == b"mcp-method":
                    method = value
                elif header == b"mcp-name":
                    name = value
            elif header == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                return _COMPRESSED, receive
        body, messages = await _read(receive)
        replay = _replaying(messages, receive)
        if body is None:
            return _TOO_LARGE, replay
        tools: list[str] = []
        if method == b"tools/call":
            tool = _decode(name)
            if tool is not None:
                tools.append(tool)
        try:
            document = _DECODER.decode(body.decode(_encoding(body), "surrogatepass"))
        except _DuplicateMember:
            return _DUPLICATE_MEMBER, replay
        except (ValueError, RecursionError):
            if content_type is None or b"json" in content_type.lower():
                return _NOT_JSON, replay
            return self._missing(tools, granted), replay
        called = _called_tools(document)
        if called is None:
            return _UNKNOWN_TOOL, replay
        return self._missing([*tools, *called], granted), replay

    def _missing(self, tools: Iterable[str], granted: frozenset[str]) -> Needed | None:
        """Every scope the calls need, when the token lacks any of one called tool's."""
        missing: dict[str, None] = {}
        for tool in tools:
            needed = self._needed.get(tool)
            if needed is not None and not needed[0] <= granted:
                missing.update(dict.fromkeys(needed[1]))
        return tuple(missing) or None


def _encoding(body: bytes) -> str:
    """The encoding ``json.loads`` reads ``body`` in; a JSON-RPC body opening with ``{`` or
    ``[`` and no NUL after it is UTF-8 (no BOM, no UTF-16/32), which json.detect_encoding
    would take longer to say."""
    if body[:1] in (b"{", b"[") and body[1:2] != b"\x00":
        return "utf-8"
    return json.detect_encoding(body)


def _decode(value: bytes | None) -> str | None:
    """An ``Mcp-Name`` value as the MCP SDK decodes it: names that are not printable ASCII come
    as ``=?base64?...?=`` (canonical base64 of UTF-8); a malformed one names no tool."""
    if value is None:
        return None
    text = value.decode("latin-1")
    sentinel = _BASE64_SENTINEL.fullmatch(text)
    if sentinel is None:
        return text
    try:
        decoded = base64.b64decode(sentinel[1], validate=True)
        if base64.b64encode(decoded).decode("ascii") != sentinel[1]:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _called_tools(document: Any) -> list[str] | None:
    """The tool of every ``tools/call`` in a JSON-RPC message or batch; None when one of them
    names no tool a server could run."""
    tools: list[str] = []
    for message in document if isinstance(document, list) else (document,):
        if isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            if not isinstance(name, str):
                return None
            tools.append(name)
    return tools


async def _read(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body (None when over the cap) and the messages it came in, to replay."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: replayed, for the application to see too
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES:
            return None, messages
        if not message.get("more_body", False):
            break
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"), messages


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = iter(messages)

    async def replay() -> Message:
        message = next(pending, None)
        return message if message is not None else await receive()

    return replay
