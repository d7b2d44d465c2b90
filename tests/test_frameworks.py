"""The middleware in front of FastAPI, Quart and a bare ASGI callable, each behind a real uvicorn
on 127.0.0.1 and reached by httpx: the access context reaches endpoints, dependencies, worker
threads and spawned tasks; FastAPI turns failed exchanges into the documented HTTP errors and
documents the bearer scheme; ``current_access_context()`` answers only inside an authenticated
request.

Starting and stopping uvicorn costs about a quarter of a second, so the authorization server
and the three applications are served once per module; ``authz`` puts the authorization
server's knobs back after every test, and every test mints its own tokens, so no grant cached
by one test is found by another.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from quart import Quart

from asgi_delegation import (
    AccessContext,
    DelegationMiddleware,
    ExchangeError,
    Grant,
    current_access_context,
    grant,
)
from asgi_delegation.fastapi import access_context, delegated
from asgi_delegation.testing import LocalAuthorizationServer
from asgi_delegation.testing._serve import loopback_socket, running_on
from asgi_delegation.testing._token_endpoint import ScriptedAnswer

from .conftest import CLIENT_ID, CLIENT_SECRET, GITHUB, GOOGLE, SLACK, Gateway

# What current_access_context() says outside an authenticated request.
NO_CONTEXT = (
    "no access context here: current_access_context() works only while handling a request "
    "that DelegationMiddleware authenticated"
)
# The start of every JWT (base64url of '{"'): no answer may contain one.
JWT_PREFIX = "eyJ"


@dataclass
class Served:
    """An application behind uvicorn: its origin (also its resource identifier) and how many
    times each of its endpoints ran."""

    origin: str
    calls: Counter[str]


def _subject_or_error() -> dict[str, Any]:
    try:
        return {"subject": current_access_context().subject}
    except LookupError as exc:
        return {"lookup_error": str(exc)}


# -- the authorization server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_auth() -> Iterator[LocalAuthorizationServer]:
    server = LocalAuthorizationServer()
    server.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    with server.running():
        yield server


@pytest.fixture
def authz(shared_auth: LocalAuthorizationServer) -> Iterator[LocalAuthorizationServer]:
    """The module's authorization server, its knobs reset when the test ends."""
    yield shared_auth
    shared_auth.unconsented.clear()
    shared_auth.token_answers.clear()
    shared_auth.grantable_scopes.clear()
    shared_auth.exchange_target = "any"
    shared_auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- FastAPI ------------------------------------------------------------------------------------


# Dependencies live at module level: with postponed annotations FastAPI resolves the names in
# an endpoint's annotations among the module's globals.


async def subject_async_dependency() -> str:
    return current_access_context().subject


def subject_sync_dependency() -> dict[str, Any]:  # FastAPI runs it in its threadpool
    return {"subject": current_access_context().subject, "thread": threading.get_ident()}


