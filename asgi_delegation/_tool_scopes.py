"""Per-tool scopes for MCP servers: calling a listed tool needs its scopes too (MCP step-up).

The middleware refuses such a call with 403 ``insufficient_scope`` naming every scope needed,
so a client that supports step-up asks the authorization server for them and retries.

How the tool is found without touching what the application receives:

- From protocol revision 2026-07-28 on, clients send ``Mcp-Method`` and ``Mcp-Name`` headers
  and servers must reject a request whose headers disagree with its body. Those headers are
  read and the body is left alone.
- Earlier revisions send no such headers. Their POST bodies that claim to be JSON are read
  (capped), the JSON-RPC message or batch is searched for ``tools/call``, and the exact bytes
  are replayed to the application. A body that cannot be parsed is refused with 400: passing
  it on would let a parser the middleware disagrees with decide which tool runs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ._answers import Answer, Answers
from ._types import Message, Receive, Scope

#: The body of a JSON-RPC POST read to find the tool, at most.
MAX_BODY_BYTES = 4 * 1024 * 1024
# The first revision whose servers reject Mcp-Method / Mcp-Name headers that disagree with
# the body; a dated revision compares as a string.
_HEADERS_BINDING_SINCE = "2026-07-28"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_BASE64_SENTINEL = re.compile(r"=\?base64\?([A-Za-z0-9+/]*={0,2})\?=")
_ROUTING = frozenset({b"mcp-method", b"mcp-name", b"mcp-protocol-version"})
_TOO_LARGE = Answer(413, "invalid_request", "The request body is too large", [], "body_too_large")
_NOT_JSON = Answers.invalid_request("The request body is not valid JSON", "body_not_json")


Needed = tuple[str, ...]


class ToolScopes:
    def __init__(self, tool_scopes: Mapping[str, Needed], required: Iterable[str]) -> None:
        """``tool_scopes``: already checked scope tokens by tool name. What a refusal names:
        the ``required`` scopes (needed for every request), then the tool's own."""
        required = tuple(required)
        self._needed: dict[str, tuple[frozenset[str], Needed]] = {}
        for tool, scopes in tool_scopes.items():
            needed = tuple(dict.fromkeys((*required, *scopes)))
            self._needed[tool] = (frozenset(needed), needed)
        self._versions: dict[bytes, bool] = {}

    def from_headers(self, scope: Scope, granted: frozenset[str]) -> Needed | Literal[True] | None:
        """What the routing headers say: the scopes a ``tools/call`` of a listed tool needs
        that the token's do not cover (all of them, to ask for), None when the call may go on,
        or True when the headers cannot be trusted and the body must tell."""
        method = name = version = None
        repeated = False
        for header, value in scope["headers"]:
            if header in _ROUTING:
                if header == b"mcp-method":
                    repeated |= method is not None
                    method = value
                elif header == b"mcp-name":
                    repeated |= name is not None
                    name = value
                else:
                    repeated |= version is not None
                    version = value
        if repeated or method is None or not self._binding(version):
            return True
        if method != b"tools/call":
            return None
        return self._missing([_decode(name)], granted)

    async def from_body(
        self, scope: Scope, receive: Receive, granted: frozenset[str]
    ) -> tuple[Needed | Answer | None, Receive]:
        """The same from the JSON-RPC body, or an answer for a body that cannot be inspected;
        and the ``receive`` the application must use from now on (a replay of the body)."""
        content_type = b""
        for header, value in scope["headers"]:
            if header == b"content-type":
                content_type = value
        # The SDKs accept a media type list containing application/json: any mention of json
        # is read, so no body they would run reaches them unread.
        if b"json" not in content_type.lower():
            return None, receive
        body, messages = await _read(receive)
        replay = _replaying(messages, receive)
        if body is None:
            return _TOO_LARGE, replay
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return _NOT_JSON, replay
        return self._missing(_called_tools(document), granted), replay

    def _binding(self, version: bytes | None) -> bool:
        """Whether a revision makes servers check the routing headers against the body."""
        if version is None:
            return False
        known = self._versions.get(version)
        if known is None:
            text = version.decode("latin-1")
            known = bool(_DATE.fullmatch(text)) and text >= _HEADERS_BINDING_SINCE
            if len(self._versions) < 64:  # a handful of revisions exist; clients choose
                self._versions[version] = known
        return known

    def _missing(self, tools: Iterable[str | None], granted: frozenset[str]) -> Needed | None:
        for tool in tools:
            needed = self._needed.get(tool) if tool is not None else None
            if needed is not None and not needed[0] <= granted:
                return needed[1]
        return None


def _decode(value: bytes | None) -> str | None:
    # Mcp-Name carries names that are not plain printable ASCII as =?base64?...?=.
    if value is None:
        return None
    text = value.decode("latin-1")
    if not text.startswith("=?"):
        return text
    sentinel = _BASE64_SENTINEL.fullmatch(text)
    if sentinel is None:
        return text
    try:
        return base64.b64decode(sentinel[1], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None  # names no tool: the server refuses the header too


def _called_tools(document: Any) -> list[str | None]:
    messages = document if isinstance(document, list) else [document]
    tools: list[str | None] = []
    for message in messages:
        if isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            tools.append(name if isinstance(name, str) else None)
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
