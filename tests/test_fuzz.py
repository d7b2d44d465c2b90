"""Property tests: whatever arrives, the middleware answers 200/400/401/403, never crashes (a 500),
and lets a request through to the application only with a token that obeys every claim rule.

The middleware is driven directly through ASGI, one event loop for the whole module, with the
package's wall clock frozen so the claim rules can be judged exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from joserfc.jws import JWSRegistry

from asgi_delegation import AccessContext, DelegationMiddleware, _clock
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import RESOURCE

AUTH = LocalAuthorizationServer()
NOW = float(int(_clock.now()))
LEEWAY = 30.0
MAX_TOKEN_BYTES = 16 * 1024
ISSUER = AUTH.issuer
REFUSED_MEMBERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
ACCEPTED_TYPES = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})
UNCHECKED_STRING_MEMBERS = ("cty", "x5t", "x5t#S256")
ABSENT = object()

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good_claims(**extra: Any) -> dict[str, Any]:
    claims = {"iss": ISSUER, "aud": RESOURCE, "sub": "user", "iat": NOW, "exp": NOW + 3600}
    claims.update(extra)
    return claims


def good_header(**extra: Any) -> dict[str, Any]:
    return {"alg": "RS256", "kid": AUTH.kid, "typ": "at+jwt", **extra}


def sign(header: Any, claims: Any) -> str:
    """Header and payload as JSON, signed correctly with the server's key whatever they say."""
    if isinstance(header, dict) and header.get("alg") == "RS256":
        return AUTH.sign(header, claims, AUTH.signing_key)
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = JWSRegistry.algorithms["RS256"].sign(signing_input.encode(), AUTH.signing_key)
    return signing_input + "." + b64(signature)


VALID_TOKENS = [
    sign(good_header(), good_claims(scope="read")),
    sign(good_header(), good_claims(scope="write")),
    sign(good_header(typ="JWT"), good_claims(scp=["read", "admin"])),
]


# -- driving the middleware -------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    reached: list[AccessContext] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        value = json.loads(self.body).get("error") if self.status != 200 else None
        assert value is None or isinstance(value, str)
        return value