def fastapi_app(auth: LocalAuthorizationServer, calls: Counter[str]) -> FastAPI:
    api = FastAPI()

    def granted(grant: Grant) -> dict[str, Any]:
        claims = auth.verify(grant.access_token) or {}
        return {
            "resource": grant.resource,
            "sub": claims.get("sub"),
            "aud": claims.get("aud"),
            "act": claims.get("act"),
            "scope": grant.scope,
        }

    @api.get("/github")
    async def github(upstream: Annotated[Grant, Depends(delegated(GITHUB))]) -> dict[str, Any]:
        calls["/github"] += 1
        return granted(upstream)

    @api.get("/github-admin")
    async def github_admin(
        upstream: Annotated[Grant, Depends(delegated(GITHUB, scope="admin:org"))],
    ) -> dict[str, Any]:
        return granted(upstream)

    @api.get("/google")  # not one of the allowed_resources
    async def google(upstream: Annotated[Grant, Depends(delegated(GOOGLE))]) -> dict[str, Any]:
        return granted(upstream)

    @api.get("/slack")  # refused by the policy
    async def slack(upstream: Annotated[Grant, Depends(delegated(SLACK))]) -> dict[str, Any]:
        return granted(upstream)

    @api.get("/me")
    async def me(ctx: Annotated[AccessContext, Depends(access_context)]) -> dict[str, Any]:
        calls["/me"] += 1
        return {
            "subject": ctx.subject,
            "scopes": sorted(ctx.scopes),
            "current_is_ctx": current_access_context() is ctx,
        }

    @api.get("/both")
    async def both(
        ctx: Annotated[AccessContext, Depends(access_context)],
        upstream: Annotated[Grant, Depends(delegated(GITHUB))],
    ) -> dict[str, Any]:
        return {"subject": ctx.subject, "resource": upstream.resource}

    @api.get("/current")
    async def current(
        from_async: Annotated[str, Depends(subject_async_dependency)],
        from_sync: Annotated[dict[str, Any], Depends(subject_sync_dependency)],
    ) -> dict[str, Any]:
        return {
            "endpoint": current_access_context().subject,
            "async_dependency": from_async,
            "sync_dependency": from_sync["subject"],
            "sync_dependency_thread": from_sync["thread"],
            "thread": threading.get_ident(),
        }

    @api.get("/current-sync")
    def current_sync() -> dict[str, Any]:  # a def endpoint: run in the threadpool
        return {**_subject_or_error(), "thread": threading.get_ident()}

    @api.get("/public-sync")
    def public_sync() -> dict[str, Any]:
        return _subject_or_error()

    @api.get("/public-async")
    async def public_async() -> dict[str, Any]:
        return _subject_or_error()

    @api.get("/plain")
    async def plain() -> dict[str, str]:
        return {"plain": "yes"}

    return api


@pytest.fixture(scope="module")
def fastapi_served(shared_auth: LocalAuthorizationServer) -> Iterator[Served]:
    calls: Counter[str] = Counter()
    with loopback_socket() as (sock, origin):
        app = DelegationMiddleware(
            fastapi_app(shared_auth, calls),
            issuer=shared_auth.issuer,
            resource=origin,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            public_paths=["/openapi.json", "/docs", "/public-sync", "/public-async"],
            allowed_resources=[GITHUB, SLACK],
            policy=lambda ctx, resource, scope: resource != SLACK,
            # One attempt: a 503 with Retry-After would otherwise be retried after a wait.
            exchange_attempts=1,
        )
        with running_on(app, sock, lifespan="on"):
            yield Served(origin, calls)


@pytest.fixture
async def fastapi_client(fastapi_served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fastapi_served.origin) as client:
        yield client


