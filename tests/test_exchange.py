"""Token exchange behind AccessContext: laziness, caching, expiry, errors, policy, @grant,
the httpx auth, and the request the token endpoint receives."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_delegation import (
    AccessContext,
    DelegationMiddleware,
    ExchangeDenied,
    ExchangeNotAllowed,
    ExchangeUnavailable,
    grant,
)
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer
from asgi_delegation.testing._serve import loopback_socket, serve_on

from .conftest import (
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    Gateway,
    exchanger_of,
)


def token_requests(auth: LocalAuthorizationServer) -> int:
    return auth.requests["/token"]


async def test_no_exchange_unless_asked(gateway: Gateway, token: str, auth: Any) -> None:
    for _ in range(3):
        assert (await gateway.get(token)).status_code == 200
    assert token_requests(auth) == 0


async def test_sequential_requests_share_one_exchange(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    for _ in range(10):
        document = await gateway.exchange(token, GITHUB)
        assert document["grants"] == [
            {"resource": GITHUB, "sub": "alice", "aud": GITHUB, "scope": None,
             "token_type": "Bearer"}
        ]  # fmt: skip
    assert token_requests(auth) == 1


async def test_request_sent_to_the_token_endpoint(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    await gateway.exchange(token, GITHUB, scope="repo read:user repo")
    assert auth.exchanges == [
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "resource": GITHUB,
            "scope": "read:user repo",
        }
    ]


@pytest.mark.parametrize(
    ("target", "sent"),
    [("resource", {"resource"}), ("audience", {"audience"}), ("both", {"resource", "audience"})],
)
async def test_exchange_target(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer, target: str, sent: set[str]
) -> None:
    gateway = gateway_factory(exchange_target=target, requested_token_type="urn:x:jwt")
    assert (await gateway.exchange(token, GITHUB))["grants"][0]["aud"] == GITHUB
    form = auth.exchanges[0]
    assert {"resource", "audience"} & form.keys() == sent
    assert form["requested_token_type"] == "urn:x:jwt"


async def test_server_that_takes_only_audience_refuses_resource(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    auth.exchange_target = "audience"  # as Keycloak, Okta and Auth0 do
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert error["class"] == "ExchangeDenied"
    assert error["error"] == "invalid_request"


async def test_users_resources_and_scopes_are_kept_apart(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    alice = auth.mint("alice", audience=RESOURCE)
    bob = auth.mint("bob", audience=RESOURCE)
    for user, token in (("alice", alice), ("bob", bob)):
        for resource in (GITHUB, GOOGLE):
            for scope in (None, "a", "b"):
                (got,) = (await gateway.exchange(token, resource, scope))["grants"]
                assert (got["sub"], got["aud"], got["scope"]) == (user, resource, scope)
    assert token_requests(auth) == 12


async def test_grant_expiry_and_refresh_ahead(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Any
) -> None:
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 300
    await gateway.exchange(token, GITHUB)
    clock.advance(200)  # before the 60 s refresh margin: from the cache
    await gateway.exchange(token, GITHUB)
    assert token_requests(auth) == 1
    clock.advance(50)  # inside the margin: served, and one refresh runs in the background
    for _ in range(3):
        await gateway.exchange(token, GITHUB)
    await _background_done(gateway)
    assert token_requests(auth) == 2
    clock.advance(200)  # the refreshed grant (obtained at 250 s) is still fresh
    await gateway.exchange(token, GITHUB)
    assert token_requests(auth) == 2
    clock.advance(50)  # and now in its own margin: refreshed once more
    await gateway.exchange(token, GITHUB)
    await _background_done(gateway)
    assert token_requests(auth) == 3


async def _background_done(gateway: Gateway) -> None:
    tasks = list(exchanger_of(gateway.middleware)._background)
    if tasks:
        await asyncio.gather(*tasks)


async def test_expired_grant_is_exchanged_again(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Any
) -> None:
    token = auth.mint("alice", audience=RESOURCE, expires_in=10_000)
    auth.exchange_expires_in = 100
    await gateway.exchange(token, GITHUB)
    clock.advance(96)  # past expiry minus 5 s: never handed out so close to expiry
    await gateway.exchange(token, GITHUB)
    assert token_requests(auth) == 2


async def test_a_grant_shorter_than_the_skew_is_not_cached(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    auth.exchange_expires_in = 3
    for _ in range(2):
        await gateway.exchange(token, GITHUB)
    assert token_requests(auth) == 2


async def test_denials_are_exchange_denied(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GITHUB])
    error = (await gateway.exchange(token, SLACK))["error"]
    assert error == {
        "class": "ExchangeDenied",
        "error": "invalid_target",
        "description": "the resource is not a dependency of the client",
        "retry_after": None,
    }
    auth.unconsented.add(("alice", GITHUB))
    assert (await gateway.exchange(token, GITHUB))["error"]["error"] == "access_denied"


async def test_wrong_client_secret_is_invalid_client(gateway_factory: Any, token: str) -> None:
    gateway = gateway_factory(client_secret="wrong")
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert (error["class"], error["error"]) == ("ExchangeDenied", "invalid_client")
    assert "wrong" not in json.dumps(error)


async def test_allowed_resources_refuse_without_a_request(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(allowed_resources=[GITHUB])
    error = (await gateway.exchange(token, SLACK))["error"]
    assert (error["class"], error["error"]) == ("ExchangeNotAllowed", "not_allowed")
    assert token_requests(auth) == 0
    assert (await gateway.exchange(token, GITHUB))["grants"]


@pytest.mark.parametrize("is_async", [False, True])
async def test_policy_hook(
    gateway_factory: Any, auth: LocalAuthorizationServer, is_async: bool
) -> None:
    seen: list[tuple[str, str, str | None]] = []

    def decide(ctx: AccessContext, resource: str, scope: str | None) -> bool:
        seen.append((ctx.subject, resource, scope))
        return ctx.subject == "alice" or resource == GOOGLE

    async def decide_async(ctx: AccessContext, resource: str, scope: str | None) -> bool:
        return decide(ctx, resource, scope)

    gateway = gateway_factory(policy=decide_async if is_async else decide)
    alice, bob = (auth.mint(u, audience=RESOURCE) for u in ("alice", "bob"))
    assert (await gateway.exchange(alice, GITHUB, "x"))["grants"]
    assert (await gateway.exchange(bob, GITHUB))["error"]["class"] == "ExchangeNotAllowed"
    assert (await gateway.exchange(bob, GOOGLE))["grants"]
    assert seen == [("alice", GITHUB, "x"), ("bob", GITHUB, None), ("bob", GOOGLE, None)]
    assert token_requests(auth) == 2


async def test_no_client_configured(gateway_factory: Any, token: str, auth: Any) -> None:
    gateway = gateway_factory(client_id=None, client_secret=None)
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert (error["class"], error["error"]) == ("ExchangeNotAllowed", "client_not_configured")
    assert token_requests(auth) == 0


async def test_unusable_resource_identifier(gateway: Gateway, token: str, auth: Any) -> None:
    error = (await gateway.exchange(token, "https://x.example/a b"))["error"]
    assert (error["class"], error["error"]) == ("ExchangeNotAllowed", "invalid_target")
    assert token_requests(auth) == 0


async def test_outage_then_recovery(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(exchange_attempts=2)
    auth.token_answers += [ScriptedAnswer(503, {"error": "temporarily_unavailable"},
                                          {"retry-after": "0"})] * 2  # fmt: skip
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert (error["class"], error["error"]) == ("ExchangeUnavailable", "temporarily_unavailable")
    assert error["retry_after"] == 0
    assert token_requests(auth) == 2  # one retry
    assert (await gateway.exchange(token, GITHUB))["grants"]  # failures are not cached
    assert token_requests(auth) == 3


async def test_token_endpoint_override_skips_discovery(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(jwks_uri=auth.issuer + "/jwks", token_endpoint=auth.issuer + "/token")
    assert (await gateway.exchange(token, GITHUB))["grants"]
    assert auth.requests == {"/jwks": 1, "/token": 1}


async def test_metadata_without_token_endpoint(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer, monkeypatch: Any
) -> None:
    document = {k: v for k, v in auth.metadata().items() if k != "token_endpoint"}
    monkeypatch.setattr(auth, "metadata", lambda: document)
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert (error["class"], error["error"]) == ("ExchangeUnavailable", "invalid_response")


async def test_total_deadline_on_a_slow_token_endpoint(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer
) -> None:
    auth.token_latency = 5
    gateway = gateway_factory(exchange_timeout=0.3)
    with anyio.fail_after(3):
        error = (await gateway.exchange(token, GITHUB))["error"]
    assert (error["class"], error["error"]) == ("ExchangeUnavailable", "temporarily_unavailable")
    assert "within 0.3 s" in error["description"]


async def test_concurrency_towards_the_server_is_bounded(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    auth.token_latency = 0.05
    gateway = gateway_factory(max_concurrent_exchanges=2)
    tokens = [auth.mint(f"u{n}", audience=RESOURCE) for n in range(8)]
    documents = await asyncio.gather(*(gateway.exchange(t, GITHUB) for t in tokens))
    assert all(d["grants"] for d in documents)
    assert auth.token_requests_peak == 2


async def test_dropped_connection_is_retried(
    gateway_factory: Any, token: str, auth: LocalAuthorizationServer
) -> None:
    async with auth.serve() as issuer:
        token = auth.mint("alice", audience=RESOURCE)
        gateway = gateway_factory(issuer=issuer, http_client=None, exchange_attempts=2)
        auth.token_answers.append(ScriptedAnswer(200, b'{"access_token": "x', drop=True))
        document = await gateway.exchange(token, GITHUB)
    assert document["grants"][0]["sub"] == "alice"
    assert token_requests(auth) == 2


# -- AccessContext: prefetch, access, errors ------------------------------------------------


def starlette_app(endpoint: Any, auth: LocalAuthorizationServer, **options: Any) -> Any:
    app = Starlette(routes=[Route("/", endpoint)])
    return DelegationMiddleware(
        app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client(),
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **options,
    )  # fmt: skip


async def _call(app: Any, token: str) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE_URL
    ) as client:
        return await client.get("/", headers={"authorization": f"Bearer {token}"})


async def test_grant_decorator_exchanges_concurrently_and_records_failures(
    auth: LocalAuthorizationServer, token: str
) -> None:
    auth.token_latency = 0.05
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GITHUB, GOOGLE])

    @grant(GITHUB, GOOGLE, SLACK)
    async def endpoint(request: Request) -> JSONResponse:
        ctx: AccessContext = request.state.access_context
        assert ctx.has_errors()
        with pytest.raises(ExchangeDenied) as denied:
            ctx.access(SLACK)
        return JSONResponse(
            {
                "github": auth.verify(ctx.access(GITHUB).access_token),
                "google": ctx.access(GOOGLE).resource,
                "errors": {r: e.error for r, e in ctx.get_errors().items()},
                "denied": denied.value.resource,
            }
        )

    response = await _call(starlette_app(endpoint, auth), token)
    body = response.json()
    assert body["github"]["sub"] == "alice"
    assert body["google"] == GOOGLE
    assert body["errors"] == {SLACK: "invalid_target"}
    assert body["denied"] == SLACK
    assert auth.token_requests_peak == 3  # all three at once, not one after another


async def test_access_without_a_prior_exchange(auth: LocalAuthorizationServer, token: str) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        ctx: AccessContext = request.state.access_context
        with pytest.raises(LookupError, match="no grant for"):
            ctx.access(GITHUB)
        assert not ctx.has_errors()
        assert dict(ctx.get_errors()) == {}
        return JSONResponse({})

    assert (await _call(starlette_app(endpoint, auth), token)).status_code == 200


def test_grant_decorator_misuse() -> None:
    with pytest.raises(TypeError):
        grant()
    with pytest.raises(TypeError):
        grant(GITHUB)(lambda request: None)  # type: ignore[arg-type, return-value]


async def test_grant_decorator_without_a_context() -> None:
    @grant(GITHUB)
    async def endpoint(x: int) -> int:
        return x

    with pytest.raises(LookupError, match="no access context"):
        await endpoint(1)


# -- httpx auth against a loopback upstream API ---------------------------------------------


async def test_httpx_auth_re_exchanges_once_after_a_401(
    auth: LocalAuthorizationServer, token: str
) -> None:
    seen: list[str] = []
    refuse_next = [True]

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        claims = auth.verify(bearer) or {}
        seen.append(claims.get("sub", "?"))
        status = 401 if refuse_next and refuse_next.pop() else 200
        body = json.dumps({"sub": claims.get("sub"), "aud": claims.get("aud")}).encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def endpoint(request: Request) -> JSONResponse:
        ctx: AccessContext = request.state.access_context
        async with httpx.AsyncClient(auth=ctx.auth(origin)) as client:
            answer = await client.get(origin + "/user")
        return JSONResponse({"status": answer.status_code, **answer.json()})

    with loopback_socket() as (sock, origin):
        async with serve_on(upstream, sock):
            response = await _call(starlette_app(endpoint, auth), token)
    assert response.json() == {"status": 200, "sub": "alice", "aud": origin}
    assert seen == ["alice", "alice"]
    assert token_requests(auth) == 2  # the refused grant was dropped and exchanged again


def test_httpx_auth_refuses_sync_clients(auth: LocalAuthorizationServer) -> None:
    from asgi_delegation._upstream_auth import UpstreamAuth

    flow = UpstreamAuth(GITHUB, None, None).sync_auth_flow(  # type: ignore[arg-type]
        httpx.Request("GET", GITHUB)
    )
    with pytest.raises(RuntimeError, match="AsyncClient"):
        next(flow)


async def test_exchange_errors_carry_no_secrets(
    gateway: Gateway, token: str, auth: LocalAuthorizationServer
) -> None:
    auth.token_answers.append(
        ScriptedAnswer(400, {"error": "invalid_grant", "error_description": f"bad {token}"})
    )
    error = (await gateway.exchange(token, GITHUB))["error"]
    assert token not in json.dumps(error)
    assert error["description"] == "bad [redacted]"


async def test_exception_classes() -> None:
    for cls in (ExchangeDenied, ExchangeUnavailable, ExchangeNotAllowed):
        exc = cls(GITHUB, "some_error", "details", retry_after=3)
        assert str(exc) == f"token exchange for {GITHUB} failed with some_error: details"
        assert (exc.resource, exc.error, exc.error_description, exc.retry_after) == (
            GITHUB, "some_error", "details", 3,
        )  # fmt: skip
