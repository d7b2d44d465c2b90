"""Hostile and malformed inbound requests: each gets the exact RFC 6750 answer, and nothing leaks.

Every row builds one request from the local authorization server and states the status, the
JSON ``error`` (also the ``error`` of the ``WWW-Authenticate`` challenge) and, for
``invalid_token``, the validator's internal reason, so a row cannot pass for the wrong reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry

from asgi_delegation._tokens import _b64decode
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE, Gateway

METADATA_URL = "http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp"
_OTHER_KEY = RSAKey.generate_key(2048)  # a key the authorization server never published


# -- request builders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    headers: list[tuple[bytes, bytes]]
    query: str = ""
    secret: str = ""  # the credential sent: it must never come back in the answer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token: str) -> Req:
    return Req([(b"authorization", b"Bearer " + token.encode("latin-1"))], secret=token)


def authorization(value: str | bytes, secret: str = "") -> Req:
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    return Req([(b"authorization", raw)], secret=secret)


def mint(auth: LocalAuthorizationServer, **kw: Any) -> str:
    """A token for our resource; ``claims``, ``header``, ``omit``, ``key`` go to ``mint``."""
    kw.setdefault("audience", RESOURCE)
    return auth.mint(**kw)


def minted(**kw: Any) -> Callable[[LocalAuthorizationServer], Req]:
    return lambda auth: bearer(mint(auth, **kw))


def claims(auth: LocalAuthorizationServer, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": auth.issuer, "aud": RESOURCE, "sub": "user", "iat": now, "exp": now + 300}
    body.update(extra)
    return body


def head(auth: LocalAuthorizationServer, **extra: Any) -> dict[str, Any]:
    return {"alg": "RS256", "kid": auth.kid, "typ": "at+jwt", **extra}


def rs256(signing_input: str, key: Any) -> str:
    return b64(JWSRegistry.algorithms["RS256"].sign(signing_input.encode(), key))


def raw_token(
    auth: LocalAuthorizationServer,
    payload: str | bytes,
    header: str | bytes | None = None,
    *,
    key: Any = None,
) -> str:
    """Sign raw JSON text (anything ``json.dumps`` cannot produce) with RS256."""
    if header is None:
        header = json.dumps(head(auth))
    h = header.encode() if isinstance(header, str) else header
    p = payload.encode() if isinstance(payload, str) else payload
    signing_input = b64(h) + "." + b64(p)
    return signing_input + "." + rs256(signing_input, key or auth.signing_key)


def raw_claims(members: str, *, drop: tuple[str, ...] = ()) -> Callable[..., Req]:
    """A token whose payload is our valid claims, less ``drop``, plus the raw JSON ``members``."""

    def build(auth: LocalAuthorizationServer) -> Req:
        body = {k: v for k, v in claims(auth).items() if k not in drop}
        return bearer(raw_token(auth, f"{json.dumps(body)[:-1]}, {members}}}"))

    return build


def forged(
    header: Mapping[str, Any] | str, payload: Mapping[str, Any] | str, signature: str
) -> str:
    """A token with any header and payload and a made-up signature segment."""

    def seg(part: Mapping[str, Any] | str) -> str:
        return b64((part if isinstance(part, str) else json.dumps(dict(part))).encode())

    return f"{seg(header)}.{seg(payload)}.{signature}"


def alg_forged(alg: str) -> Callable[[LocalAuthorizationServer], Req]:
    """Our claims under header ``alg`` with a made-up, non-empty signature."""
    return lambda auth: bearer(forged(head(auth, alg=alg), claims(auth), "c2lnbmF0dXJl"))


def hmac_token(auth: LocalAuthorizationServer, alg: str) -> Req:
    """HMAC signed with the server's public key PEM as the secret: the classic alg confusion."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    secret = auth.signing_key.as_pem(private=False)
    signing_input = (
        b64(json.dumps(head(auth, alg=alg)).encode()) + "." + b64(json.dumps(claims(auth)).encode())
    )
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return bearer(signing_input + "." + b64(mac))


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def tampered_signature(auth: LocalAuthorizationServer) -> Req:
    h, p, s = mint(auth).split(".")
    # The middle of the segment: the last character carries only padding bits.
    return bearer(f"{h}.{p}.{flip(s, len(s) // 2)}")


