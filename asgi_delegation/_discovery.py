"""Authorization server metadata: RFC 8414, falling back to OpenID Connect discovery.

Only the configured issuer is ever asked, and the document must name that issuer byte for byte
(RFC 8414 section 3.3), so a metadata document cannot redirect trust to another server.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._audit import Auditor
from ._errors import ConfigurationError
from ._fetch import FetchError, fetch_json, max_age
from ._http import HTTPClient
from ._refresh import Refreshing
from ._urls import secure_url, url_path, well_known_urls

MAX_BYTES = 256 * 1024
_DEFAULT_TTL = 3600.0
_MIN_TTL, _MAX_TTL = 60.0, 86400.0


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    issuer: str
    jwks_uri: str | None
    token_endpoint: str | None
    introspection_endpoint: str | None
    document: Mapping[str, Any]


def discovery_urls(issuer: str) -> tuple[str, ...]:
    """Where to look, in order (the order the MCP authorization spec gives)."""
    oauth, _ = well_known_urls(issuer, "oauth-authorization-server")
    if not url_path(issuer):
        return oauth, well_known_urls(issuer, "openid-configuration")[0]
    oidc_inserted, _ = well_known_urls(issuer, "openid-configuration")
    return oauth, oidc_inserted, issuer.rstrip("/") + "/.well-known/openid-configuration"


def _optional_url(document: Mapping[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    try:
        return secure_url(value, name)
    except ConfigurationError as exc:
        raise FetchError(f"the metadata's {exc}") from None


class Discovery:
    def __init__(self, issuer: str, http: HTTPClient, *, deadline: float, auditor: Auditor) -> None:
        self._issuer = issuer
        self._auditor = auditor
        self._http = http
        self._deadline = deadline
        self._urls = discovery_urls(issuer)
        self._metadata = Refreshing("authorization server metadata", self._load)

    async def get(self) -> ServerMetadata:
        return await self._metadata.get()

    async def _load(self) -> tuple[ServerMetadata, float]:
        reasons = []
        for url in self._urls:
            started = time.perf_counter()
            try:
                fetched = await fetch_json(
                    self._http.get(), url, deadline=self._deadline, max_bytes=MAX_BYTES
                )
                document = fetched.document
                if document.get("issuer") != self._issuer:
                    raise FetchError(f"{url} names another issuer than the configured one")
                metadata = ServerMetadata(
                    issuer=self._issuer,
                    jwks_uri=_optional_url(document, "jwks_uri"),
                    token_endpoint=_optional_url(document, "token_endpoint"),
                    introspection_endpoint=_optional_url(document, "introspection_endpoint"),
                    document=document,
                )
            except FetchError as exc:
                reasons.append(str(exc))
                self._auditor.fetched("metadata", url, started, str(exc))
                continue
            self._auditor.fetched("metadata", url, started, None)
            ttl = max_age(fetched.cache_control)
            ttl = _DEFAULT_TTL if ttl is None else min(max(ttl, _MIN_TTL), _MAX_TTL)
            return metadata, ttl
        raise FetchError("; ".join(reasons))
