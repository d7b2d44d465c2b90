"""LocalAuthorizationServer, as users of asgi_delegation.testing will rely on it."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from asgi_delegation.testing import LocalAuthorizationServer


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