def tampered_payload(auth: LocalAuthorizationServer) -> Req:
    h, p, s = mint(auth, subject="alice").split(".")
    body = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    body["sub"] = "admin"
    return bearer(f"{h}.{b64(json.dumps(body).encode())}.{s}")


def other_key_same_kid(auth: LocalAuthorizationServer) -> Req:
    return bearer(auth.sign(head(auth), claims(auth), _OTHER_KEY))


def segments(count: int) -> Callable[[LocalAuthorizationServer], Req]:
    def build(auth: LocalAuthorizationServer) -> Req:
        h, p, s = mint(auth).split(".")
        parts = {2: [h, p], 4: [h, p, s, s], 5: [h, p, "cek", "iv", s]}[count]
        return bearer(".".join(parts))

    return build


def deep(depth: int, *, key: Any = None) -> Callable[[LocalAuthorizationServer], Req]:
    """Valid claims plus a claim nested ``depth`` arrays deep (``json.dumps`` would overflow)."""

    def build(auth: LocalAuthorizationServer) -> Req:
        base = json.dumps(claims(auth))[:-1]
        payload = f'{base}, "deep": {"[" * depth}{"]" * depth}}}'
        return bearer(raw_token(auth, payload, key=key or auth.signing_key))

    return build


def two_headers(first: str, second: str) -> Callable[[LocalAuthorizationServer], Req]:
    def build(auth: LocalAuthorizationServer) -> Req:
        token = mint(auth)
        values = [v.format(token=token) for v in (first, second)]
        return Req([(b"authorization", v.encode()) for v in values], secret=token)

    return build


def in_query(query: str, *, header: bool) -> Callable[[LocalAuthorizationServer], Req]:
    def build(auth: LocalAuthorizationServer) -> Req:
        token = mint(auth)
        req = bearer(token) if header else Req([], secret=token)
        return Req(req.headers, query.format(token=token), token)

    return build


def valid_with(value: str) -> Callable[[LocalAuthorizationServer], Req]:
    """The Authorization header ``value`` with ``{token}`` replaced by a valid token."""

    def build(auth: LocalAuthorizationServer) -> Req:
        token = mint(auth)
        return authorization(value.format(token=token), secret=token)

    return build


# -- the table ------------------------------------------------------------------------------------


def row(
    id: str,
    build: Callable[[LocalAuthorizationServer], Req],
    status: int,
    error: str | None = None,
    reason: str | None = None,
    *,
    scopes: list[str] | None = None,
    required_scopes: tuple[str, ...] = (),
) -> Any:
    expected = Expected(status, error, reason, scopes, required_scopes)
    return pytest.param(build, expected, id=id)


@dataclass(frozen=True)
class Expected:
    status: int
    error: str | None
    reason: str | None
    scopes: list[str] | None
    required_scopes: tuple[str, ...]


def ok(id: str, build: Callable[[LocalAuthorizationServer], Req], **kw: Any) -> Any:
    return row(id, build, 200, **kw)


def unauthorized(id: str, build: Callable[[LocalAuthorizationServer], Req]) -> Any:
    return row(id, build, 401, "unauthorized")


def bad_request(id: str, build: Callable[[LocalAuthorizationServer], Req], **kw: Any) -> Any:
    return row(id, build, 400, "invalid_request", **kw)


def invalid(
    id: str, build: Callable[[LocalAuthorizationServer], Req], reason: str, **kw: Any
) -> Any:
    return row(id, build, 401, "invalid_token", reason, **kw)


RECURSION_DEPTH = int(sys.getrecursionlimit() * 0.6)  # parsers take it; claims cannot be kept

