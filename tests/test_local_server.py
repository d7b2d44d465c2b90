"""LocalAuthorizationServer, as users of asgi_delegation.testing will rely on it."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from asgi_delegation.testing import LocalAuthorizationServer, loopback_socket, serve


def _segment(token: str, n: int) -> dict[str, object]:
    part = token.split(".")[n]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # type: ignore[no-any-return]


def test_mint_defaults_and_overrides() -> None:
    auth = LocalAuthorizationServer("https://as.example/tenant")
    token = auth.mint(
        "bob", audience=["a", "b"], scope=["read", "write"], claims={"azp": "x"},
        header={"typ": "JWT"}, omit=["jti"],
    )  # fmt: skip
    header, claims = _segment(token, 0), _segment(token, 1)
    assert header == {"typ": "JWT", "alg": "RS256", "kid": auth.kid}
    assert claims["iss"] == "https://as.example/tenant"
    assert claims["sub"] == "bob"
    assert claims["aud"] == ["a", "b"]
    assert claims["scope"] == "read write"
    assert claims["azp"] == "x"
    assert "jti" not in claims
    assert claims["exp"] == claims["iat"] + 300  # type: ignore[operator]


def test_sign_accepts_anything_and_none_has_no_signature() -> None:
    auth = LocalAuthorizationServer()
    token = auth.sign({"alg": "none"}, [1, 2], auth.signing_key)
    assert token.endswith(".")
    assert _segment(token, 1) == [1, 2]  # type: ignore[comparison-overlap]


def test_rotation_publishes_old_and_new_keys() -> None:
    auth = LocalAuthorizationServer(algorithm="ES256")
    first = auth.kid
    second = auth.rotate_keys()
    assert [k["kid"] for k in auth.jwks()["keys"]] == [first, second]
    assert all("d" not in k for k in auth.jwks()["keys"])
    third = auth.rotate_keys(keep_previous=False)
    assert [k["kid"] for k in auth.jwks()["keys"]] == [third]


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported algorithm"):
        LocalAuthorizationServer(algorithm="HS256")


async def test_routes_in_process() -> None:
    auth = LocalAuthorizationServer("http://127.0.0.1/realm")
    auth.extra_jwks.append({"kty": "oct", "k": "AA"})
    async with auth.http_client() as client:
        oauth = await client.get("http://127.0.0.1/.well-known/oauth-authorization-server/realm")
        oidc = await client.get("http://127.0.0.1/realm/.well-known/openid-configuration")
        jwks = await client.get("http://127.0.0.1/realm/jwks")
        missing = await client.get("http://127.0.0.1/nothing")
        auth.fail_status = 503
        failing = await client.get("http://127.0.0.1/realm/jwks")
    assert oauth.json() == oidc.json() == auth.metadata()
    assert oauth.json()["issuer"] == "http://127.0.0.1/realm"
    assert jwks.headers["cache-control"] == "max-age=300"
    assert jwks.json()["keys"][-1] == {"kty": "oct", "k": "AA"}
    assert missing.status_code == 404
    assert failing.status_code == 503
    assert auth.requests["/realm/jwks"] == 2


async def test_serve_on_loopback_only() -> None:
    auth = LocalAuthorizationServer()
    with pytest.raises(ValueError, match="loopback"):
        async with auth.serve(host="0.0.0.0"):  # noqa: S104
            pass
    async with auth.serve() as issuer, httpx.AsyncClient() as client:
        assert issuer == auth.issuer
        response = await client.get(issuer + "/.well-known/oauth-authorization-server")
        assert response.json()["jwks_uri"] == issuer + "/jwks"


async def test_client_credentials_grant() -> None:
    auth = LocalAuthorizationServer()
    auth.register_client("agent", secret="s")
    auth.grantable_scopes["https://rs.example/mcp"] = frozenset({"read", "write"})
    form = {"grant_type": "client_credentials", "resource": "https://rs.example/mcp"}
    async with auth.http_client() as client:
        granted = await client.post(
            auth.token_endpoint, data={**form, "scope": "read"}, auth=("agent", "s")
        )
        too_much = await client.post(
            auth.token_endpoint, data={**form, "scope": "admin"}, auth=("agent", "s")
        )
        wrong_secret = await client.post(auth.token_endpoint, data=form, auth=("agent", "x"))
        unknown_grant = await client.post(
            auth.token_endpoint, data={"grant_type": "password"}, auth=("agent", "s")
        )
    answer = granted.json()
    assert (answer["token_type"], answer["scope"], answer["expires_in"]) == ("Bearer", "read", 300)
    claims = auth.verify(answer["access_token"])
    assert claims is not None
    assert (claims["sub"], claims["client_id"], claims["aud"], claims["scope"]) == (
        "agent", "agent", "https://rs.example/mcp", "read",
    )  # fmt: skip
    assert (too_much.status_code, too_much.json()["error"]) == (400, "invalid_scope")
    assert (wrong_secret.status_code, wrong_secret.json()["error"]) == (401, "invalid_client")
    assert unknown_grant.json()["error"] == "unsupported_grant_type"


async def test_dynamic_client_registration() -> None:
    auth = LocalAuthorizationServer()
    metadata = auth.metadata()
    assert metadata["registration_endpoint"] == auth.issuer + "/register"
    assert "client_credentials" in metadata["grant_types_supported"]
    async with auth.http_client() as client:
        registered = await client.post(
            metadata["registration_endpoint"],
            json={"client_name": "agent", "grant_types": ["client_credentials"],
                  "token_endpoint_auth_method": "client_secret_post"},
        )  # fmt: skip
        info = registered.json()
        token = await client.post(
            auth.token_endpoint,
            data={
                "grant_type": "client_credentials",
                "client_id": info["client_id"],
                "client_secret": info["client_secret"],
            },
        )
        refused = [
            await client.post(metadata["registration_endpoint"], content=body)
            for body in (
                b"not json",
                b"[]",
                b'{"token_endpoint_auth_method": "none"}',
                b'{"grant_types": ["authorization_code"]}',
            )
        ]
        authorize = await client.get(metadata["authorization_endpoint"])
    assert registered.status_code == 201
    assert info["client_name"] == "agent"
    assert info["token_endpoint_auth_method"] == "client_secret_post"
    assert token.status_code == 200
    assert auth.verify(token.json()["access_token"])["sub"] == info["client_id"]  # type: ignore[index]
    assert [(r.status_code, r.json()["error"]) for r in refused] == [
        (400, "invalid_client_metadata")
    ] * 4
    # No user can log in here: the endpoint exists because MCP clients require the member.
    assert (authorize.status_code, authorize.json()["error"]) == (400, "unsupported_response_type")


async def test_serve_runs_an_app_in_this_loop_and_reports_a_failed_startup() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            if events == ["fail"]:
                await send({"type": "lifespan.startup.failed", "message": "no database"})
                return
            events.append("started")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            events.append("stopped")
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": events[0].encode()})

    with loopback_socket() as (sock, origin):
        async with serve(app, sock), httpx.AsyncClient() as client:
            assert (await client.get(origin)).text == "started"
    assert events == ["started", "stopped"]
    events[:] = ["fail"]
    with loopback_socket() as (sock, origin), pytest.raises(RuntimeError, match="startup"):
        async with serve(app, sock):
            pass
