"""Several issuers: each token is checked with its own issuer's keys, audience and algorithms,
and exchanged at its own issuer's token endpoint with that issuer's client; configuration is
refused when it could mix them up."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_delegation import (
    AuthenticationEvent,
    ConfigurationError,
    DelegationMiddleware,
    ExchangeError,
    ExchangeEvent,
    Issuer,
)
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import BASE_URL, CLIENT_ID, CLIENT_SECRET, GITHUB, RESOURCE, audit_delivered

OTHER_CLIENT, OTHER_SECRET = "tools-at-b", "b-secret"


async def app(scope: Any, receive: Any, send: Any) -> None:
    """``/exchange?resource=R``: the grant's claims (verified by the issuer that signed it) or
    the error; any other path: who the caller is."""
    ctx = scope["state"]["access_context"]
    document: dict[str, Any] = {"subject": ctx.subject, "issuer": ctx.issuer}
    if scope["path"] == "/exchange":
        resource = dict(parse_qsl(scope["query_string"].decode()))["resource"]
        try:
            grant = await ctx.exchange(resource)
            document["grant"] = grant.access_token
        except ExchangeError as exc:
            document["error"] = {"class": type(exc).__name__, "description": str(exc)}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


@dataclass
class Two:
    a: LocalAuthorizationServer
    b: LocalAuthorizationServer


@pytest.fixture
async def two() -> AsyncIterator[Two]:
    a, b = LocalAuthorizationServer(), LocalAuthorizationServer(algorithm="ES256")
    a.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    b.register_client(OTHER_CLIENT, secret=OTHER_SECRET)
    async with a.serve(), b.serve():
        yield Two(a, b)


def middleware(two: Two, **options: Any) -> DelegationMiddleware:
    issuers = options.pop("issuers", None) or [
        Issuer(two.a.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET),
        Issuer(two.b.issuer, client_id=OTHER_CLIENT, client_secret=OTHER_SECRET),
    ]
    return DelegationMiddleware(app, issuers=issuers, resource=RESOURCE, **options)


@pytest.fixture
async def client(two: Two) -> AsyncIterator[httpx.AsyncClient]:
    wrapped = middleware(two)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url=BASE_URL
    ) as http:
        yield http
    await wrapped.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_each_issuer_vouches_for_its_own_tokens(two: Two, client: httpx.AsyncClient) -> None:
    for server in (two.a, two.b):
        answer = await client.get("/", headers=bearer(server.mint("alice", audience=RESOURCE)))
        assert answer.status_code == 200
        assert answer.json() == {"subject": "alice", "issuer": server.issuer}


async def test_a_token_naming_one_issuer_signed_by_another_is_refused(
    two: Two, client: httpx.AsyncClient
) -> None:
    forged = two.b.mint("alice", audience=RESOURCE, claims={"iss": two.a.issuer})
    answer = await client.get("/", headers=bearer(forged))
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


@pytest.mark.parametrize(
    "claims",
    [{"iss": "https://elsewhere.example"}, {"iss": 7}, {"iss": None}],
    ids=["unknown", "not-a-string", "null"],
)
async def test_a_token_naming_no_configured_issuer_fetches_nothing(
    two: Two, client: httpx.AsyncClient, claims: dict[str, Any]
) -> None:
    token = two.a.mint("alice", audience=RESOURCE, claims=claims)
    answer = await client.get("/", headers=bearer(token))
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert two.a.requests == {}
    assert two.b.requests == {}


async def test_an_issuer_named_with_a_trailing_slash_is_another_issuer(
    two: Two, client: httpx.AsyncClient
) -> None:
    token = two.a.mint("alice", audience=RESOURCE, claims={"iss": two.a.issuer + "/"})
    assert (await client.get("/", headers=bearer(token))).status_code == 401
    assert two.a.requests == {}


async def test_each_issuer_has_its_own_audience(two: Two) -> None:
    wrapped = middleware(
        two,
        issuers=[
            Issuer(two.a.issuer),
            Issuer(two.b.issuer, audience="api://tools", algorithms=["ES256"]),
        ],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url=BASE_URL
    ) as http:
        for server, audience, status in [
            (two.a, RESOURCE, 200),
            (two.a, "api://tools", 401),
            (two.b, "api://tools", 200),
            (two.b, RESOURCE, 401),
        ]:
            token = server.mint("alice", audience=audience)
            assert (await http.get("/", headers=bearer(token))).status_code == status
    await wrapped.aclose()


async def test_exchanges_go_to_the_callers_issuer_with_its_client(
    two: Two, client: httpx.AsyncClient
) -> None:
    grants = {}
    for server in (two.a, two.b):
        token = server.mint("alice", audience=RESOURCE)
        answer = await client.get("/exchange", params={"resource": GITHUB}, headers=bearer(token))
        grants[server.issuer] = answer.json()["grant"]
    # Same subject, same resource, two issuers: two grants, each from its own issuer.
    claims_a, claims_b = two.a.verify(grants[two.a.issuer]), two.b.verify(grants[two.b.issuer])
    assert claims_a is not None
    assert claims_a["act"] == {"sub": CLIENT_ID}
    assert claims_b is not None
    assert claims_b["act"] == {"sub": OTHER_CLIENT}
    assert two.a.verify(grants[two.b.issuer]) is None
    assert two.a.requests.get("/token") == 1
    assert two.b.requests.get("/token") == 1


async def test_an_issuer_without_credentials_cannot_exchange(two: Two) -> None:
    wrapped = middleware(
        two,
        issuers=[
            Issuer(two.a.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET),
            Issuer(two.b.issuer),
        ],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url=BASE_URL
    ) as http:
        token = two.b.mint("alice", audience=RESOURCE)
        answer = await http.get("/exchange", params={"resource": GITHUB}, headers=bearer(token))
    await wrapped.aclose()
    error = answer.json()["error"]
    assert error["class"] == "ExchangeNotAllowed"
    assert (
        f"no client credentials are configured for the issuer {two.b.issuer}"
        in (error["description"])
    )
    assert "/token" not in two.b.requests


async def test_the_metadata_names_every_issuer_in_order(two: Two) -> None:
    wrapped = middleware(two)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url=BASE_URL
    ) as http:
        document = (await http.get("/.well-known/oauth-protected-resource/mcp")).json()
    await wrapped.aclose()
    assert document["authorization_servers"] == [two.a.issuer, two.b.issuer]


async def test_audit_events_name_the_issuer_and_how_the_token_was_verified(two: Two) -> None:
    events: list[Any] = []
    wrapped = middleware(two, on_audit=events.append)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url=BASE_URL
    ) as http:
        token = two.b.mint("alice", audience=RESOURCE)
        await http.get("/exchange", params={"resource": GITHUB}, headers=bearer(token))
        await audit_delivered(wrapped)
    await wrapped.aclose()
    [accepted] = [e for e in events if isinstance(e, AuthenticationEvent)]
    assert (accepted.issuer, accepted.verified_by) == (two.b.issuer, "jwt")
    [exchanged] = [e for e in events if isinstance(e, ExchangeEvent)]
    assert exchanged.issuer == two.b.issuer


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"issuer": "https://a.example", "issuers": [Issuer("https://b.example")]},
         "mutually exclusive"),
        ({}, "issuer \\(or issuers\\) is required"),
        ({"issuers": []}, "non-empty list of Issuer"),
        ({"issuers": Issuer("https://a.example")}, "must be a list of Issuer"),
        ({"issuers": ["https://a.example"]}, "non-empty list of Issuer"),
        ({"issuers": [Issuer("https://a.example"), Issuer("https://a.example")]},
         "the same issuer twice"),
        ({"issuers": [Issuer("https://a.example"), Issuer("https://b.example")],
          "audience": "api://x"}, "audience belong in each Issuer"),
        ({"issuers": [Issuer("https://a.example")], "client_id": "x", "jwks_uri":
          "https://a.example/jwks"}, "jwks_uri, client_id belong in each Issuer"),
        ({"issuers": [Issuer("https://a.example")], "exchange_target": "audience"},
         "exchange_target belong"),
        ({"issuers": [Issuer("https://a.example")], "introspection": True},
         "introspection belong"),
        ({"issuers": [
            Issuer("https://a.example", introspection=True, client_id="c", client_secret="s"),
            Issuer("https://b.example", introspection=True, client_id="c", client_secret="s"),
        ]}, "at most one issuer may have introspection=True"),
    ],
)  # fmt: skip
def test_configuration_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DelegationMiddleware(app, resource=RESOURCE, **options)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"issuer": "http://as.example"}, "must use https://"),
        ({"issuer": "https://as.example?x=1"}, "must not have a query"),
        ({"algorithms": ["HS256"]}, "is not accepted"),
        ({"audience": []}, "audience must be a non-empty"),
        ({"exchange_target": "both-ways"}, "exchange_target must be one of"),
        ({"introspection": True}, "needs client credentials"),
        ({"introspect_jwts": True}, "needs client credentials"),
        ({"introspection": "yes"}, "must be booleans"),
        ({"client_secret": "s"}, "without a client_id"),
        ({"introspection_endpoint": "http://as.example/introspect"}, "must use https://"),
    ],
)
def test_issuer_configuration_errors(arguments: dict[str, Any], message: str) -> None:
    arguments = {"issuer": "https://as.example", **arguments}
    with pytest.raises(ConfigurationError, match=message):
        Issuer(**arguments)


def test_an_issuer_shows_no_secret() -> None:
    config = Issuer("https://as.example", client_id="tools", client_secret="hunter2-secret")
    assert repr(config) == "Issuer('https://as.example', client_id='tools')"
    assert config.client_id == "tools"


def test_the_environment_serves_the_single_issuer_form_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYCARD_CLIENT_ID", "from-env")
    monkeypatch.setenv("KEYCARD_CLIENT_SECRET", "env-secret")
    single = DelegationMiddleware(app, issuer="https://a.example", resource=RESOURCE)
    assert single._trusts["https://a.example"].exchanger._client_auth is not None
    several = DelegationMiddleware(app, issuers=[Issuer("https://a.example")], resource=RESOURCE)
    assert several._trusts["https://a.example"].exchanger._client_auth is None


# -- interleavings -----------------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    calls=st.lists(
        st.tuples(st.sampled_from("ab"), st.sampled_from(["alice", "bob"]), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
async def test_a_grant_is_never_served_to_a_caller_of_another_issuer(
    two: Two, client: httpx.AsyncClient, calls: list[tuple[str, str, bool]]
) -> None:
    for which, subject, exchange in calls:
        server = two.a if which == "a" else two.b
        token = server.mint(subject, audience=RESOURCE)
        path = "/exchange" if exchange else "/"
        answer = await client.get(path, params={"resource": GITHUB}, headers=bearer(token))
        document = answer.json()
        assert (document["subject"], document["issuer"]) == (subject, server.issuer)
        if exchange:
            claims = server.verify(document["grant"])  # issued by the caller's own issuer
            assert claims is not None
            assert (claims["sub"], claims["aud"]) == (subject, GITHUB)