async def test_fastapi_delegated_grant_acts_as_the_caller(
    authz: LocalAuthorizationServer, fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    for user in ("alice", "bob"):
        token = authz.mint(user, audience=fastapi_served.origin)
        answer = await fastapi_client.get("/github", headers=bearer(token))
        assert answer.status_code == 200, answer.text
        # The exchanged token names the caller, is meant for GitHub and says who acts.
        assert answer.json() == {
            "resource": GITHUB,
            "sub": user,
            "aud": GITHUB,
            "act": {"sub": CLIENT_ID},
            "scope": None,
        }
        assert token not in answer.text


async def test_fastapi_access_context_dependency(
    authz: LocalAuthorizationServer, fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    token = authz.mint("alice", audience=fastapi_served.origin, scope="write read")
    answer = await fastapi_client.get("/me", headers=bearer(token))
    assert answer.json() == {
        "subject": "alice",
        "scopes": ["read", "write"],
        "current_is_ctx": True,
    }
    both = await fastapi_client.get("/both", headers=bearer(token))
    assert both.json() == {"subject": "alice", "resource": GITHUB}


async def test_fastapi_current_access_context_in_endpoint_and_dependencies(
    authz: LocalAuthorizationServer, fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    token = authz.mint("carol", audience=fastapi_served.origin)
    answer = (await fastapi_client.get("/current", headers=bearer(token))).json()
    assert answer["endpoint"] == answer["async_dependency"] == "carol"
    # The def dependency ran on a worker thread, and anyio copied the context there.
    assert answer["sync_dependency"] == "carol"
    assert answer["sync_dependency_thread"] != answer["thread"]


async def test_fastapi_current_access_context_in_sync_endpoint(
    authz: LocalAuthorizationServer, fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    loop_thread = (
        await fastapi_client.get(
            "/current", headers=bearer(authz.mint("x", audience=fastapi_served.origin))
        )
    ).json()["thread"]
    for user in ("alice", "bob"):
        token = authz.mint(user, audience=fastapi_served.origin)
        answer = (await fastapi_client.get("/current-sync", headers=bearer(token))).json()
        # anyio.to_thread.run_sync runs the endpoint in a copy of the request's context.
        assert answer["subject"] == user
        assert answer["thread"] != loop_thread
        # The worker thread keeps nothing: the next (public) request's endpoint sees no context.
        public = (await fastapi_client.get("/public-sync")).json()
        assert public == {"lookup_error": NO_CONTEXT}


async def test_fastapi_public_paths_carry_no_context(fastapi_client: httpx.AsyncClient) -> None:
    for path in ("/public-async", "/public-sync"):
        answer = await fastapi_client.get(path)
        assert answer.status_code == 200
        assert answer.json() == {"lookup_error": NO_CONTEXT}


async def test_fastapi_without_token_gets_the_middleware_401(
    fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    before = fastapi_served.calls.copy()
    for path in ("/github", "/me"):
        answer = await fastapi_client.get(path)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == (
            "Bearer resource_metadata="
            f'"{fastapi_served.origin}/.well-known/oauth-protected-resource"'
        )
        # The middleware's answer, not FastAPI's ({"detail": ...}).
        assert "detail" not in answer.text
    assert fastapi_served.calls == before  # no endpoint ran


async def test_fastapi_docs_are_public(fastapi_client: httpx.AsyncClient) -> None:
    docs = await fastapi_client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text
    assert "/openapi.json" in docs.text
    openapi = await fastapi_client.get("/openapi.json")
    assert openapi.status_code == 200
    # And nothing else is public because of them.
    assert (await fastapi_client.get("/docs/oauth2-redirect")).status_code == 401
    assert (await fastapi_client.get("/plain")).status_code == 401


async def test_fastapi_openapi_declares_the_bearer_scheme(
    fastapi_client: httpx.AsyncClient,
) -> None:
    document = (await fastapi_client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    assert list(schemes) == ["DelegatedBearer"]
    scheme = schemes["DelegatedBearer"]
    assert {k: scheme[k] for k in ("type", "scheme", "bearerFormat")} == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert "oauth-protected-resource" in scheme["description"]
    paths = document["paths"]
    for path in ("/github", "/github-admin", "/google", "/slack", "/me", "/both"):
        assert paths[path]["get"]["security"] == [{"DelegatedBearer": []}], path
    # Endpoints without the dependencies declare nothing (current_access_context() is invisible
    # to FastAPI, so /current and /current-sync do not either).
    for path in ("/plain", "/public-sync", "/public-async", "/current", "/current-sync"):
        assert "security" not in paths[path]["get"], path


# The failure table of asgi_delegation.fastapi: each case sets the authorization server up for
# ``token`` and names the endpoint, the status, the detail and the Retry-After header expected.


@dataclass
class Failure:
    setup: Callable[[LocalAuthorizationServer], None]
    path: str
    status: int
    error: str
    description: str | None
    resource: str = GITHUB
    retry_after: str | None = None


def scripted(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> Callable[[LocalAuthorizationServer], None]:
    def setup(auth: LocalAuthorizationServer) -> None:
        auth.token_answers.append(ScriptedAnswer(status, body, headers or {}))

    return setup


def _unconsented(auth: LocalAuthorizationServer) -> None:
    auth.unconsented.add(("alice", GITHUB))


def _not_a_dependency(auth: LocalAuthorizationServer) -> None:
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GOOGLE])


def _scope_not_grantable(auth: LocalAuthorizationServer) -> None:
    auth.grantable_scopes[GITHUB] = frozenset({"repo"})


def _secret_rotated(auth: LocalAuthorizationServer) -> None:
    auth.register_client(CLIENT_ID, secret="rotated at the authorization server")


def _audience_only(auth: LocalAuthorizationServer) -> None:
    auth.exchange_target = "audience"  # the middleware sends resource=


def _nothing(auth: LocalAuthorizationServer) -> None:
    pass


FAILURES = {
    # About the user: 403.
    "access_denied": Failure(
        _unconsented, "/github", 403, "access_denied", "the user has not consented to this resource"
    ),
    "invalid_grant": Failure(
        scripted(400, {"error": "invalid_grant", "error_description": "the token was revoked"}),
        "/github", 403, "invalid_grant", "the token was revoked",
    ),
    "invalid_target": Failure(
        _not_a_dependency, "/github", 403, "invalid_target",
        "the resource is not a dependency of the client",
    ),
    "invalid_scope": Failure(
        _scope_not_grantable, "/github-admin", 403, "invalid_scope",
        "the requested scope exceeds what may be granted",
    ),
    # About this server: 502.
    "invalid_client": Failure(
        _secret_rotated, "/github", 502, "invalid_client", "client authentication failed"
    ),
    "unauthorized_client": Failure(
        scripted(400, {"error": "unauthorized_client"}),
        "/github", 502, "unauthorized_client", None,
    ),
    "unsupported_grant_type": Failure(
        scripted(400, {"error": "unsupported_grant_type", "error_description": "no exchange"}),
        "/github", 502, "unsupported_grant_type", "no exchange",
    ),
    "invalid_request": Failure(
        _audience_only, "/github", 502, "invalid_request",
        "the resource parameter is not supported",
    ),
    # Refused here: 403.
    "not_allowed_resource": Failure(
        _nothing, "/google", 403, "not_allowed",
        "the resource is not one of the allowed_resources", resource=GOOGLE,
    ),
    "not_allowed_policy": Failure(
        _nothing, "/slack", 403, "not_allowed", "the application's policy refused",
        resource=SLACK,
    ),
    # Try again later: 503.
    "unavailable_retry_after": Failure(
        scripted(503, {"error": "temporarily_unavailable"}, {"retry-after": "7"}),
        "/github", 503, "temporarily_unavailable", "the token endpoint answered HTTP 503",
        retry_after="7",
    ),
    "unavailable_retry_after_0": Failure(
        scripted(503, b"", {"retry-after": "0"}),
        "/github", 503, "temporarily_unavailable", "the token endpoint answered HTTP 503",
        retry_after="1",  # never tell a client to retry at once
    ),
    "rate_limited_no_retry_after": Failure(
        scripted(429, {"error": "slow_down"}),
        "/github", 503, "temporarily_unavailable", "the token endpoint answered HTTP 429",
    ),
}  # fmt: skip


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
async def test_fastapi_failed_exchange_becomes_http_error(
    authz: LocalAuthorizationServer,
    fastapi_served: Served,
    fastapi_client: httpx.AsyncClient,
    failure: Failure,
) -> None:
    token = authz.mint("alice", audience=fastapi_served.origin)
    failure.setup(authz)
    answer = await fastapi_client.get(failure.path, headers=bearer(token))
    assert answer.status_code == failure.status, answer.text
    assert answer.json() == {
        "detail": {
            "error": failure.error,
            "error_description": failure.description,
            "resource": failure.resource,
        }
    }
    assert answer.headers.get("retry-after") == failure.retry_after
    assert not authz.token_answers  # a scripted answer was used, not left for the next test
    for secret in (token, JWT_PREFIX, CLIENT_SECRET):
        assert secret not in answer.text


async def test_fastapi_error_never_repeats_the_token_or_secret(
    authz: LocalAuthorizationServer, fastapi_served: Served, fastapi_client: httpx.AsyncClient
) -> None:
    # An authorization server echoing the subject token and the client secret in its error.
    token = authz.mint("alice", audience=fastapi_served.origin)
    description = f"subject_token={token} client_secret={CLIENT_SECRET} rejected"
    scripted(400, {"error": "invalid_grant", "error_description": description})(authz)
    answer = await fastapi_client.get("/github", headers=bearer(token))
    assert answer.status_code == 403
    shown = answer.json()["detail"]["error_description"]
    assert shown == "subject_token=[redacted] client_secret=[redacted] rejected"
    for secret in (token, JWT_PREFIX, CLIENT_SECRET):
        assert secret not in answer.text


# -- Quart --------------------------------------------------------------------------------------


def quart_app(auth: LocalAuthorizationServer) -> Quart:
    app = Quart(__name__)

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        ctx = current_access_context()
        return {
            "subject": ctx.subject,
            "scopes": sorted(ctx.scopes),
            "thread": threading.get_ident(),
        }

    @app.get("/whoami-sync")
    def whoami_sync() -> dict[str, Any]:  # Quart runs it in an executor
        return {**_subject_or_error(), "thread": threading.get_ident()}

    @app.get("/github")
    @grant(GITHUB)
    async def github() -> dict[str, Any]:
        upstream = current_access_context().access(GITHUB)  # raises a failed exchange
        claims = auth.verify(upstream.access_token) or {}
        return {"resource": upstream.resource, "sub": claims.get("sub"), "aud": claims.get("aud")}

    @app.get("/public")
    async def public() -> dict[str, Any]:
        return _subject_or_error()

    @app.errorhandler(ExchangeError)
    async def exchange_failed(exc: ExchangeError) -> tuple[dict[str, Any], int]:
        return {"error": exc.error, "resource": exc.resource}, 403

    return app


@pytest.fixture(scope="module")
def quart_origin(shared_auth: LocalAuthorizationServer) -> Iterator[str]:
    with loopback_socket() as (sock, origin):
        app = DelegationMiddleware(
            quart_app(shared_auth),
            issuer=shared_auth.issuer,
            resource=origin,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            public_paths=["/public"],
        )
        with running_on(app, sock, lifespan="on"):  # Quart needs its startup
            yield origin


async def test_quart_views_see_each_caller_in_turn(
    authz: LocalAuthorizationServer, quart_origin: str
) -> None:
    async with httpx.AsyncClient(base_url=quart_origin) as client:
        for user, scope in (("alice", "read"), ("bob", "read write"), ("alice", "write")):
            token = authz.mint(user, audience=quart_origin, scope=scope)
            me = (await client.get("/whoami", headers=bearer(token))).json()
            loop_thread = me.pop("thread")
            assert me == {"subject": user, "scopes": sorted(scope.split())}
            upstream = await client.get("/github", headers=bearer(token))
            assert upstream.json() == {"resource": GITHUB, "sub": user, "aud": GITHUB}
            sync = (await client.get("/whoami-sync", headers=bearer(token))).json()
            # Quart ran the def view in its executor, in a copy of the request's context.
            assert sync["subject"] == user
            assert sync["thread"] != loop_thread


async def test_quart_grant_failure_reaches_the_view(
    authz: LocalAuthorizationServer, quart_origin: str
) -> None:
    authz.unconsented.add(("bob", GITHUB))
    async with httpx.AsyncClient(base_url=quart_origin) as client:
        answer = await client.get(
            "/github", headers=bearer(authz.mint("bob", audience=quart_origin))
        )
    assert answer.status_code == 403
    assert answer.json() == {"error": "access_denied", "resource": GITHUB}


async def test_quart_without_token_and_public_path(quart_origin: str) -> None:
    async with httpx.AsyncClient(base_url=quart_origin) as client:
        refused = await client.get("/whoami")
        public = await client.get("/public")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer resource_metadata=")
    assert public.status_code == 200
    assert public.json() == {"lookup_error": NO_CONTEXT}


# -- a bare ASGI callable -----------------------------------------------------------------------


async def _send_json(send: Any, document: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


def raw_app() -> Any:
    """``/me``: the subject from the scope, from current_access_context(), from a task spawned
    and awaited in the request, and the client's port (the same port: the same connection).
    ``/spawn`` starts a task that waits for ``/collect`` to release it; ``/public`` says whether
    a context is there; ``/boom`` raises."""
    parked: list[tuple[asyncio.Event, asyncio.Task[dict[str, Any]]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("the application failed")
        if path == "/public":
            await _send_json(
                send,
                {**_subject_or_error(), "in_state": "access_context" in scope.get("state", {})},
            )
            return
        if path == "/spawn":
            gate = asyncio.Event()

            async def later() -> dict[str, Any]:
                await gate.wait()  # released by another request, after this one has ended
                return _subject_or_error()

            parked.append((gate, asyncio.create_task(later())))
            await _send_json(send, {"spawned": True})
            return
        if path == "/collect":
            gate, task = parked.pop()
            gate.set()
            await _send_json(send, {"task": await task, "request": _subject_or_error()})
            return
        ctx: AccessContext = scope["state"]["access_context"]

        async def in_task() -> dict[str, Any]:
            return _subject_or_error()

        await _send_json(
            send,
            {
                "state": ctx.subject,
                "current": current_access_context().subject,
                "same": current_access_context() is ctx,
                "task": (await asyncio.create_task(in_task())).get("subject"),
                "port": scope["client"][1],
            },
        )

    return app


@pytest.fixture(scope="module")
def raw_origin(shared_auth: LocalAuthorizationServer) -> Iterator[str]:
    with loopback_socket() as (sock, origin):
        app = DelegationMiddleware(
            raw_app(),
            issuer=shared_auth.issuer,
            resource=origin,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            public_paths=["/public"],
        )
        with running_on(app, sock, lifespan="on"):
            yield origin


async def test_raw_asgi_context_does_not_outlive_its_request_on_a_kept_alive_connection(
    authz: LocalAuthorizationServer, raw_origin: str
) -> None:
    # uvicorn runs each request in a task of its own, so this holds even without the
    # middleware's reset; test_context_var_is_reset_in_the_calling_task checks the reset itself.
    alice = authz.mint("alice", audience=raw_origin)
    bob = authz.mint("bob", audience=raw_origin)
    ports = set()
    async with httpx.AsyncClient(base_url=raw_origin) as client:
        for user, token in (("alice", alice), (None, None), ("bob", bob), ("alice", alice)):
            if user is None:  # between two users: a public request on the same connection
                public = await client.get("/public")
                assert public.json() == {"lookup_error": NO_CONTEXT, "in_state": False}
                continue
            assert token is not None
            answer = (await client.get("/me", headers=bearer(token))).json()
            ports.add(answer.pop("port"))
            assert answer == {"state": user, "current": user, "same": True, "task": user}
    assert len(ports) == 1  # one connection, kept alive, carried all of them


async def test_raw_asgi_spawned_task_keeps_the_context_it_started_with(
    authz: LocalAuthorizationServer, raw_origin: str
) -> None:
    async with httpx.AsyncClient(base_url=raw_origin) as client:
        spawned = await client.get(
            "/spawn", headers=bearer(authz.mint("alice", audience=raw_origin))
        )
        assert spawned.json() == {"spawned": True}
        # bob's request releases the task alice's request started: it still sees alice (the
        # context was copied when the task was created), while bob's request sees bob.
        collected = await client.get(
            "/collect", headers=bearer(authz.mint("bob", audience=raw_origin))
        )
    assert collected.json() == {"task": {"subject": "alice"}, "request": {"subject": "bob"}}


async def test_raw_asgi_without_token(raw_origin: str) -> None:
    async with httpx.AsyncClient(base_url=raw_origin) as client:
        answer = await client.get("/me")
    assert answer.status_code == 401


async def test_context_var_is_reset_in_the_calling_task(
    gateway_factory: Callable[..., Gateway], token: str
) -> None:
    # In process, the application runs in the test's own task: a context left set after the
    # middleware returned would be visible here.
    gateway = gateway_factory(app=raw_app())
    answer = await gateway.get(token, path="/me")
    assert answer.json()["current"] == "alice"
    with pytest.raises(LookupError, match="only while handling a request"):
        current_access_context()
    # Also when the application raises.
    with pytest.raises(RuntimeError, match="the application failed"):
        await gateway.get(token, path="/boom")
    with pytest.raises(LookupError, match="only while handling a request"):
        current_access_context()


# -- outside any request ------------------------------------------------------------------------


def test_current_access_context_outside_a_request() -> None:
    with pytest.raises(LookupError) as raised:
        current_access_context()
    assert str(raised.value) == NO_CONTEXT
    assert raised.value.__suppress_context__  # `from None`: no inner ContextVar noise


async def test_grant_outside_a_request() -> None:
    @grant(GITHUB)
    async def endpoint() -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(LookupError, match="@grant found no access context"):
        await endpoint()
