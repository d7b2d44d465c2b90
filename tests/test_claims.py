"""Claims as validated tokens keep them: read-only JSON, parsed so, and what tokens repeat kept
once (asgi_delegation._claims)."""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_delegation import DelegationMiddleware
from asgi_delegation import _claims as claims_module
from asgi_delegation._claims import Common, ReadOnlyDict, freeze
from asgi_delegation._fetch import parse_json_object
from asgi_delegation.testing import LocalAuthorizationServer

RESOURCE = "http://127.0.0.1:8000/mcp"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


def frozen(raw: bytes) -> ReadOnlyDict:
    parsed = parse_json_object(raw, frozen=True)
    assert type(parsed) is ReadOnlyDict
    return parsed


def tupled(value: Any) -> Any:
    """``value`` as the read-only form should show it: arrays as tuples."""
    if isinstance(value, dict):
        return {k: tupled(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(tupled(v) for v in value)
    return value


def assert_read_only(value: Any) -> None:
    if isinstance(value, dict):
        assert type(value) is ReadOnlyDict
        for v in value.values():
            assert_read_only(v)
    else:
        assert not isinstance(value, list)
        if isinstance(value, tuple):
            for v in value:
                assert_read_only(v)


@given(json_objects)
def test_parsed_claims_are_the_json_read_only_all_the_way_down(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    parsed = parse_json_object(raw, frozen=True)
    assert parsed == tupled(obj)
    assert_read_only(parsed)
    assert json.loads(json.dumps(parsed)) == json.loads(raw)  # serializes as the same JSON
    assert freeze(obj) == parsed
    assert_read_only(freeze(obj))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("sub", "mallory"),
        lambda c: c.__delitem__("sub"),
        lambda c: c.update(sub="mallory"),
        lambda c: c.setdefault("new", 1),
        lambda c: c.pop("sub"),
        lambda c: c.popitem(),
        lambda c: c.clear(),
        lambda c: c.__ior__({"sub": "mallory"}),
        lambda c: c["nested"].__setitem__("x", 2),
    ],
)
def test_every_mutator_raises(mutate: Any) -> None:
    claims = frozen(b'{"sub": "alice", "nested": {"x": 1}, "aud": ["a", "b"]}')
    with pytest.raises(TypeError, match="read-only"):
        mutate(claims)
    assert claims == {"sub": "alice", "nested": {"x": 1}, "aud": ("a", "b")}


def test_copies_pickles_and_merges_behave() -> None:
    claims = frozen(b'{"sub": "alice", "nested": {"x": [1]}}')
    assert copy.copy(claims) is claims
    assert copy.deepcopy(claims) is claims
    mutable = claims.copy()
    mutable["sub"] = "bob"  # a copy is the caller's own, and a plain dict
    assert type(mutable) is dict
    assert claims["sub"] == "alice"
    merged = claims | {"extra": 1}
    assert type(merged) is dict
    assert merged["extra"] == 1
    assert "extra" not in claims
    again = pickle.loads(pickle.dumps(claims))  # noqa: S301 (its own bytes)
    assert again == claims
    assert type(again) is ReadOnlyDict
    with pytest.raises(TypeError):
        again["sub"] = "mallory"


def test_duplicate_member_names_are_refused_at_every_depth() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        frozen(b'{"sub": "a", "sub": "b"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        frozen(b'{"act": {"sub": "a", "sub": "b"}}')


def test_registered_names_are_one_string_however_many_tokens() -> None:
    first = frozen(b'{"iss": "x", "sub": "a", "custom": 1}')
    second = frozen(b'{"iss": "x", "sub": "b", "custom": 2}')
    names = {id(k): k for k in first}
    shared = [k for k in second if id(k) in names]
    assert sorted(shared) == ["iss", "sub"]  # a name outside the table is the parser's own


def test_common_values_are_kept_once_and_the_tables_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = Common({"admin": frozenset({"read"})})
    one = frozen(b'{"iss": "https://as.example", "scope": "admin", "sub": "a"}')
    two = frozen(b'{"iss": "https://as.example", "scope": "admin", "sub": "b"}')
    assert one["iss"] is not two["iss"]
    common.share(one)
    common.share(two)
    assert one["iss"] is two["iss"]
    assert one["scope"] is two["scope"]
    assert two["sub"] == "b"
    scopes, granted = common.scopes(frozenset({"admin"}))
    assert granted == {"admin", "read"}
    assert common.scopes(frozenset({"admin"}))[0] is scopes
    monkeypatch.setattr(claims_module, "_MAX_SHARED", 1)  # full: values are kept as they came
    third = frozenset({"write"})
    assert common.scopes(third)[0] is third
    assert common.scopes(frozenset({"write"}))[0] is not third
    other = frozen(b'{"iss": "https://other.example"}')
    common.share(other)
    assert other["iss"] == "https://other.example"  # and not kept
    assert len(common._strings) == 2
    assert len(common._scopes) == 1


async def test_tokens_validated_through_the_middleware_share_what_they_repeat() -> None:
    auth = LocalAuthorizationServer()
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["state"]["access_context"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = DelegationMiddleware(
        app, issuer=auth.issuer, resource=RESOURCE, http_client=auth.http_client()
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://127.0.0.1:8000"
    ) as http:
        for user in ("alice", "bob"):
            token = auth.mint(user, audience=RESOURCE, scope="read write")
            answer = await http.get("/", headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 204
    await middleware.aclose()
    alice, bob = seen
    assert (alice.subject, bob.subject) == ("alice", "bob")
    assert alice.claims["iss"] is bob.claims["iss"]
    assert alice.claims["aud"] is bob.claims["aud"]
    assert alice.claims["client_id"] is bob.claims["client_id"]
    assert alice._valid.granted is bob._valid.granted
    with pytest.raises(TypeError):
        alice.claims["sub"] = "bob"


@given(
    obj=json_objects,
    before=st.sampled_from(["", " ", "\n\t "]),
    after=st.sampled_from(["", " ", "\r\n", "x", "{}", " 1", ","]),
    frozen=st.booleans(),
)
def test_the_parser_agrees_with_json_loads_on_what_surrounds_the_value(
    obj: dict[str, Any], before: str, after: str, frozen: bool
) -> None:
    text = before + json.dumps(obj) + after
    try:
        expected: Any = json.loads(text)
    except ValueError:
        expected = ValueError
    try:
        got: Any = parse_json_object(text.encode(), frozen=frozen)
    except ValueError:
        got = ValueError
    assert got == (tupled(expected) if frozen and expected is not ValueError else expected)
