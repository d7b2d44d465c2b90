"""Constructor arguments: every unusable one is refused at once with a ConfigurationError."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_delegation import ConfigurationError, DelegationError, DelegationMiddleware

from .conftest import RESOURCE, echo_app

GOOD: dict[str, Any] = {"issuer": "https://auth.example.com", "resource": RESOURCE}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"issuer": "http://auth.example.com"}, "issuer must use https://"),
        ({"issuer": "http://10.0.0.1"}, "issuer must use https://"),
        ({"issuer": "ftp://auth.example.com"}, "issuer must be an https:// URL"),
        ({"issuer": "auth.example.com"}, "issuer must be an absolute URL with a host"),
        ({"issuer": "https://"}, "issuer must be an absolute URL with a host"),
        ({"issuer": ""}, "issuer must be a non-empty URL string"),
        ({"issuer": None}, "issuer \\(or issuers\\) is required"),
        ({"issuer": "https://auth.example.com?x=1"}, "issuer must not have a query"),
        ({"issuer": "https://auth.example.com#f"}, "issuer must not have a fragment"),
        ({"issuer": "https://u:p@auth.example.com"}, "issuer must not carry credentials"),
        ({"issuer": "https://auth.example.com:99999"}, "issuer is not a valid URL"),
        ({"issuer": "https://auth.example.com/\n"}, "whitespace or control characters"),
        ({"resource": "http://mcp.example.com/mcp"}, "resource must use https://"),
        ({"resource": "https://mcp.example.com/mcp#x"}, "resource must not have a fragment"),
        ({"jwks_uri": "http://auth.example.com/jwks"}, "jwks_uri must use https://"),
        ({"algorithms": ["none"]}, "algorithm 'none' is not accepted"),
        ({"algorithms": ["HS256"]}, "algorithm 'HS256' is not accepted"),
        ({"algorithms": []}, "algorithms must name at least one algorithm"),
        ({"required_scopes": "read write"}, "required_scopes must be a list"),
        ({"required_scopes": ["read write"]}, "not an RFC 6749 scope token"),
        ({"required_scopes": ['a"b']}, "not an RFC 6749 scope token"),
        ({"scopes_supported": ["a\\b"]}, "not an RFC 6749 scope token"),
        ({"public_paths": "/health"}, "public_paths must be a list"),
        ({"public_paths": ["health"]}, "starting with '/'"),
        ({"audience": []}, "audience must be a non-empty"),
        ({"audience": [""]}, "audience must be a non-empty"),
        ({"leeway": -1}, "leeway must be between 0 and 300"),
        ({"leeway": 301}, "leeway must be between 0 and 300"),
        ({"leeway": float("nan")}, "leeway must be a number"),
        ({"leeway": True}, "leeway must be a number"),
        ({"max_token_bytes": 10}, "max_token_bytes must be between"),
        ({"http_timeout": 0}, "http_timeout must be between"),
        ({"token_cache_size": 0}, "token_cache_size must be between"),
        ({"jwks_refetch_cooldown": -5}, "jwks_refetch_cooldown must be between"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("?", r"\?")) as caught:
        DelegationMiddleware(echo_app, **{**GOOD, **options})
    assert isinstance(caught.value, DelegationError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "issuer",
    [
        "http://127.0.0.1:9000",
        "http://localhost:9000/realms/x",
        "http://[::1]:9000",
        "http://dev.localhost",
        "https://auth.example.com/tenant/",
    ],
)
def test_accepted_issuers(issuer: str) -> None:
    DelegationMiddleware(echo_app, issuer=issuer, resource=RESOURCE)


def test_usable_with_starlette_middleware_declarations() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    Starlette(middleware=[Middleware(DelegationMiddleware, **GOOD)])
    app = Starlette()
    app.add_middleware(DelegationMiddleware, **GOOD)
