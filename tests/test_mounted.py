"""The middleware mounted under a prefix (``root_path``): where the metadata is served, which
URL the challenges name, and which paths are public."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asgi_delegation import DelegationMiddleware

from .conftest import Gateway

RESOURCE = "http://127.0.0.1:8000/tools/mcp"
METADATA = "/.well-known/oauth-protected-resource/tools/mcp"


async def answer(middleware: DelegationMiddleware, path: str, root_path: str) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "GET", "path": path, "root_path": root_path,
        "query_string": b"", "headers": [],
    }  # fmt: skip
    await middleware(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


@pytest.fixture
def middleware(gateway_factory: Callable[..., Gateway]) -> DelegationMiddleware:
    return gateway_factory(resource=RESOURCE, public_paths=["/health"]).middleware


@pytest.mark.parametrize(
    ("path", "root_path", "status", "metadata_url"),
    [
        # Not mounted: the host's root URLs.
        ("/tools/mcp", "", 401, "http://127.0.0.1:8000" + METADATA),
        (METADATA, "", 200, None),
        ("/health", "", 200, None),
        # Mounted at /tools: served and named under the mount.
        ("/tools/mcp", "/tools", 401, "http://127.0.0.1:8000/tools" + METADATA),
        ("/tools" + METADATA, "/tools", 200, None),
        ("/tools/health", "/tools", 200, None),
        ("/tools/", "/tools", 401, "http://127.0.0.1:8000/tools" + METADATA),
        # A root_path the path does not start with: the path is taken as it is.
        ("/health", "/tools", 200, None),
        ("/elsewhere/mcp", "/tools", 401, "http://127.0.0.1:8000" + METADATA),
        # Characters that would break out of the quoted header parameter are encoded.
        ('/a"b\\c/mcp', '/a"b\\c', 401, "http://127.0.0.1:8000/a%22b%5Cc" + METADATA),
    ],
)
async def test_mounted_paths(
    middleware: DelegationMiddleware,
    path: str,
    root_path: str,
    status: int,
    metadata_url: str | None,
) -> None:
    got, headers = await answer(middleware, path, root_path)
    assert got == status
    if metadata_url is not None:
        assert headers[b"www-authenticate"] == f'Bearer resource_metadata="{metadata_url}"'.encode()


async def test_mount_answers_are_bounded(middleware: DelegationMiddleware) -> None:
    for n in range(100):
        mount = f"/m{n}"
        status, headers = await answer(middleware, mount + "/mcp", mount)
        assert status == 401
        assert f"/m{n}/.well-known/".encode() in headers[b"www-authenticate"]
    assert len(middleware._mounted) == 16