ROWS = [
    # -- controls
    ok("valid-token", minted()),
    ok("no-kid-single-key", minted(omit=("kid",))),
    # -- no bearer credentials: a bare challenge, without error=
    unauthorized("no-authorization", lambda auth: Req([])),
    unauthorized("basic-scheme", lambda auth: authorization("Basic dXNlcjpwYXNzd29yZA==")),
    unauthorized(
        "digest-scheme",
        lambda auth: authorization('Digest username="u", nonce="n", response="0123456789abcd"'),
    ),
    unauthorized("bearerx-scheme", valid_with("Bearerx {token}")),
    unauthorized("token-without-scheme", valid_with("{token}")),
    unauthorized("empty-authorization", lambda auth: authorization("")),
    unauthorized("tab-after-scheme", valid_with("Bearer\t{token}")),
    # -- malformed requests
    bad_request("two-authorization-headers", two_headers("Bearer {token}", "Bearer {token}")),
    bad_request("bearer-and-basic-headers", two_headers("Basic dXNlcjpw", "Bearer {token}")),
    bad_request("bearer-empty-token", lambda auth: authorization("Bearer")),
    bad_request("bearer-only-spaces", lambda auth: authorization("Bearer    ")),
    bad_request("query-token-alone", in_query("access_token={token}", header=False)),
    bad_request("query-token-and-header", in_query("access_token={token}", header=True)),
    bad_request("query-token-among-params", in_query("a=1&access_token={token}", header=False)),
    bad_request(
        "query-token-percent-encoded-name-and-header",
        in_query("access%5Ftoken={token}", header=True),
    ),
    # -- the algorithm
    invalid("alg-none-empty-signature", minted(header={"alg": "none"}), "malformed"),
    invalid("alg-none", alg_forged("none"), "algorithm"),
    invalid("alg-None", alg_forged("None"), "algorithm"),
    invalid("alg-NONE", alg_forged("NONE"), "algorithm"),
    invalid(
        "alg-missing",
        lambda auth: bearer(forged({"kid": auth.kid}, claims(auth), "c2ln")),
        "algorithm",
    ),
    invalid(
        "alg-lowercase-rs256",
        lambda auth: bearer(
            forged(head(auth, alg="rs256"), claims(auth), mint(auth).split(".")[2])
        ),
        "algorithm",
    ),
    invalid("hs256-with-public-pem", lambda auth: hmac_token(auth, "HS256"), "algorithm"),
    invalid("hs512-with-public-pem", lambda auth: hmac_token(auth, "HS512"), "algorithm"),
    invalid("ps256-with-rs256-only-key", minted(header={"alg": "PS256"}), "unknown_key"),
    # -- the key and the signature
    invalid("unknown-kid", minted(header={"kid": "no-such-key"}), "unknown_key"),
    invalid("kid-integer", minted(header={"kid": 7}), "malformed"),
    invalid("tampered-signature", tampered_signature, "bad_signature"),
    invalid("tampered-payload", tampered_payload, "bad_signature"),
    invalid("other-key-same-kid", other_key_same_kid, "bad_signature"),
    invalid(
        "empty-signature-rs256",
        lambda auth: bearer(mint(auth).rsplit(".", 1)[0] + "."),
        "malformed",
    ),
    # -- times
    invalid("expired", minted(expires_in=-3600), "expired"),
    invalid("expired-just-beyond-leeway", minted(expires_in=-31), "expired"),
    ok("expired-within-leeway", minted(expires_in=-10)),
    invalid("nbf-in-future", minted(claims={"nbf": time.time() + 3600}), "not_yet_valid"),
    invalid("iat-in-future", minted(claims={"iat": time.time() + 3600}), "not_yet_valid"),
    invalid("exp-missing", minted(omit=("exp",)), "malformed"),
    invalid("exp-string", minted(claims={"exp": str(int(time.time()) + 300)}), "malformed"),
    invalid("exp-true", minted(claims={"exp": True}), "malformed"),
    invalid("exp-1e999", raw_claims('"exp": 1e999', drop=("exp",)), "malformed"),
    invalid("exp-NaN", raw_claims('"exp": NaN', drop=("exp",)), "malformed"),
    invalid("exp-400-digits", raw_claims('"exp": 1' + "0" * 399, drop=("exp",)), "malformed"),
    invalid("exp-5000-digits", raw_claims('"exp": 1' + "0" * 4999, drop=("exp",)), "malformed"),
    row(
        "nbf-null",
        minted(claims={"nbf": None}),
        401,
        "invalid_token",
        "malformed",
    ),
    # -- issuer, audience, subject, scopes
    invalid(
        "iss-trailing-slash",
        lambda auth: bearer(mint(auth, claims={"iss": auth.issuer + "/"})),
        "wrong_issuer",
    ),
    invalid("iss-missing", minted(omit=("iss",)), "wrong_issuer"),
    invalid("aud-wrong", minted(audience="https://other.example/mcp"), "wrong_audience"),
    invalid("aud-missing", minted(omit=("aud",)), "wrong_audience"),
    ok("aud-list-with-ours", minted(audience=["https://other.example", RESOURCE])),
    invalid("aud-list-non-strings", minted(audience=[RESOURCE, 1, None]), "malformed"),
    invalid("sub-missing", minted(omit=("sub",)), "malformed"),
    invalid("sub-empty", minted(subject=""), "malformed"),
    invalid("sub-integer", minted(claims={"sub": 42}), "malformed"),
    invalid("sub-too-long", minted(subject="u" * 1025), "malformed"),
    invalid("scope-integer", minted(claims={"scope": 7}), "malformed"),
    ok("scp-list", minted(claims={"scp": ["read", "write"]}), scopes=["read", "write"]),
    row(
        "scope-lacks-required",
        minted(scope="read"),
        403,
        "insufficient_scope",
        required_scopes=("admin",),
    ),
    # -- the shape of the token
    invalid(
        "too-large-1mb",
        lambda auth: bearer(mint(auth, claims={"pad": "x" * (1 << 20)})),
        "too_large",
    ),
    invalid("two-segments", segments(2), "malformed"),
    invalid("four-segments", segments(4), "malformed"),
    invalid("five-segments-jwe", segments(5), "malformed"),
    invalid(
        "non-base64url-characters",
        lambda auth: bearer(mint(auth).replace("-", "+").replace("_", "/") + "+/=="),
        "malformed",
    ),
    invalid("trailing-dot", lambda auth: bearer(mint(auth) + "."), "malformed"),
    invalid("trailing-tab", lambda auth: bearer(mint(auth) + "\t"), "malformed"),
    # Trailing spaces are not part of the field value (RFC 9110 5.5): the token is fine.
    ok("trailing-spaces", lambda auth: bearer(mint(auth) + "   ")),
    invalid(
        "raw-binary-bytes",
        lambda auth: authorization(b"Bearer \xff\xfe\x00\x01.\x80.\xc3"),
        "malformed",
    ),
    invalid(
        "header-json-string",
        lambda auth: bearer(raw_token(auth, json.dumps(claims(auth)), '"abc"')),
        "malformed",
    ),
    invalid(
        "header-json-array",
        lambda auth: bearer(raw_token(auth, json.dumps(claims(auth)), '["RS256"]')),
        "malformed",
    ),
    invalid(
        "payload-json-array",
        lambda auth: bearer(auth.sign(head(auth), [claims(auth)], auth.signing_key)),
        "malformed",
    ),
    invalid(
        "header-not-utf8",
        lambda auth: bearer(
            raw_token(auth, json.dumps(claims(auth)), b'{"alg": "RS256", "x": "\xff\xfe"}')
        ),
        "malformed",
    ),
    invalid("deep-nesting-5000", deep(5000), "malformed"),
    invalid(f"deep-nesting-{RECURSION_DEPTH}-signed", deep(RECURSION_DEPTH), "malformed"),
    # Claims are parsed into their read-only form at once: too deep for that is malformed
    # before any signature is checked.
    invalid(
        f"deep-nesting-{RECURSION_DEPTH}-forged", deep(RECURSION_DEPTH, key=_OTHER_KEY), "malformed"
    ),
    invalid("duplicate-sub", raw_claims('"sub": "admin"'), "malformed"),
    invalid(
        "duplicate-alg",
        lambda auth: bearer(
            raw_token(
                auth, json.dumps(claims(auth)), json.dumps(head(auth))[:-1] + ', "alg": "none"}'
            )
        ),
        "malformed",
    ),
    # -- header members
    invalid(
        "header-jwk",
        lambda auth: bearer(
            mint(auth, header={"jwk": _OTHER_KEY.as_dict(private=False)}, key=_OTHER_KEY)
        ),
        "header",
    ),
    invalid("header-jku", minted(header={"jku": "https://evil.example/jwks"}), "header"),
    invalid("header-x5u", minted(header={"x5u": "https://evil.example/cert.pem"}), "header"),
    invalid("header-x5c", minted(header={"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOC"]}), "header"),
    invalid("header-crit", minted(header={"crit": ["exp"]}), "header"),
    ok("typ-JWT", minted(header={"typ": "JWT"})),
    ok("typ-at+jwt", minted(header={"typ": "at+jwt"})),
    ok("typ-application/at+jwt", minted(header={"typ": "application/at+jwt"})),
    ok("typ-AT+JWT", minted(header={"typ": "AT+JWT"})),
    ok(
        "typ-application/jwt",
        minted(header={"typ": "application/jwt"}),
    ),
    invalid("typ-JOSE", minted(header={"typ": "JOSE"}), "type"),
    invalid("typ-dpop+jwt", minted(header={"typ": "dpop+jwt"}), "type"),
    invalid("typ-integer", minted(header={"typ": 1}), "type"),
]


