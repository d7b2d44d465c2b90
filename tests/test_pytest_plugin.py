"""The pytest plugin (``asgi_delegation.testing.pytest_plugin``), used as a user would: a test
file run by pytest's own ``pytester``, picking the fixtures up from the installed entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
import asyncio
import json

import httpx
import pytest

from asgi_delegation import ExchangeDenied

UPSTREAM = "https://api.example.com"


async def app(scope, receive, send):
    """Says who called, and exchanges the caller's token for UPSTREAM."""
    ctx = scope["state"]["access_context"]
    grant = await ctx.exchange(UPSTREAM)
    document = {"sub": ctx.subject, "scopes": sorted(ctx.scopes), "grant": grant.access_token}
    body = json.dumps(document)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})


async def get(middleware, token=None, path="/mcp"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        return await c.get(path, headers=headers)


def test_server_and_client(delegation_auth_server, delegation_client, delegation_resource):
    assert delegation_resource == "http://127.0.0.1:8000/mcp"
    assert delegation_auth_server.issuer.startswith("http://127.0.0.1:")
    assert delegation_client.client_id == "test-client"
    assert len(delegation_client.secret) >= 20
    assert delegation_auth_server.clients["test-client"] is delegation_client
    metadata = httpx.get(
        delegation_auth_server.issuer + "/.well-known/oauth-authorization-server"
    ).json()  # served on a real loopback port
    assert metadata["token_endpoint"] == delegation_auth_server.token_endpoint


def test_token_validates_and_exchanges(
    delegation_middleware, delegation_token, delegation_auth_server
):
    middleware = delegation_middleware(app, required_scopes=["read"])
    answer = asyncio.run(get(middleware, delegation_token("alice", scope="read write")))
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert (document["sub"], document["scopes"]) == ("alice", ["read", "write"])
    upstream = delegation_auth_server.verify(document["grant"])
    assert (upstream["sub"], upstream["aud"]) == ("alice", UPSTREAM)
    assert upstream["act"] == {"sub": "test-client"}

    assert asyncio.run(get(middleware)).status_code == 401
    assert asyncio.run(get(middleware, delegation_token("alice"))).status_code == 403
    expired = delegation_token("alice", scope="read", expires_in=-600)
    assert asyncio.run(get(middleware, expired)).status_code == 401
    elsewhere = delegation_token("alice", scope="read", audience="https://elsewhere.example")
    assert asyncio.run(get(middleware, elsewhere)).status_code == 401
    metadata = asyncio.run(get(middleware, path="/.well-known/oauth-protected-resource/mcp"))
    assert metadata.json()["authorization_servers"] == [delegation_auth_server.issuer]


def test_over_the_loopback_port(delegation_middleware, delegation_token, delegation_auth_server):
    async def scenario():
        middleware = delegation_middleware(app, http_client=None)  # its own client
        try:
            return await get(middleware, delegation_token("bob"))
        finally:
            await middleware.aclose()

    answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    assert answer.json()["sub"] == "bob"
    assert delegation_auth_server.requests["/jwks"] == 1


def test_options_override(
    delegation_middleware, delegation_token, delegation_client, delegation_auth_server
):
    delegation_client.allowed_resources = frozenset({"https://only.example.com"})
    middleware = delegation_middleware(app, client_auth="client_secret_post")
    with pytest.raises(ExchangeDenied) as refused:
        asyncio.run(get(middleware, delegation_token()))
    assert refused.value.error == "invalid_target"
    assert delegation_auth_server.exchanges[-1]["client_secret"] == delegation_client.secret


def test_two_issuers(
    delegation_auth_servers, delegation_auth_server, delegation_client, delegation_resource
):
    first, second = delegation_auth_servers
    assert first is delegation_auth_server
    assert second.issuer.startswith("http://127.0.0.1:")
    assert first.issuer != second.issuer
    assert first.kid != second.kid
    registered = second.clients["test-client"]
    assert registered is not delegation_client
    assert registered.secret == delegation_client.secret

    credentials = (delegation_client.client_id, delegation_client.secret)
    for server, other in ((first, second), (second, first)):
        metadata = httpx.get(server.issuer + "/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == server.issuer  # each served on a loopback port of its own
        token = server.mint("alice", audience=delegation_resource)
        assert server.verify(token)["sub"] == "alice"
        assert other.verify(token) is None  # keys of its own
        opaque = server.mint_opaque("alice")
        mine = httpx.post(server.introspection_endpoint, data={"token": opaque}, auth=credentials)
        theirs = httpx.post(other.introspection_endpoint, data={"token": opaque}, auth=credentials)
        assert mine.json()["iss"] == server.issuer
        assert theirs.json() == {"active": False}  # the same credentials are good at both


class TestOwnResource:
    @pytest.fixture
    def delegation_resource(self):
        return "https://tools.example.com/mcp"

    def test_tokens_and_middleware_follow_it(self, delegation_middleware, delegation_token):
        middleware = delegation_middleware(app)
        answer = asyncio.run(get(middleware, delegation_token("carol")))
        assert answer.json()["sub"] == "carol"


@pytest.mark.anyio
async def test_in_an_async_test(delegation_middleware, delegation_token):
    answer = await get(delegation_middleware(app), delegation_token("dave"))
    assert answer.json()["sub"] == "dave"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.asyncio
async def test_with_pytest_asyncio(delegation_middleware, delegation_token):
    answer = await get(delegation_middleware(app), delegation_token("erin"))
    assert answer.json()["sub"] == "erin"
'''

# Strict, as a careful user's project would be. (pytest-asyncio, a test dependency of this
# package, warns without a default loop scope.)
USER_INI = """
[pytest]
filterwarnings = error
asyncio_default_fixture_loop_scope = function
"""


def test_entry_point_is_registered() -> None:
    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "asgi_delegation"]
    assert plugin.value == "asgi_delegation.testing.pytest_plugin"


def test_user_tests_pass_with_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeini(USER_INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)


def test_fixtures_are_listed(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*fixtures defined from asgi_delegation.testing.pytest_plugin*",
            "delegation_*",
        ]
    )
    for name in ("resource", "auth_server", "auth_servers", "client", "token", "middleware"):
        assert f"delegation_{name} -- " in result.stdout.str()


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_uses_it(delegation_token):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:asgi_delegation", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'delegation_token' not found*"])
