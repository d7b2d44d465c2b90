"""The signing key set: filtering, rotation, refetch limits, outages and cache lifetimes."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from asgi_delegation import DEFAULT_ALGORITHMS
from asgi_delegation._jwks import _ABSENT_BYTES, MAX_KID_LENGTH, usable_key
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE, Gateway, fetches

ALGS = frozenset(DEFAULT_ALGORITHMS)
RSA = RSAKey.generate_key(2048, parameters={"kid": "r"})


def _short_rsa_jwk() -> dict[str, str]:
    numbers = rsa.generate_private_key(65537, 1024).public_key().public_numbers()  # noqa: S505

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8)).decode().rstrip("=")

    return {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e)}


RSA_PUBLIC = RSA.as_dict(private=False)


@pytest.mark.parametrize(
    ("jwk", "usable"),
    [
        (RSA_PUBLIC, True),
        ({**RSA_PUBLIC, "use": "sig", "alg": "RS256", "key_ops": ["verify"]}, True),
        (ECKey.generate_key("P-256").as_dict(private=False), True),
        (OKPKey.generate_key("Ed25519").as_dict(private=False), True),
        (RSA.as_dict(private=True), False),
        (ECKey.generate_key("P-256").as_dict(private=True), False),
        (OctKey.generate_key(256).as_dict(private=True), False),
        (_short_rsa_jwk(), False),
        ({**RSA_PUBLIC, "use": "enc"}, False),
        ({**RSA_PUBLIC, "key_ops": ["encrypt"]}, False),
        ({**RSA_PUBLIC, "key_ops": "verify"}, False),
        ({**RSA_PUBLIC, "alg": "HS256"}, False),
        ({**RSA_PUBLIC, "alg": "RSA-OAEP"}, False),
        ({**RSA_PUBLIC, "kid": 7}, False),
        ({**RSA_PUBLIC, "kid": "k" * 300}, False),
        ({**RSA_PUBLIC, "n": "!!!"}, False),
        ({"kty": "RSA", "e": "AQAB"}, False),
        (OKPKey.generate_key("X25519").as_dict(private=False), False),
        ({"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"}, False),
        ({"kty": ["RSA"]}, False),
        ("RSA", False),
        (None, False),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, bool) else str(v),
)
def test_usable_key_filter(jwk: Any, usable: bool) -> None:
    assert (usable_key(jwk, ALGS) is not None) is usable


async def test_rotation_is_picked_up_at_once(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    auth.rotate_keys()
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    assert fetches(auth, "jwks") == 2


async def test_unknown_kid_refetches_at_most_once_per_cooldown(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Any
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    auth.rotate_keys()
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    auth.rotate_keys()  # a second rotation within the cooldown is not looked for yet
    token = auth.mint(audience=RESOURCE)
    assert (await gateway.get(token)).status_code == 401
    assert fetches(auth, "jwks") == 2
    clock.advance(31)
    assert (await gateway.get(token)).status_code == 200
    assert fetches(auth, "jwks") == 3


@pytest.mark.parametrize("warm", [False, True])
async def test_a_flood_of_forged_kids_costs_at_most_two_fetches(
    gateway: Gateway, auth: LocalAuthorizationServer, warm: bool
) -> None:
    if warm:
        assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    forged = [auth.mint(audience=RESOURCE, header={"kid": uuid.uuid4().hex}) for _ in range(50)]
    responses = await asyncio.gather(*(gateway.get(t) for t in forged))
    assert {r.status_code for r in responses} == {401}
    assert fetches(auth, "jwks") <= 2
    # And sequentially, after the flood, nothing more is fetched.
    for token in forged[:10]:
        assert (await gateway.get(token)).status_code == 401
    assert fetches(auth, "jwks") <= 2


async def test_concurrent_cold_requests_share_one_fetch(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    tokens = [auth.mint(f"u{n}", audience=RESOURCE) for n in range(100)]
    responses = await asyncio.gather(*(gateway.get(t) for t in tokens))
    assert {r.status_code for r in responses} == {200}
    assert fetches(auth, "jwks") == 1
    assert fetches(auth, "metadata") == 1


async def test_jwks_down_after_warm_up_keeps_validating_known_keys(
    gateway: Gateway, auth: LocalAuthorizationServer, clock: Any
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    auth.fail_status = 500
    clock.advance(3600)  # well past the JWKS lifetime: a refetch is due and fails
    for n in range(3):
        token = auth.mint(f"new{n}", audience=RESOURCE, expires_in=7200)
        assert (await gateway.get(token)).status_code == 200
    # Unknown kids are still refused (401, not 503): there are usable keys.
    forged = auth.mint(audience=RESOURCE, header={"kid": "forged"}, expires_in=7200)
    assert (await gateway.get(forged)).status_code == 401
    assert fetches(auth, "jwks") == 2  # one failed refetch, then backoff


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [("max-age=120", 120), ("public, max-age=7200", 7200), ("max-age=1", 60), ("no-store", 60),
     (None, 600), ("max-age=999999999", 86400), ("max-age=abc", 600)],
)  # fmt: skip
async def test_jwks_lifetime_follows_cache_control_clamped(
    gateway: Gateway,
    auth: LocalAuthorizationServer,
    clock: Any,
    cache_control: str | None,
    fresh_for: float,
) -> None:
    auth.jwks_cache_control = cache_control
    assert (await gateway.get(auth.mint("a", audience=RESOURCE))).status_code == 200
    clock.advance(fresh_for - 1)
    later: dict[str, Any] = {"audience": RESOURCE, "expires_in": 100_000}
    assert (await gateway.get(auth.mint("b", **later))).status_code == 200
    assert fetches(auth, "jwks") == 1
    clock.advance(2)
    assert (await gateway.get(auth.mint("c", **later))).status_code == 200
    assert fetches(auth, "jwks") == 2


async def test_kid_less_token_needs_an_unambiguous_key(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE, omit=["kid"]))).status_code == 200
    auth.rotate_keys()
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200  # learns key 2
    assert (await gateway.get(auth.mint("b", audience=RESOURCE, omit=["kid"]))).status_code == 401


async def test_alg_that_does_not_fit_the_key_is_refused_without_refetch(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    ec = ECKey.generate_key("P-256")
    token = auth.mint(audience=RESOURCE, header={"alg": "ES256", "kid": auth.kid}, key=ec)
    assert (await gateway.get(token)).status_code == 401
    assert fetches(auth, "jwks") == 1


@pytest.mark.parametrize("algorithm", ["ES256", "ES384", "PS256", "Ed25519"])
async def test_other_algorithms(gateway_factory: Any, algorithm: str) -> None:
    auth = LocalAuthorizationServer(algorithm=algorithm)
    gateway = gateway_factory(issuer=auth.issuer, http_client=auth.http_client())
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200


async def test_algorithms_option_narrows(
    gateway_factory: Any, auth: LocalAuthorizationServer
) -> None:
    gateway = gateway_factory(algorithms=["ES256"])
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 401
    assert fetches(auth, "jwks") == 0  # refused on the header alone


async def test_concurrent_cold_copies_of_one_token_verify_its_signature_once(
    gateway: Gateway, auth: LocalAuthorizationServer, token: str, monkeypatch: Any
) -> None:
    verifiers = gateway.middleware._trusts[auth.issuer].validator._verifiers
    real = verifiers["RS256"]
    checks = 0

    class Counting:
        def verify(self, *args: Any) -> bool:
            nonlocal checks
            checks += 1
            return real.verify(*args)

    monkeypatch.setitem(verifiers, "RS256", Counting())
    responses = await asyncio.gather(*(gateway.get(token) for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert checks == 1


@pytest.mark.parametrize("length", [MAX_KID_LENGTH + 1, 10_000])
async def test_an_oversized_kid_is_refused_before_any_lookup(
    gateway: Gateway, auth: LocalAuthorizationServer, length: int
) -> None:
    token = auth.mint(audience=RESOURCE, header={"kid": "k" * length})
    response = await gateway.get(token)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert fetches(auth, "jwks") == 0
    assert fetches(auth, "metadata") == 0


async def test_a_kid_at_the_limit_is_looked_up(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    token = auth.mint(audience=RESOURCE, header={"kid": "k" * MAX_KID_LENGTH})
    assert (await gateway.get(token)).status_code == 401  # unknown, after a lookup
    assert fetches(auth, "jwks") == 1


async def test_absent_kids_are_tracked_within_a_byte_budget(
    gateway: Gateway, auth: LocalAuthorizationServer
) -> None:
    assert (await gateway.get(auth.mint(audience=RESOURCE))).status_code == 200
    jwks = gateway.middleware._trusts[auth.issuer].validator._jwks
    for n in range(1500):  # far more than the budget holds at the longest kid
        kid = f"{n:0{MAX_KID_LENGTH}d}"
        assert (
            await gateway.get(auth.mint(audience=RESOURCE, header={"kid": kid}))
        ).status_code == 401
    tracked = jwks._absent
    assert 0 < len(tracked) < 1500
    assert sum(len(kid) for kid in tracked) <= _ABSENT_BYTES
