"""LocalAuthorizationServer's opaque access tokens and RFC 7662 introspection endpoint, as the
tests of an application behind an issuer of opaque tokens will rely on them."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote_plus

import anyio
import httpx
import pytest
from joserfc.jwk import ECKey

from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

CLIENT_ID = "resource-server"
SECRET = "intr0spect:s3cr+t/=%"
#: client_secret_basic form-encodes both (RFC 6749 2.3.1), which changes this secret.
BASIC = (quote_plus(CLIENT_ID), quote_plus(SECRET))
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: RFC 6750 2.1 b64token.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass
class Served:
    auth: LocalAuthorizationServer
    http: httpx.AsyncClient
    key: ECKey

    async def introspect(self, token: str, **form: str) -> httpx.Response:
        return await self.http.post(
            self.auth.introspection_endpoint,
            data={"token": token, **form},
            auth=BASIC,
        )

    def assertion(self, audience: str) -> str:
        now = int(time.time())
        claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": audience,
                  "jti": uuid.uuid4().hex, "iat": now, "exp": now + 60}  # fmt: skip
        return LocalAuthorizationServer.sign(
            {"alg": "ES256", "kid": self.key.kid}, claims, self.key
        )


def _server() -> tuple[LocalAuthorizationServer, ECKey]:
    auth = LocalAuthorizationServer()
    key = ECKey.generate_key("P-256", parameters={"kid": "rs-key"})
    auth.register_client(CLIENT_ID, secret=SECRET, public_key=key)
    return auth, key


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """The server on a loopback port, and a client that reaches it over real HTTP."""
    auth, key = _server()
    async with auth.serve(), httpx.AsyncClient() as http:
        yield Served(auth, http, key)


@pytest.fixture
async def in_process() -> AsyncIterator[Served]:
    auth, key = _server()
    async with auth.http_client() as http:
        yield Served(auth, http, key)


def test_mint_opaque_remembers_its_claims() -> None:
    auth = LocalAuthorizationServer("https://as.example/tenant")
    token = auth.mint_opaque("bob", audience=["a", "b"], scope=["read", "write"])
    plain = auth.mint_opaque()
    for opaque in (token, plain):
        assert B64TOKEN.fullmatch(opaque)
        assert "." not in opaque  # never mistaken for a JWT
        assert len(opaque) >= 40
    assert token != plain
    claims = auth.introspect(token)
    assert claims is not None
    assert claims == {
        "iss": "https://as.example/tenant",
        "sub": "bob",
        "aud": ["a", "b"],
        "scope": "read write",
        "client_id": "local-client",
        "iat": claims["iat"],
        "exp": claims["iat"] + 300,
    }
    assert abs(claims["iat"] - time.time()) < 5
    plain_claims = auth.introspect(plain)
    assert plain_claims is not None
    assert plain_claims["sub"] == "user"
    assert "aud" not in plain_claims
    assert "scope" not in plain_claims
    assert auth.introspect("never-minted") is None
    assert auth.verify(token) is None  # not a JWT


def test_mint_opaque_claims_may_be_anything_and_omit_drops_them() -> None:
    auth = LocalAuthorizationServer()
    odd = auth.mint_opaque(
        "carol",
        claims={"exp": "soon", "sub": None, "active": "yes", "cnf": {"jkt": "x"}},
        omit=["iat", "client_id", "missing"],
    )
    # exp is not a number, so nothing says the token expired: it is answered as it is.
    assert auth.introspect(odd) == {
        "iss": auth.issuer, "sub": None, "exp": "soon", "active": "yes", "cnf": {"jkt": "x"},
    }  # fmt: skip
    # Nor is a boolean, although Python would take True for 1 (1970).
    assert auth.introspect(auth.mint_opaque(claims={"exp": True}))["exp"] is True  # type: ignore[index]
    forever = auth.mint_opaque(omit=["exp"])
    assert "exp" not in auth.introspect(forever)  # type: ignore[operator]
    assert auth.introspect(auth.mint_opaque(expires_in=-1)) is None
    assert auth.introspect(auth.mint_opaque(claims={"exp": time.time() - 1})) is None


def test_revoke_makes_opaque_tokens_and_jwts_inactive() -> None:
    auth = LocalAuthorizationServer()
    opaque, jwt, kept = auth.mint_opaque(), auth.mint(), auth.mint_opaque()
    assert auth.introspect(jwt) == auth.verify(jwt) is not None
    auth.revoke(opaque)
    auth.revoke(jwt)
    auth.revoke("never-minted")  # as RFC 7009 has it, revoking an unknown token is no error
    assert auth.introspect(opaque) is None
    assert auth.introspect(jwt) is None
    assert auth.verify(jwt) is None
    assert auth.introspect(kept) is not None


def test_metadata_names_the_introspection_endpoint() -> None:
    auth = LocalAuthorizationServer("http://127.0.0.1/realm")
    metadata = auth.metadata()
    assert metadata["introspection_endpoint"] == auth.introspection_endpoint
    assert auth.introspection_endpoint == "http://127.0.0.1/realm/introspect"
    assert metadata["introspection_endpoint_auth_methods_supported"] == [
        "client_secret_basic", "client_secret_post", "private_key_jwt",
    ]  # fmt: skip


async def test_introspection_over_loopback(served: Served) -> None:
    auth = served.auth
    assert auth.introspection_endpoint == auth.issuer + "/introspect"  # follows the port
    discovered = await served.http.get(auth.issuer + "/.well-known/oauth-authorization-server")
    assert discovered.json()["introspection_endpoint"] == auth.introspection_endpoint

    opaque = auth.mint_opaque("alice", audience="https://rs.example", scope="read")
    active = await served.introspect(opaque, token_type_hint="access_token")
    assert active.status_code == 200
    assert active.headers["content-type"] == "application/json"
    assert active.headers["cache-control"] == "no-store"
    assert active.json() == {"active": True, **auth.introspect(opaque)}  # type: ignore[dict-item]
    assert active.json()["sub"] == "alice"
    assert auth.introspections[-1]["token_type_hint"] == "access_token"

    # Claims go over "active" too: a test may have the server answer a malformed one.
    malformed = await served.introspect(auth.mint_opaque(claims={"active": "yes"}))
    assert malformed.json()["active"] == "yes"

    # JWTs it minted itself, so that a resource server that introspects JWTs can be tested.
    jwt = auth.mint("bob", audience="https://rs.example")
    answer = (await served.introspect(jwt, token_type_hint="refresh_token")).json()
    assert (answer["active"], answer["sub"], answer["iss"]) == (True, "bob", auth.issuer)

    other = LocalAuthorizationServer(auth.issuer)
    inactive = {
        "unknown": "never-minted",
        "expired opaque": auth.mint_opaque(expires_in=-1),
        "expired jwt": auth.mint(expires_in=-1),
        "another server's jwt": other.mint(),
        "another server's opaque token": other.mint_opaque(),
        "revoked opaque": auth.mint_opaque(),
        "revoked jwt": auth.mint(),
    }
    auth.revoke(inactive["revoked opaque"])
    auth.revoke(inactive["revoked jwt"])
    for token in inactive.values():
        response = await served.introspect(token)
        assert (response.status_code, response.json()) == (200, {"active": False})
    assert (await served.introspect(opaque)).json()["active"] is True


async def test_introspection_authenticates_the_client(served: Served) -> None:
    auth, http, url = served.auth, served.http, served.auth.introspection_endpoint
    opaque = auth.mint_opaque("alice")
    post = await http.post(
        url, data={"token": opaque, "client_id": CLIENT_ID, "client_secret": SECRET}
    )
    assertion = served.assertion(url)
    signed = {"token": opaque, "client_assertion": assertion, "client_assertion_type": JWT_BEARER}
    private_key_jwt = await http.post(url, data=signed)
    for_issuer = await http.post(
        url, data={**signed, "client_assertion": served.assertion(auth.issuer)}
    )
    for accepted in (post, private_key_jwt, for_issuer):
        assert (accepted.status_code, accepted.json()["sub"]) == (200, "alice")

    refused = {
        "no authentication": await http.post(url, data={"token": opaque}),
        "wrong secret": await http.post(url, data={"token": opaque}, auth=(CLIENT_ID, "wrong")),
        "unknown client": await http.post(url, data={"token": opaque}, auth=("nobody", BASIC[1])),
        "two methods": await http.post(
            url, data={"token": opaque, "client_secret": SECRET}, auth=BASIC
        ),
        "replayed assertion": await http.post(url, data=signed),
        # RFC 7523: an assertion is meant for the endpoint it is sent to.
        "assertion for the token endpoint": await http.post(
            url, data={**signed, "client_assertion": served.assertion(auth.token_endpoint)}
        ),
    }
    for name, response in refused.items():
        assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), name
        assert response.headers["www-authenticate"] == 'Basic realm="introspect"'
        assert "active" not in response.json()
    # And the other way round at the token endpoint.
    grant = {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER}
    meant = served.assertion(auth.token_endpoint)
    at_token = await http.post(auth.token_endpoint, data={**grant, "client_assertion": meant})
    misdirected = await http.post(
        auth.token_endpoint, data={**grant, "client_assertion": served.assertion(url)}
    )
    assert at_token.status_code == 200, at_token.text
    assert (misdirected.status_code, misdirected.json()["error"]) == (401, "invalid_client")
    assert misdirected.headers["www-authenticate"] == 'Basic realm="token"'

    missing = await http.post(url, data={"token_type_hint": "access_token"}, auth=BASIC)
    twice = await http.post(
        url, content=f"token={opaque}&token=x".encode(), auth=BASIC,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    get = await http.get(url, params={"token": opaque}, auth=BASIC)
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    assert (twice.status_code, twice.json()["error"]) == (400, "invalid_request")
    assert (get.status_code, get.headers["allow"]) == (405, "POST")


async def test_scripted_introspection_answers_then_back_to_normal(served: Served) -> None:
    auth = served.auth
    opaque = auth.mint_opaque()
    auth.token_answers.append(ScriptedAnswer(503))  # the token endpoint's, not given here
    auth.introspection_answers += [
        ScriptedAnswer(200, b'{"active": "maybe"', {"content-type": "text/plain", "x-n": "1"}),
        ScriptedAnswer(500, {"error": "server_error"}),
    ]
    first, second, third = [await served.introspect(opaque) for _ in range(3)]
    assert (first.status_code, first.content) == (200, b'{"active": "maybe"')
    assert (first.headers["content-type"], first.headers["x-n"]) == ("text/plain", "1")
    assert (second.status_code, second.json()) == (500, {"error": "server_error"})
    assert (third.status_code, third.json()["active"]) == (200, True)
    assert auth.introspection_answers == []
    assert len(auth.token_answers) == 1
    # Scripted answers are given before the request is looked at, as the token endpoint's are.
    assert len(auth.introspections) == 1
    assert auth.requests["/introspect"] == 3
    assert auth.requests["/token"] == 0

    auth.fail_status = 503
    failing = await served.introspect(opaque)
    assert (failing.status_code, failing.json()["error"]) == (503, "temporarily_unavailable")


async def test_introspection_latency_and_peak(in_process: Served) -> None:
    auth = in_process.auth
    opaque = auth.mint_opaque()
    answers: list[httpx.Response] = []

    async def introspect() -> None:
        answers.append(await in_process.introspect(opaque))

    async def burst() -> None:
        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(introspect)

    await burst()
    assert auth.introspection_requests_peak == 1  # no latency: each is done before the next
    auth.introspection_latency = 0.2
    started = time.monotonic()
    await burst()
    assert time.monotonic() - started > 0.15  # held, with a margin for the clock
    assert auth.introspection_requests_peak == 3  # all three were held at once
    assert auth.introspection_requests_in_flight == 0
    assert auth.token_requests_peak == 0  # counted apart from the token endpoint's
    assert [a.json()["active"] for a in answers] == [True] * 6
    assert auth.requests["/introspect"] == 6


async def test_exchanges_take_opaque_subject_tokens(in_process: Served) -> None:
    auth = in_process.auth

    async def exchange(subject_token: str) -> httpx.Response:
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": subject_token, "resource": "https://api.example",
                "subject_token_type": "urn:ietf:params:oauth:token-type:access_token"}  # fmt: skip
        return await in_process.http.post(auth.token_endpoint, data=form, auth=BASIC)

    granted = await exchange(auth.mint_opaque("alice"))
    assert granted.status_code == 200, granted.text
    claims = auth.verify(granted.json()["access_token"])
    assert claims is not None
    assert (claims["sub"], claims["aud"], claims["act"]) == (
        "alice", "https://api.example", {"sub": CLIENT_ID},
    )  # fmt: skip

    revoked_opaque, revoked_jwt = auth.mint_opaque(), auth.mint()
    auth.revoke(revoked_opaque)
    auth.revoke(revoked_jwt)
    refused = [
        revoked_opaque,
        revoked_jwt,
        auth.mint_opaque(omit=["sub"]),
        auth.mint(omit=["sub"]),  # was a server error before subjects were checked
        auth.mint_opaque(claims={"sub": 7}),
    ]
    for token in refused:
        response = await exchange(token)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_nothing_it_holds_logs_or_answers_shows_a_token_or_secret(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = served.auth
    tokens = [auth.mint_opaque("alice"), auth.mint_opaque(expires_in=-1), auth.mint()]
    auth.revoke(tokens[2])
    seen = [repr(auth), repr(auth.clients[CLIENT_ID])]
    for token in tokens:
        for credentials in (BASIC, (CLIENT_ID, "wrong"), ("x", SECRET)):
            response = await served.http.post(
                auth.introspection_endpoint, data={"token": token}, auth=credentials
            )
            if response.status_code != 200 or not response.json()["active"]:
                seen.append(response.text)  # only an active answer says anything
    # The forms it saw are the test's to look at; the rest of its state holds no token.
    state = {k: v for k, v in vars(auth).items() if k not in ("introspections", "exchanges")}
    seen += [repr(state), caplog.text]
    assert repr(auth) == f"LocalAuthorizationServer(issuer={auth.issuer!r}, algorithm='RS256')"
    for text in seen:
        for secret in (*tokens, SECRET, BASIC[1]):
            assert secret not in text
