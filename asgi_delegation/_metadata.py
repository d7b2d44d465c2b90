"""OAuth 2.0 Protected Resource Metadata (RFC 9728), served by the middleware itself.

The document and its URLs come from configuration only, never from the ``Host`` header, so a
client cannot make the server advertise an authorization server of the client's choosing.

Mounted under a prefix (a Starlette ``Mount``, a server's ``--root-path``), the middleware never
sees requests for the host's root ``/.well-known/`` URLs: it then serves the metadata under
its mount and advertises that URL in its challenges, on the configured origin. MCP clients
follow the ``resource_metadata`` URL of the challenge, wherever it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import quote

from ._scopes import advertised
from ._types import Send
from ._urls import url_path, well_known_urls

_CORS: list[tuple[bytes, bytes]] = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, HEAD, OPTIONS"),
    (b"access-control-allow-headers", b"authorization, mcp-protocol-version"),
    (b"access-control-max-age", b"86400"),
]


class ResourceMetadata:
    def __init__(self, resource: str, issuers: Iterable[str], scopes: Iterable[str]) -> None:
        self.url, _ = well_known_urls(resource, "oauth-protected-resource")
        root_path = "/.well-known/oauth-protected-resource"
        self._suffixed = root_path + url_path(resource).rstrip("/")
        self.paths = frozenset({root_path, self._suffixed})
        self._origin = self.url[: -len(self._suffixed)]
        document = {
            "resource": resource,
            "authorization_servers": list(issuers),  # in configuration order
            "scopes_supported": list(advertised(scopes)),
            "bearer_methods_supported": ["header"],
        }
        body = json.dumps(document).encode()
        self._ok = (
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"public, max-age=3600"),
                *_CORS,
            ],
            body,
        )

    def url_under(self, mount: str) -> str:
        """The metadata URL when the middleware is mounted at ``mount`` (a root_path)."""
        return self._origin + quote(mount.rstrip("/"), safe="/-._~!$&'()*+,;=:@") + self._suffixed

    async def serve(self, method: str, send: Send) -> None:
        if method in ("GET", "HEAD"):
            status, (headers, body) = 200, self._ok
        elif method == "OPTIONS":
            status, headers, body = 204, _CORS, b""
        else:
            status, body = 405, b""
            headers = [(b"allow", b"GET, HEAD, OPTIONS"), (b"content-length", b"0"), *_CORS]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers, "trailers": False}
        )
        await send(
            {
                "type": "http.response.body",
                "body": b"" if method == "HEAD" else body,
                "more_body": False,
            }
        )
