"""The middleware's own HTTP answers: RFC 6750 challenges, 503, and WebSocket refusals.

Everything that does not depend on the request is rendered once, at start-up. Descriptions are
generic: they never echo request data. Every answer is CORS-readable (``*``, no credentials) so
that browser-based MCP clients can read ``WWW-Authenticate`` and find the resource metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ._scopes import advertised
from ._tokens import REASONS
from ._types import Send

Headers = list[tuple[bytes, bytes]]

_DESCRIPTIONS = {
    "expired": "The access token has expired",
    "not_yet_valid": "The access token is not valid yet",
    "too_large": "The access token is too large",
    "malformed": "The access token is malformed",
    "algorithm": "The access token is signed with an algorithm that is not accepted",
    "header": "The access token has a header that is not accepted",
    "type": "The access token is not an access token of an accepted type",
    "inactive": "The access token is not active",
}
_NOT_ACCEPTED = "The access token is not accepted by this resource"
_COMMON_HEADERS: Headers = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", b"WWW-Authenticate, Retry-After"),
]


class Answer:
    """A complete HTTP response, plus the WebSocket close reason for the same refusal.
    ``reason`` is the audit category of the refusal (finer than ``error``)."""

    __slots__ = ("body", "error", "headers", "reason", "status")

    def __init__(
        self, status: int, error: str, description: str, headers: Headers, reason: str
    ) -> None:
        self.status = status
        self.error = error
        self.reason = reason
        self.body = json.dumps({"error": error, "error_description": description}).encode()
        self.headers = [
            *headers,
            *_COMMON_HEADERS,
            (b"content-length", str(len(self.body)).encode()),
        ]

    async def send_http(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": self.headers,
                "trailers": False,
            }
        )
        await send({"type": "http.response.body", "body": self.body, "more_body": False})

    async def refuse_websocket(self, send: Send) -> None:
        # 1008 (policy violation): the WebSocket code for "not allowed"; the reason is the error.
        await send({"type": "websocket.close", "code": 1008, "reason": self.error})


def _challenge(params: Iterable[tuple[str, str]]) -> tuple[bytes, bytes]:
    value = "Bearer " + ", ".join(f'{name}="{value}"' for name, value in params)
    return b"www-authenticate", value.encode()


class Answers:
    def __init__(self, resource_metadata_url: str, required_scopes: Iterable[str]) -> None:
        self._metadata = ("resource_metadata", resource_metadata_url)
        required_scopes = tuple(required_scopes)
        self._scope = " ".join(advertised(required_scopes))
        params = [self._metadata]
        if self._scope:
            params.append(("scope", self._scope))
        self.missing = Answer(
            401, "unauthorized", "A bearer token is required", [_challenge(params)], "missing"
        )
        self._invalid_token = {reason: self._build_invalid_token(reason) for reason in REASONS}
        self._insufficient: dict[tuple[str, ...], Answer] = {}
        self.insufficient_scope = self.insufficient_scope_for(required_scopes)

    def invalid_token(self, reason: str) -> Answer:
        return self._invalid_token[reason]

    def _build_invalid_token(self, reason: str) -> Answer:
        description = _DESCRIPTIONS.get(reason, _NOT_ACCEPTED)
        header = _challenge(
            [("error", "invalid_token"), ("error_description", description), self._metadata]
        )
        return Answer(401, "invalid_token", description, [header], reason)

    def insufficient_scope_for(self, scopes: tuple[str, ...]) -> Answer:
        """403 naming every scope needed (RFC 6750 3.1): what MCP clients step up to."""
        answer = self._insufficient.get(scopes)
        if answer is None:
            answer = self._build_insufficient_scope(scopes)
            # One per tool, from configuration; a batch calling several tools names their
            # union, and those combinations are the caller's choice: keep only so many.
            if len(self._insufficient) < 256:
                self._insufficient[scopes] = answer
        return answer

    def _build_insufficient_scope(self, scopes: tuple[str, ...]) -> Answer:
        description = "The access token lacks a required scope"
        header = _challenge(
            [
                ("error", "insufficient_scope"),
                ("scope", " ".join(advertised(scopes))),
                ("error_description", description),
                self._metadata,
            ]
        )
        return Answer(403, "insufficient_scope", description, [header], "insufficient_scope")

    @staticmethod
    def invalid_request(description: str, reason: str = "invalid_request") -> Answer:
        header = _challenge([("error", "invalid_request"), ("error_description", description)])
        return Answer(400, "invalid_request", description, [header], reason)

    @staticmethod
    def unavailable(retry_after: int) -> Answer:
        return Answer(
            503,
            "temporarily_unavailable",
            "The authorization server cannot be reached; retry later",
            [(b"retry-after", str(retry_after).encode())],
            "keys_unavailable",
        )