def _challenge(value: str) -> dict[str, str]:
    assert value.startswith("Bearer ")
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', value))


@pytest.mark.parametrize(("build", "expected"), ROWS)
async def test_hostile_request(
    build: Callable[[LocalAuthorizationServer], Req],
    expected: Expected,
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = gateway_factory(required_scopes=list(expected.required_scopes))
    answers = gateway.middleware._answers
    reasons: list[str] = []
    real_invalid_token = answers.invalid_token

    def invalid_token(reason: str) -> Any:
        reasons.append(reason)
        return real_invalid_token(reason)

    monkeypatch.setattr(answers, "invalid_token", invalid_token)
    req = build(auth)
    path = "/mcp?" + req.query if req.query else "/mcp"

    response = await gateway.client.get(path, headers=req.headers)

    assert response.status_code == expected.status, response.text
    body = response.json()
    challenge = response.headers.get("www-authenticate")
    if expected.status == 200:
        assert challenge is None
        assert body["subject"]
        if expected.scopes is not None:
            assert body["scopes"] == expected.scopes
    else:
        assert body["error"] == expected.error
        assert challenge is not None
        params = _challenge(challenge)
        if expected.error == "unauthorized":
            assert "error" not in params
            assert params["resource_metadata"] == METADATA_URL
        else:
            assert params["error"] == expected.error
        if expected.status in (401, 403):
            assert params["resource_metadata"] == METADATA_URL
        if expected.status == 403:
            assert params["scope"] == " ".join(expected.required_scopes)
    assert reasons == ([expected.reason] if expected.reason else [])
    # The credential never comes back, neither in the body nor in any header.
    if len(req.secret) >= 8:
        assert req.secret not in response.text
        for name, value in response.headers.multi_items():
            assert req.secret not in name
            assert req.secret not in value


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR", "Bearer"])
async def test_scheme_is_case_insensitive(
    scheme: str, auth: LocalAuthorizationServer, gateway: Gateway
) -> None:
    token = mint(auth, subject="alice")
    response = await gateway.client.get("/mcp", headers={"authorization": f"{scheme} {token}"})
    assert response.status_code == 200
    assert response.json()["subject"] == "alice"


def test_the_table_is_large_enough() -> None:
    assert len(ROWS) >= 45


@given(
    data=st.binary(max_size=64),
    where=st.integers(min_value=0),
    odd=st.sampled_from("+/= \n\t.\x00\xff"),
)
def test_a_segment_decodes_only_as_unpadded_base64url(data: bytes, where: int, odd: str) -> None:
    # One spelling per value: a second one (padded, standard alphabet, spaces) would be a
    # different token string for the same signed bytes.
    segment = base64.urlsafe_b64encode(data).rstrip(b"=")
    assert _b64decode(segment) == data
    at = where % (len(segment) + 1)
    spelled = segment[:at] + odd.encode("latin-1") + segment[at:]
    with pytest.raises(binascii.Error):
        _b64decode(spelled)
    if segment != base64.b64encode(data).rstrip(b"="):  # it holds '-' or '_'
        with pytest.raises(binascii.Error):
            _b64decode(base64.b64encode(data).rstrip(b"="))


async def test_kept_headers_are_signed_ones_bounded_and_still_judged(
    auth: LocalAuthorizationServer, gateway: Gateway
) -> None:
    trust = gateway.middleware._only
    assert trust is not None
    kept = trust.validator._headers
    for n in range(20):  # twenty distinct headers, all signed: the table stays bounded
        token = auth.mint("alice", audience=RESOURCE, header={"n": n})
        assert (await gateway.get(token)).status_code == 200
        assert 1 <= len(kept) <= 16
    signed = auth.mint("alice", audience=RESOURCE, header={"n": "forged"})
    forged = signed.rsplit(".", 1)[0] + "." + token.rsplit(".", 1)[1]  # another's signature
    assert (await gateway.get(forged)).status_code == 401
    assert forged.split(".")[0].encode() not in kept  # a header is kept only once it verified
    known = next(iter(kept))
    expired = auth.mint("alice", audience=RESOURCE, expires_in=-3600)
    late = known.decode() + "." + expired.split(".", 1)[1]  # a kept header, expired claims
    answer = await gateway.get(late)
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert answer.json()["error_description"] == "The access token has expired"
