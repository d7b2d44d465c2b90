"""Scope hierarchies (MCP authorization, revision 2026-07-28): a broader scope implies the
narrower ones wherever sufficiency is decided; challenges name what the operation needs; and
``offline_access`` is never advertised."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser

from asgi_delegation import ConfigurationError, DelegationMiddleware
from asgi_delegation._scopes import implied_scopes
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE, Gateway

HIERARCHY = {"admin": ["repo", "read"], "repo": ["repo:write", "repo:read"], "repo:write": []}


def test_implication_is_transitive() -> None:
    assert implied_scopes(HIERARCHY) == {
        "admin": frozenset({"repo", "read", "repo:write", "repo:read"}),
        "repo": frozenset({"repo:write", "repo:read"}),
    }


@pytest.mark.parametrize(
    ("hierarchy", "message"),
    [
        ({"a": ["a"]}, "cycle: a -> a"),
        ({"a": ["b"], "b": ["a"]}, "cycle: a -> b -> a"),
        ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, "cycle: a -> b -> c -> a"),
        ([("a", ["b"])], "must map scopes to the scopes they imply"),
        ({"a": "b"}, "must be a list of scopes, not a string"),
        ({"a": ["b c"]}, "not an RFC 6749 scope token"),
        ({"a b": ["c"]}, "not an RFC 6749 scope token"),
        ({7: ["c"]}, "not an RFC 6749 scope token"),
    ],
)
def test_malformed_hierarchies_are_refused_at_construction(
    auth: LocalAuthorizationServer, hierarchy: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DelegationMiddleware(
            _scopes_app, issuer=auth.issuer, resource=RESOURCE, scope_hierarchy=hierarchy
        )


async def _scopes_app(scope: Any, receive: Any, send: Any) -> None:
    ctx = scope["state"]["access_context"]
    user = scope.get("user")
    document = {
        "scopes": sorted(ctx.scopes),
        "has": {s: ctx.has_scope(s) for s in ("admin", "repo", "repo:write", "read", "other")},
        "sdk": sorted(user.access_token.scopes) if isinstance(user, AuthenticatedUser) else None,
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(
        app=_scopes_app,
        required_scopes=["read"],
        tool_scopes={"create_issue": ["repo:write"]},
        scope_hierarchy=HIERARCHY,
    )


@pytest.mark.parametrize(
    ("granted", "status"),
    [("read", 200), ("admin", 200), ("repo", 403), ("repo:read", 403), ("", 403)],
)
async def test_required_scopes_honour_the_hierarchy(
    gateway: Gateway, auth: LocalAuthorizationServer, granted: str, status: int
) -> None:
    response = await gateway.get(auth.mint(audience=RESOURCE, scope=granted))
    assert response.status_code == status
    if status == 403:  # the challenge names what is needed, not a broader scope
        assert 'scope="read"' in response.headers["www-authenticate"]


def call(tool: str) -> bytes:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    ("granted", "status"),
    [("read repo:write", 200), ("read repo", 200), ("admin", 200), ("read repo:read", 403)],
)
async def test_tool_scopes_honour_the_hierarchy(
    gateway: Gateway, auth: LocalAuthorizationServer, granted: str, status: int
) -> None:
    token = auth.mint(audience=RESOURCE, scope=granted)
    response = await gateway.client.post(
        "/mcp",
        content=call("create_issue"),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    assert response.status_code == status
    if status == 403:
        assert 'scope="read repo:write"' in response.headers["www-authenticate"]


async def test_the_context_keeps_the_token_scopes_and_answers_has_scope(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    document = (await gateway.get(auth.mint(audience=RESOURCE, scope="repo read"))).json()
    assert document["scopes"] == ["read", "repo"]
    assert document["has"] == {
        "admin": False,
        "repo": True,
        "repo:write": True,
        "read": True,
        "other": False,
    }
    # The MCP SDK decides sufficiency on its AccessToken: the implied scopes are there.
    assert document["sdk"] == ["read", "repo", "repo:read", "repo:write"]


async def test_without_a_hierarchy_has_scope_is_membership(
    gateway_factory: Callable[..., Gateway], auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(app=_scopes_app)
    document = (await gateway.get(auth.mint(audience=RESOURCE, scope="admin"))).json()
    assert document["has"]["admin"]
    assert not document["has"]["repo"]
    assert document["sdk"] == ["admin"]


async def test_offline_access_is_never_advertised(
    gateway_factory: Callable[..., Gateway], auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(
        app=_scopes_app,
        required_scopes=["mcp", "offline_access"],
        tool_scopes={"create_issue": ["offline_access", "repo:write"]},
    )
    missing = await gateway.get()
    assert 'scope="mcp"' in missing.headers["www-authenticate"]
    lacking = await gateway.get(auth.mint(audience=RESOURCE, scope="mcp"))
    assert lacking.status_code == 403  # still required
    assert 'scope="mcp"' in lacking.headers["www-authenticate"]
    token = auth.mint(audience=RESOURCE, scope="mcp offline_access")
    refused = await gateway.client.post(
        "/mcp",
        content=call("create_issue"),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    assert 'scope="mcp repo:write"' in refused.headers["www-authenticate"]
    metadata = (await gateway.client.get("/.well-known/oauth-protected-resource/mcp")).json()
    assert metadata["scopes_supported"] == ["mcp"]
    explicit = gateway_factory(scopes_supported=["mcp", "offline_access", "read"])
    metadata = (await explicit.client.get("/.well-known/oauth-protected-resource")).json()
    assert metadata["scopes_supported"] == ["mcp", "read"]
