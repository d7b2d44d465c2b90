"""Opaque tokens through the middleware: introspected (RFC 7662) at the one issuer that takes
them, cached, refused without a request when they cannot be a token, and never a 401 for the
authorization server's own trouble. Also ``introspect_jwts``, which fails closed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from asgi_delegation import AuthenticationEvent, DelegationMiddleware, Issuer
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import (
    BASE_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    RESOURCE,
    Clock,
    Gateway,
    audit_delivered,
    exchanging_app,
)

GatewayFactory = Callable[..., Gateway]


def introspections(auth: LocalAuthorizationServer) -> int:
    return sum(n for path, n in auth.requests.items() if path.endswith("/introspect"))


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return gateway_factory(introspection=True)


async def test_an_opaque_token_is_introspected_once_then_cached(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    token = auth.mint_opaque("alice", audience=RESOURCE, scope="read")
    for _ in range(3):
        answer = await gateway.get(token)
        assert answer.status_code == 200
        assert answer.json()["subject"] == "alice"
        assert answer.json()["scopes"] == ["read"]
    assert introspections(auth) == 1
    assert auth.introspections[0]["token_type_hint"] == "access_token"


async def test_an_opaque_token_exchanges_like_a_jwt(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    token = auth.mint_opaque("alice", audience=RESOURCE)
    [grant] = (await gateway.exchange(token, GITHUB))["grants"]
    assert (grant["sub"], grant["aud"]) == ("alice", GITHUB)


async def test_the_audit_trail_says_how_the_token_was_verified(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    events: list[Any] = []
    gateway = gateway_factory(introspection=True, on_audit=events.append)
    assert (await gateway.get(auth.mint_opaque("alice", audience=RESOURCE))).status_code == 200
    await audit_delivered(gateway.middleware)
    [accepted] = [e for e in events if isinstance(e, AuthenticationEvent)]
    assert (accepted.issuer, accepted.verified_by) == (auth.issuer, "introspection")
    fetched = [e for e in events if getattr(e, "document", None) == "introspection"]
    assert [(e.method, e.outcome) for e in fetched] == [("POST", "ok")]


async def test_a_revoked_token_is_refused_once_its_cached_answer_is_too_old(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Clock
) -> None:
    token = auth.mint_opaque("alice", audience=RESOURCE, expires_in=3600)
    assert (await gateway.get(token)).status_code == 200
    auth.revoke(token)
    assert (await gateway.get(token)).status_code == 200  # within introspection_cache_ttl
    clock.advance(61)
    answer = await gateway.get(token)
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


async def test_an_inactive_token_replayed_costs_one_introspection(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    for _ in range(5):
        answer = await gateway.get("unknown-opaque-token-0123456789")
        assert answer.status_code == 401
        assert "not active" in answer.headers["www-authenticate"]
    assert introspections(auth) == 1


@pytest.mark.parametrize(
    "token",
    ["not$a$b64token", "a,b", "x" * (16 * 1024 + 1), "tok=en"],
    ids=["dollars", "comma", "too-long", "padding-inside"],
)
async def test_what_cannot_be_a_token_is_refused_without_a_request(
    gateway: Gateway, auth: LocalAuthorizationServer, token: str
) -> None:
    answer = await gateway.get(token)
    assert answer.status_code == 401
    assert introspections(auth) == 0


async def test_without_an_introspecting_issuer_opaque_tokens_go_nowhere(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory()
    answer = await gateway.get(auth.mint_opaque("alice", audience=RESOURCE))
    assert answer.status_code == 401
    assert (
        'error_description="The access token is malformed"' in (answer.headers["www-authenticate"])
    )
    assert auth.requests == {}


@pytest.mark.parametrize(
    "scripted",
    [
        ScriptedAnswer(503, b'{"error": "temporarily_unavailable"}'),
        ScriptedAnswer(401, b'{"error": "invalid_client"}'),
        ScriptedAnswer(200, b"<html>maintenance</html>"),
        ScriptedAnswer(200, b'{"active": "yes"}'),
        ScriptedAnswer(drop=True),
    ],
    ids=["5xx", "our-credentials-refused", "not-json", "active-not-a-boolean", "dropped"],
)
async def test_the_servers_trouble_is_503_and_cached_tokens_keep_working(
    gateway: Gateway, auth: LocalAuthorizationServer, scripted: ScriptedAnswer
) -> None:
    known = auth.mint_opaque("alice", audience=RESOURCE)
    assert (await gateway.get(known)).status_code == 200
    auth.introspection_answers.append(scripted)
    answer = await gateway.get(auth.mint_opaque("bob", audience=RESOURCE))
    assert answer.status_code == 503
    assert int(answer.headers["retry-after"]) >= 1
    assert (await gateway.get(known)).status_code == 200


async def test_an_introspection_answer_for_another_audience_is_refused(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    answer = await gateway.get(auth.mint_opaque("alice", audience="https://other.example"))
    assert answer.status_code == 401


# -- introspect_jwts -----------------------------------------------------------------------------


async def test_introspect_jwts_honours_revocation(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer, clock: Clock
) -> None:
    gateway = gateway_factory(introspect_jwts=True)
    token = auth.mint("alice", audience=RESOURCE, expires_in=3600)
    assert (await gateway.get(token)).status_code == 200
    assert introspections(auth) == 1
    auth.revoke(token)
    clock.advance(61)
    assert (await gateway.get(token)).status_code == 401


async def test_introspect_jwts_fails_closed(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(introspect_jwts=True)
    auth.introspection_answers.append(ScriptedAnswer(503, b"{}"))
    answer = await gateway.get(auth.mint("alice", audience=RESOURCE))
    assert answer.status_code == 503  # not 200 on the JWT alone


async def test_a_jwt_that_does_not_verify_is_never_introspected(
    gateway_factory: GatewayFactory, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(introspect_jwts=True, introspection=True)
    token = auth.mint("alice", audience="https://other.example")
    assert (await gateway.get(token)).status_code == 401
    assert introspections(auth) == 0


# -- several issuers -----------------------------------------------------------------------------


async def test_an_opaque_token_goes_only_to_the_issuer_that_takes_them(
    auth: LocalAuthorizationServer,
) -> None:
    other = LocalAuthorizationServer(algorithm="ES256")
    other.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    async with auth.serve(), other.serve():
        middleware = DelegationMiddleware(
            exchanging_app(auth),
            resource=RESOURCE,
            issuers=[
                Issuer(auth.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET),
                Issuer(other.issuer, introspection=True, client_id=CLIENT_ID,
                       client_secret=CLIENT_SECRET),
            ],
        )  # fmt: skip
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=middleware), base_url=BASE_URL
        ) as http:
            ours = other.mint_opaque("alice", audience=RESOURCE)
            theirs = auth.mint_opaque("bob", audience=RESOURCE)
            assert (await http.get("/", headers={"authorization": f"Bearer {ours}"})).json()[
                "subject"
            ] == "alice"
            refused = await http.get("/", headers={"authorization": f"Bearer {theirs}"})
            assert refused.status_code == 401
        await middleware.aclose()
    assert introspections(auth) == 0
    assert introspections(other) == 2


async def test_no_opaque_token_or_secret_reaches_a_log_an_event_or_an_answer(
    gateway_factory: GatewayFactory,
    auth: LocalAuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[Any] = []
    gateway = gateway_factory(introspection=True, on_audit=events.append)
    caplog.set_level(logging.DEBUG)
    good = auth.mint_opaque("alice", audience=RESOURCE)
    bad = "opaque-" + "x" * 40
    leaked = [good, bad, CLIENT_SECRET]
    # Answers that quote the token back, in every shape the introspector refuses.
    for scripted in (
        ScriptedAnswer(500, f'{{"error": "boom {bad}"}}'.encode()),
        ScriptedAnswer(200, f'{{"active": "{bad}"}}'.encode()),
        ScriptedAnswer(302, b"", {"location": f"https://x.example/?t={bad}"}),
        ScriptedAnswer(200, f'{{"active": true, "sub": 7, "note": "{bad}"}}'.encode()),
    ):
        auth.introspection_answers.append(scripted)
        answer = await gateway.get(bad)
        assert answer.status_code == 503
        assert not any(secret in answer.text + str(answer.headers) for secret in leaked)
    for token in (good, bad):
        answer = await gateway.get(token)
        assert not any(secret in answer.text + str(answer.headers) for secret in leaked)
    assert (await gateway.exchange(good, GITHUB))["grants"]
    await audit_delivered(gateway.middleware)
    written = "\n".join(
        [r.getMessage() + repr(getattr(r, "audit", "")) for r in caplog.records]
        + [repr(event) for event in events]
        + [repr(gateway.middleware._trusts[auth.issuer]._introspector)]
    )
    assert events
    assert not any(secret in written for secret in leaked)