class Recorder:
    """The application: records every request that reaches it, answers 200."""

    def __init__(self) -> None:
        self.reached: list[AccessContext] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached.append(scope["state"]["access_context"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@dataclass
class Harness:
    runner: asyncio.Runner
    recorder: Recorder
    plain: DelegationMiddleware  # no required scope
    scoped: DelegationMiddleware  # requires "read"

    def request(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        query: bytes = b"",
        *,
        scoped: bool = False,
    ) -> Outcome:
        app = self.scoped if scoped else self.plain
        return self.runner.run(self._request(app, list(headers), query))

    async def _request(
        self, app: DelegationMiddleware, headers: list[tuple[bytes, bytes]], query: bytes
    ) -> Outcome:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/mcp",
            "raw_path": b"/mcp",
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        self.recorder.reached = []
        await app(scope, receive, send)  # type: ignore[arg-type]
        start, body = sent[0], sent[1]
        assert start["type"] == "http.response.start"
        assert body["type"] == "http.response.body"
        return Outcome(start["status"], dict(start["headers"]), body["body"], self.recorder.reached)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_clock, "now", lambda: NOW)
        runner = asyncio.Runner()
        client = AUTH.http_client()
        recorder = Recorder()
        options: dict[str, Any] = {"issuer": ISSUER, "resource": RESOURCE, "http_client": client}
        harness = Harness(
            runner,
            recorder,
            DelegationMiddleware(recorder, **options),
            DelegationMiddleware(recorder, required_scopes=["read"], **options),
        )
        try:
            yield harness
        finally:
            runner.run(client.aclose())
            runner.close()


def check_answer(outcome: Outcome) -> None:
    """What holds for every answer: a known status, the app reached exactly on 200."""
    assert outcome.status in (200, 400, 401, 403)
    event(f"status {outcome.status}")  # --hypothesis-show-statistics shows the mix
    if outcome.status == 200:
        assert len(outcome.reached) == 1
        assert b"www-authenticate" not in outcome.headers
        return
    assert outcome.reached == []
    challenge = outcome.headers[b"www-authenticate"].decode()
    error = {400: "invalid_request", 403: "insufficient_scope"}.get(outcome.status)
    if outcome.status == 401:
        error = outcome.error
        assert error in ("unauthorized", "invalid_token")
    assert outcome.error == error
    if error == "unauthorized":
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge


# -- the claim rules (RFC 7519, RFC 9068), judged independently of the code -------------------


def thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


def strict_json(value: Any) -> bool:
    """JSON that RFC 8259 allows: no NaN or Infinity anywhere."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(strict_json(v) for v in value.values())
    if isinstance(value, list):
        return all(strict_json(v) for v in value)
    return True


def numeric_date(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) >= 2**53:  # the package's documented precision limit
        return None
    return float(value) if math.isfinite(value) else None


def string_list(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def claims_obey_rules(claims: Any) -> bool:
    if not isinstance(claims, dict) or not strict_json(claims):
        return False
    exp = numeric_date(claims.get("exp"))
    if exp is None or exp + LEEWAY <= NOW:
        return False
    for name in ("nbf", "iat"):
        if name in claims:
            date = numeric_date(claims[name])
            if date is None or date > NOW + LEEWAY:
                return False
    if claims.get("iss") != ISSUER:
        return False
    aud = claims.get("aud")
    if not (aud == RESOURCE or (string_list(aud) and RESOURCE in aud)):
        return False
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= 1024:
        return False
    return all(
        claims.get(name) is None or isinstance(claims[name], str) or string_list(claims[name])
        for name in ("scope", "scp")
    )


def header_obeys_rules(header: Any, *, strictly: bool) -> bool:
    """The header rules the package enforces; ``strictly`` adds RFC 7515's types for members
    it never reads (``cty``, ``x5t``): either answer is acceptable for those, so only the
    loose rules bind a 200.
    """
    if not isinstance(header, dict) or not strict_json(header):
        return False
    if header.get("alg") != "RS256" or REFUSED_MEMBERS & header.keys():
        return False
    if strictly and any(
        name in header and not isinstance(header[name], str) for name in UNCHECKED_STRING_MEMBERS
    ):
        return False
    typ = header.get("typ", ABSENT)
    if typ is not ABSENT and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
        return False
    return header.get("kid", ABSENT) in (ABSENT, AUTH.kid)


def scopes_of(claims: Mapping[str, Any]) -> set[str]:
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(value)
    return scopes


def check_admitted(outcome: Outcome) -> None:
    """A request the app saw carried claims that obey every rule."""
    if outcome.status == 200:
        (context,) = outcome.reached
        claims = thaw(context.claims)
        assert claims_obey_rules(claims), claims
        assert context.subject == claims["sub"]
        assert context.scopes == scopes_of(claims)


# -- strategies -------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([ISSUER, RESOURCE, AUTH.kid, "RS256", "at+jwt", 2**53, NOW])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
dates = st.one_of(
    st.integers(int(NOW) - 600, int(NOW) + 600),
    st.floats(NOW - 60, NOW + 60),
    st.sampled_from([NOW - LEEWAY, NOW - LEEWAY + 0.5, NOW + LEEWAY, NOW + LEEWAY + 0.5]),
    st.sampled_from([2**53 - 1, 2**53, 1e300, True, "1", None]),
    json_values,
)
_DROP = "<dropped>"


def mutated(
    base: Mapping[str, Any], members: Mapping[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with up to two members replaced (by good or bad values), added or dropped."""
    change = st.sampled_from(sorted(members)).flatmap(
        lambda name: st.tuples(st.just(name), members[name] | st.just(_DROP))
    )

    def apply(changes: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(base)
        for name, value in changes:
            if value == _DROP:
                result.pop(name, None)
            else:
                result[name] = value
        return result

    return st.lists(change, max_size=2).map(apply)


def mostly(near_valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three times in four a near-valid object, otherwise any JSON value at all."""
    return st.integers(0, 3).flatmap(lambda n: json_values if n == 0 else near_valid)


claim_sets = mostly(
    mutated(
        good_claims(),
        {
            "iss": st.sampled_from([ISSUER, ISSUER + "/", ISSUER.upper(), ""]) | json_values,
            "aud": st.sampled_from([RESOURCE, [RESOURCE], ["x", RESOURCE], "x", [], RESOURCE + "/"])
            | st.lists(st.sampled_from([RESOURCE, "https://other.example"]) | json_values)
            | json_values,
            "sub": st.text(max_size=12) | st.just("u" * 1025) | json_values,
            "exp": dates,
            "nbf": dates,
            "iat": dates,
            "scope": st.text(max_size=20) | json_values,
            "scp": st.lists(st.text(max_size=6), max_size=3) | json_values,
            "extra": json_values,
        },
    ),
)
headers = mostly(
    mutated(
        good_header(),
        {
            "alg": st.sampled_from(["RS256", "none", "None", "HS256", "PS256", "ES256", "rs256"])
            | json_values,
            "kid": st.sampled_from([AUTH.kid, AUTH.kid.upper(), "", None]) | json_values,
            "typ": st.sampled_from(
                ["at+jwt", "JWT", "application/at+jwt", "AT+JWT", "JOSE", "jwt+x", ""]
            )
            | json_values,
            "crit": json_values,
            "jku": json_values,
            "x5c": json_values,
            "cty": st.just("JWT") | json_values,
            "x5t": st.just("dGh1bWJwcmludA") | json_values,
            "b64": st.booleans() | json_values,
        },
    ),
)
B64_ALPHABET = string.ascii_letters + string.digits + "-_"
token_like = st.one_of(
    st.sampled_from(VALID_TOKENS),
    st.text(B64_ALPHABET + ".", max_size=80),
    st.builds(
        lambda token, at, char: token[: at % len(token)] + char + token[at % len(token) + 1 :],
        st.sampled_from(VALID_TOKENS),
        st.integers(0, 10_000),
        st.sampled_from(list(B64_ALPHABET + ". =\t\x00\xff")),
    ),
)
authorization_values = st.one_of(
    st.sampled_from(VALID_TOKENS).map(lambda token: f"Bearer {token}".encode()),
    st.binary(max_size=120),
    st.text(max_size=120).map(str.encode),
    st.text(max_size=120).map(lambda text: ("Bearer " + text).encode()),
    st.builds(
        lambda scheme, sep, token, tail: (scheme + sep + token + tail).encode("utf-8"),
        st.sampled_from(["Bearer", "bearer", "BEARER", "Bearerx", "Basic", "Digest", ""]),
        st.sampled_from([" ", "  ", "\t", ""]),
        token_like,
        st.sampled_from(["", " ", "   ", "\t", ".", "=", "\x00", ",x"]),
    ),
)


# -- 1. Authorization headers -----------------------------------------------------------------


def expected_statuses(values: list[bytes]) -> set[int]:
    """RFC 6750 / RFC 9110: what each count and shape of Authorization header must get."""
    if len(values) > 1:
        return {400}
    if not values:
        return {401}
    scheme, _, token = values[0].partition(b" ")
    if scheme.lower() != b"bearer":
        return {401}
    if not token.strip(b" "):
        return {400}
    return {200, 401, 403}


@FUZZ
@given(
    values=authorization_values.map(lambda value: [value])
    | st.lists(authorization_values, max_size=4),
    others=st.lists(st.tuples(st.sampled_from([b"x-other", b"cookie"]), st.binary(max_size=20))),
    scoped=st.booleans(),
)
@example(values=[b"Bearer " + VALID_TOKENS[0].encode()], others=[], scoped=True)
@example(values=[b"bearer " + VALID_TOKENS[1].encode()], others=[], scoped=True)
def test_any_authorization_headers(
    harness: Harness, values: list[bytes], others: list[tuple[bytes, bytes]], scoped: bool
) -> None:
    outcome = harness.request([*others, *((b"authorization", v) for v in values)], scoped=scoped)
    check_answer(outcome)
    assert outcome.status in expected_statuses(values)
    if outcome.status == 401 and expected_statuses(values) == {401}:
        assert outcome.error == "unauthorized"
    check_admitted(outcome)


# -- 2. token segments ------------------------------------------------------------------------


def bearer(token: str | bytes) -> list[tuple[bytes, bytes]]:
    raw = token.encode() if isinstance(token, str) else token
    return [(b"authorization", b"Bearer " + raw)]


@FUZZ
@given(
    segments=st.lists(
        st.binary(min_size=1, max_size=80).map(b64)
        | st.text(B64_ALPHABET, min_size=1, max_size=80),
        min_size=1,
        max_size=6,
    )
)
def test_any_segments(harness: Harness, segments: list[str]) -> None:
    outcome = harness.request(bearer(".".join(segments)))
    check_answer(outcome)
    assert outcome.status in (200, 401)
    check_admitted(outcome)


NO_KID_HEADER = {"alg": "RS256", "typ": "at+jwt"}


@FUZZ
@given(payload=st.binary(max_size=200), header=st.sampled_from([good_header(), NO_KID_HEADER]))
@example(payload=json.dumps(good_claims()).encode(), header=good_header())
@example(payload=json.dumps(good_claims()).encode(), header=NO_KID_HEADER)
def test_any_payload_bytes_correctly_signed(
    harness: Harness, payload: bytes, header: dict[str, Any]
) -> None:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}"
    signature = JWSRegistry.algorithms["RS256"].sign(signing_input.encode(), AUTH.signing_key)
    outcome = harness.request(bearer(f"{signing_input}.{b64(signature)}"))
    check_answer(outcome)
    assert outcome.status in (200, 401)
    check_admitted(outcome)


@FUZZ
@given(header=headers, claims=claim_sets)
@example(header=good_header(), claims=good_claims())
@example(header=good_header(typ="JWT"), claims=good_claims(exp=NOW - LEEWAY + 0.5))
@example(header=good_header(), claims=good_claims(exp=NOW - LEEWAY))
@example(header=good_header(), claims=good_claims(nbf=NOW + LEEWAY))
@example(header=good_header(), claims=good_claims(nbf=NOW + LEEWAY + 0.5))
def test_any_json_correctly_signed(harness: Harness, header: Any, claims: Any) -> None:
    token = sign(header, claims)
    outcome = harness.request(bearer(token))
    check_answer(outcome)
    assert outcome.status in (200, 401)
    check_admitted(outcome)
    if outcome.status == 200:  # never a header that breaks a rule that matters
        assert header_obeys_rules(header, strictly=False), header
    fits = len(token) <= MAX_TOKEN_BYTES and claims_obey_rules(claims)
    if fits and header_obeys_rules(header, strictly=True):  # a good token is never refused
        assert outcome.status == 200, (header, claims)
    if not fits:
        assert outcome.status == 401, (header, claims)


# -- 3. query strings -------------------------------------------------------------------------


def literal_query_token(query: bytes) -> bool:
    """A parameter named access_token, spelled out, with a value."""
    for pair in query.split(b"&"):
        name, equals, value = pair.partition(b"=")
        if name == b"access_token" and equals and value:
            return True
    return False


queries = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=120).map(str.encode),
    st.lists(
        st.tuples(
            st.sampled_from(["access_token", "access%5Ftoken", "a", "", "access_token[]"])
            | st.text(max_size=8),
            st.sampled_from(["", "x", VALID_TOKENS[0], "%", "%zz", "+"]) | st.text(max_size=8),
        ),
        max_size=4,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8")),
)


@FUZZ
@given(query=queries, with_header=st.booleans())
@example(query=b"access_token=abc", with_header=False)
@example(query=b"a=1&access_token=abc", with_header=True)
def test_any_query_string(harness: Harness, query: bytes, with_header: bool) -> None:
    outcome = harness.request(bearer(VALID_TOKENS[0]) if with_header else [], query)
    check_answer(outcome)
    if literal_query_token(query):
        assert outcome.status == 400
    elif with_header:
        assert outcome.status in (200, 400)
    else:
        assert outcome.status in (400, 401)
    check_admitted(outcome)
