"""Token exchange under interleavings: users with several tokens, resources, scopes, grant
lifetimes, clock moves, key rotations, token endpoint failures and cancelled callers.

The security invariant: an exchange never returns a grant for another user, another resource or
another scope. Beside it: concurrent identical exchanges share one token request, a grant past its
lifetime is exchanged again, a cancelled caller does not hurt the others, nothing hangs.

The token endpoint sits behind a gate (``GatedAuthorizationServer``): a batch of exchanges is
started, the test waits until every task is blocked (at the gate, on a shared flight, or done),
cancels some callers, then opens the gate. So whether a caller found a grant in the cache or
joined a flight does not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from asgi_delegation import DelegationMiddleware, ExchangeDenied, ExchangeError, Grant, _clock
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB,
    GOOGLE,
    RESOURCE,
    SLACK,
    Gateway,
    exchanger_of,
    read_body,
)

Key = tuple[str, str, str | None]  # (subject token, resource, normalized scope)

REFRESH_MARGIN = 30.0
EXPIRY_SKEW = 5.0  # documented: a grant this close to expiring is no longer handed out
# Documented: a refresh that did not replace the grant is retried after 1 s, jittered down to
# half, doubling up to 30 s.
RETRY_BASE, RETRY_CAP = 1.0, 30.0
USER_TOKEN_LIFETIME = 10**6  # minted with the real clock; the package clock runs far ahead


def normalized(scope: str | None) -> str | None:
    """RFC 6749 3.3: a scope is a set of space-separated tokens; the empty set is no scope."""
    if scope is None:
        return None
    return " ".join(sorted(set(scope.split()))) or None


def check_grant(
    auth: LocalAuthorizationServer,
    grant: Grant | dict[str, Any],
    user: str,
    resource: str,
    scope: str | None,
) -> None:
    """The grant (or its JSON form) is for ``user``, ``resource`` and ``scope``, as its signed
    token says."""
    if isinstance(grant, Grant):
        grant = {
            "access_token": grant.access_token,
            "resource": grant.resource,
            "scope": grant.scope,
        }
    claims = auth.verify(grant["access_token"])
    assert claims is not None, "the grant's token does not verify"
    assert claims["sub"] == user, f"{user} got {claims['sub']}'s grant"
    assert claims["aud"] == resource, f"a grant for {resource} is for {claims['aud']}"
    assert claims.get("scope") == normalized(scope), f"scope {scope!r} got {claims.get('scope')!r}"
    assert claims["act"] == {"sub": CLIENT_ID}
    assert grant["resource"] == resource
    assert grant["scope"] == normalized(scope)


# -- the token endpoint, behind a gate ---------------------------------------------------------


@dataclass
class TokenRequest:
    """One request to the token endpoint, as it arrived; ``access_token`` is what it issued."""

    subject_token: str
    resource: str | None
    scope: str | None
    access_token: str | None = None
    failed: bool = False

    @property
    def key(self) -> Key:
        return (self.subject_token, self.resource or "", self.scope)


class GatedAuthorizationServer:
    """``auth``, but token requests are recorded as they arrive, then wait while ``gate`` is
    closed, then are answered by ``auth`` (or refused with ``invalid_grant``, ``fail_next``
    times). Everything else goes straight to ``auth``."""

    def __init__(self, auth: LocalAuthorizationServer) -> None:
        self.auth = auth
        self.token_path = urlsplit(auth.token_endpoint).path
        self.gate: anyio.Event | None = None
        self.fail_next = 0
        self.requests: list[TokenRequest] = []

    def http_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.token_path:
            await self.auth(scope, receive, send)
            return
        body = await read_body(receive)
        form = dict(parse_qsl(body.decode()))
        request = TokenRequest(
            form.get("subject_token", ""),
            form.get("resource"),
            form.get("scope"),
        )
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            request.failed = True
            answer = json.dumps({"error": "invalid_grant"}).encode()
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": answer})
            return
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again() -> Any:
            return replay.pop() if replay else await receive()

        chunks: list[bytes] = []

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.auth(scope, receive_again, recording_send)
        document = json.loads(b"".join(chunks))
        request.access_token = document.get("access_token")
        request.failed = request.access_token is None


# -- asyncio helpers -------------------------------------------------------------------------


def _waiting(task: asyncio.Task[Any]) -> bool:
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and not waiter.done()


async def all_tasks_blocked() -> None:
    """``anyio.wait_all_tasks_blocked()`` without its 0.1 s polling sleep on asyncio (a few
    thousand batches would take minutes): returns once every other task waits on something and
    no callback is ready to run (a task that finished may still have to wake its awaiters).
    Only zero-length yields: nothing here waits on the wall clock."""
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0)
        if getattr(loop, "_ready", None):
            continue
        if all(task is me or _waiting(task) for task in asyncio.all_tasks()):
            return


async def finish_other_tasks() -> None:
    """Let the background refreshes started by the exchanges finish."""
    me = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not me]
    if others:
        await asyncio.wait(others)


# -- the state machine -----------------------------------------------------------------------

USERS = ("alice", "bob", "carol")
RESOURCES = (GITHUB, GOOGLE, SLACK)
SCOPES = (None, "", "read", "read write", "write  read", "read read")
LIFETIMES = (3, 8, 45, 120, 300, 3600)  # 3: never cached; 8: stale before its refresh is due
ADVANCES = (0.5, 2, 4, 10, 20, 35, 60, 100, 250, 300, 1000, 4000)


@dataclass(frozen=True)
class UserToken:
    user: str
    token: str = field(repr=False)
    n: int  # only to tell one user's tokens apart in a falsifying example


@dataclass(frozen=True)
class Call:
    who: UserToken
    resource: str
    scope: str | None

    @property
    def key(self) -> Key:
        return (self.who.token, self.resource, normalized(self.scope))


@dataclass
class Outcome:
    subject: str | None = None
    grant: Grant | None = None
    error: ExchangeError | None = None
    status: int | None = None
    done: bool = False

    @property
    def answer(self) -> str:
        """The grant's token, or the error code."""
        if self.grant is not None:
            return self.grant.access_token
        assert self.error is not None
        return self.error.error


@dataclass
class Cached:
    """What the model knows of a cache entry: the grant's token, when it was obtained (between
    ``lo`` and ``hi`` on the package's monotonic clock), its lifetime, and, once a refresh did
    not replace it (the refresh failed, or gave a grant too short-lived to be cached), between
    when and when the next refresh is due, and the backoff after that one."""

    token: str
    lo: float
    hi: float
    lifetime: float
    retry: tuple[float, float] | None = None
    backoff: float = RETRY_BASE

    def retry_later(self, start: float, end: float) -> None:
        """A refresh that ended between ``start`` and ``end`` did not replace it."""
        self.retry = (start + self.backoff / 2, end + self.backoff)
        self.backoff = min(self.backoff * 2, RETRY_CAP)

    def state(self, start: float, end: float) -> str:
        """What an exchange between ``start`` and ``end`` must do: "miss" (exchange now),
        "fresh" (serve it), "refresh" (serve it and refresh it), or "either" (too close to a
        boundary to tell)."""
        margin = min(REFRESH_MARGIN, self.lifetime / 2)
        refresh_lo, refresh_hi = self.retry or (
            self.lo + self.lifetime - margin,
            self.hi + self.lifetime - margin,
        )
        stale_lo = self.lo + self.lifetime - EXPIRY_SKEW
        stale_hi = self.hi + self.lifetime - EXPIRY_SKEW
        if start >= stale_hi:
            return "miss"
        if end < stale_lo and end < refresh_lo:
            return "fresh"
        if end < stale_lo and start >= refresh_hi:
            return "refresh"
        return "either"


async def exchange_app(scope: Any, receive: Any, send: Any) -> None:
    """Exchanges for the call at ``scope["test.call"]``, into ``scope["test.outcome"]``."""
    ctx = scope["state"]["access_context"]
    call: Call = scope["test.call"]
    outcome: Outcome = scope["test.outcome"]
    outcome.subject = ctx.subject
    try:
        outcome.grant = await ctx.exchange(call.resource, scope=call.scope)
    except ExchangeError as exc:
        outcome.error = exc
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


TOKENS = Bundle("tokens")
CALLS = st.builds(Call, TOKENS, st.sampled_from(RESOURCES), st.sampled_from(SCOPES))
# A few distinct calls, repeated: identical concurrent exchanges are the common case.
DISTINCT = st.lists(CALLS, min_size=1, max_size=4)
PICKS = st.lists(st.integers(0, 3), min_size=2, max_size=8)


class ExchangeMachine(RuleBasedStateMachine):
    tokens = TOKENS

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.auth = LocalAuthorizationServer(algorithm="ES256")  # fast keys: rotated often
        self.auth.register_client(CLIENT_ID, secret=CLIENT_SECRET)
        self.server = GatedAuthorizationServer(self.auth)
        self.client = self.server.http_client()
        self.middleware = self.runner.run(self._middleware())
        self.model: dict[Key, Cached] = {}
        self.minted = 0
        self.offset = 0.0
        self.real_now, self.real_monotonic = _clock.now, _clock.monotonic
        _clock.now = lambda: self.real_now() + self.offset
        _clock.monotonic = lambda: self.real_monotonic() + self.offset

    async def _middleware(self) -> DelegationMiddleware:
        return DelegationMiddleware(
            exchange_app,
            issuer=self.auth.issuer,
            resource=RESOURCE,
            http_client=self.client,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            refresh_margin=REFRESH_MARGIN,
            jwks_refetch_cooldown=0,  # tokens signed with a rotated-in key are accepted at once
        )

    def teardown(self) -> None:
        try:
            self.runner.run(self._close())
        finally:
            self.runner.close()
            _clock.now, _clock.monotonic = self.real_now, self.real_monotonic

    async def _close(self) -> None:
        await self.middleware.aclose()
        await finish_other_tasks()
        await self.client.aclose()

    # -- rules ------------------------------------------------------------------------------

    @initialize(target=tokens, user=st.sampled_from(USERS))
    def first_token(self, user: str) -> UserToken:
        return self._mint(user)

    @rule(target=tokens, user=st.sampled_from(USERS))
    def mint(self, user: str) -> UserToken:
        return self._mint(user)

    def _mint(self, user: str) -> UserToken:
        self.minted += 1
        token = self.auth.mint(
            user, audience=RESOURCE, scope="read write", expires_in=USER_TOKEN_LIFETIME
        )
        return UserToken(user, token, self.minted)

    @rule(call=CALLS)
    def exchange(self, call: Call) -> None:
        self._batch([call], set())

    @rule(distinct=DISTINCT, picks=PICKS)
    def exchange_concurrently(self, distinct: list[Call], picks: list[int]) -> None:
        self._batch([distinct[i % len(distinct)] for i in picks], set())

    @rule(distinct=DISTINCT, picks=PICKS, cancelled=st.sets(st.integers(0, 7), min_size=1))
    def exchange_concurrently_cancelling_some(
        self, distinct: list[Call], picks: list[int], cancelled: set[int]
    ) -> None:
        calls = [distinct[i % len(distinct)] for i in picks]
        self._batch(calls, {i for i in cancelled if i < len(calls)})

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance_clock(self, seconds: float) -> None:
        self.offset += seconds

    @rule()
    def advance_clock_into_the_refresh_margin(self) -> None:
        """Of the grants obtained lately, if their lifetime has a refresh margin before the
        expiry skew: halfway between the start of the margin and the skew."""
        lifetime = self.auth.exchange_expires_in
        margin = min(REFRESH_MARGIN, lifetime / 2)
        if margin > EXPIRY_SKEW:
            self.offset += lifetime - (margin + EXPIRY_SKEW) / 2

    @rule()
    def advance_clock_past_the_lifetime(self) -> None:
        """Of the grants obtained lately."""
        self.offset += self.auth.exchange_expires_in

    @rule(lifetime=st.sampled_from(LIFETIMES))
    def set_grant_lifetime(self, lifetime: float) -> None:
        self.auth.exchange_expires_in = lifetime

    @rule()
    def rotate_keys(self) -> None:
        self.auth.rotate_keys()

    @precondition(lambda self: self.server.fail_next == 0)
    @rule()
    def fail_next_token_request(self) -> None:
        self.server.fail_next = 1

    @invariant()
    def nothing_left_in_flight(self) -> None:
        assert self.auth.token_requests_in_flight == 0
        assert not exchanger_of(self.middleware)._flight._flights

    # -- a batch of concurrent exchanges ----------------------------------------------------

    def _batch(self, calls: list[Call], cancel: set[int]) -> None:
        lifetime = self.auth.exchange_expires_in
        first = len(self.server.requests)
        exchanges_before = len(self.auth.exchanges)
        start = _clock.monotonic()
        outcomes = self.runner.run(self._run(calls, cancel))
        end = _clock.monotonic()
        requests = self.server.requests[first:]
        self._check_callers(calls, outcomes, cancel)
        # Identical concurrent exchanges share one token request; nothing else is asked.
        per_key = Counter(request.key for request in requests)
        keys = {call.key for call in calls}
        assert set(per_key) <= keys, "a token request nobody asked for"
        assert max(per_key.values(), default=0) <= 1, "identical exchanges made two token requests"
        succeeded = sum(not request.failed for request in requests)
        assert len(self.auth.exchanges) - exchanges_before == succeeded <= len(keys)
        for key in keys:
            request = next((r for r in requests if r.key == key), None)
            finished = [o for c, o in zip(calls, outcomes, strict=True) if c.key == key]
            finished = [o for o in finished if o.grant is not None or o.error is not None]
            self._check_key(key, request, finished, start, end, lifetime)

    async def _run(self, calls: list[Call], cancel: set[int]) -> list[Outcome]:
        outcomes = [Outcome() for _ in calls]
        scopes = [anyio.CancelScope() for _ in calls]
        gate = self.server.gate = anyio.Event()
        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tasks:
                    for call, outcome, scope in zip(calls, outcomes, scopes, strict=True):
                        tasks.start_soon(self._call, call, outcome, scope)
                    await all_tasks_blocked()
                    for i in cancel:
                        scopes[i].cancel()
                    gate.set()
                await finish_other_tasks()
        finally:
            gate.set()
            self.server.gate = None
        return outcomes

    async def _call(self, call: Call, outcome: Outcome, cancel_scope: anyio.CancelScope) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/exchange",
            "raw_path": b"/exchange",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1:8000"),
                (b"authorization", b"Bearer " + call.who.token.encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "test.call": call,
            "test.outcome": outcome,
        }

        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                outcome.status = message["status"]

        with cancel_scope:
            await self.middleware(scope, receive, send)
            outcome.done = True

    def _check_callers(self, calls: list[Call], outcomes: list[Outcome], cancel: set[int]) -> None:
        now = _clock.now()
        for i, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if i not in cancel:
                assert outcome.done, f"{call} was not cancelled, yet did not finish"
                assert outcome.status == 200, f"{call} was answered {outcome.status}"
                assert outcome.grant is not None or outcome.error is not None
            if outcome.subject is not None:
                assert outcome.subject == call.who.user
            if outcome.grant is not None:
                check_grant(self.auth, outcome.grant, call.who.user, call.resource, call.scope)
                assert outcome.grant.expires_at is not None
                assert outcome.grant.expires_at > now, "an expired grant was handed out"
            if outcome.error is not None:  # only the injected failure
                assert isinstance(outcome.error, ExchangeDenied), repr(outcome.error)
                assert outcome.error.error == "invalid_grant"
                assert outcome.error.resource == call.resource

    def _check_key(
        self,
        key: Key,
        request: TokenRequest | None,
        finished: list[Outcome],
        start: float,
        end: float,
        lifetime: float,
    ) -> None:
        """Check what the callers of ``key`` got against the model, then update it."""
        entry = self.model.get(key)
        state = "miss" if entry is None else entry.state(start, end)
        event(f"cache state {state}")  # --hypothesis-show-statistics shows the mix
        answers = {o.answer for o in finished}
        assert len(answers) <= 1, "identical concurrent exchanges got different answers"
        if state == "miss":
            assert request is not None, "no token request, yet no usable grant was cached"
        if state in ("fresh", "refresh"):
            assert entry is not None
            assert answers == {entry.token}, "a cached grant was not served"
        if state == "fresh":
            assert request is None, "a fresh grant was exchanged again"
        if state == "refresh":
            assert request is not None, "a grant in its refresh margin was not refreshed"
        if request is None:
            assert entry is not None
            assert answers <= {entry.token}
            return
        new = "invalid_grant" if request.failed else request.access_token
        # Callers served from the cache all finish, cancelled or not; callers waiting for a
        # token request may all have been cancelled.
        if not answers or answers == {new}:  # they waited for the request: no usable entry
            assert state not in ("fresh", "refresh")
            cached = None
        else:  # a refresh in the background: the callers were served the cached grant
            assert entry is not None, "a grant that is neither the cached one nor the new one"
            assert answers == {entry.token}, (
                "a grant that is neither the cached one nor the new one"
            )
            cached = entry
        if state == "miss":
            assert cached is None, "the callers were not given the answer of the token request"
        if not request.failed and lifetime > EXPIRY_SKEW:
            assert request.access_token is not None
            self.model[key] = Cached(request.access_token, start, end, lifetime)
        elif cached is None:  # failed, or too short-lived to be cached
            event("exchange failed" if request.failed else "grant not cached")
            self.model.pop(key, None)
        else:  # the refresh failed, or its grant is too short-lived to be cached: the old grant
            event("refresh failed" if request.failed else "refreshed grant not cached")
            cached.retry_later(start, end)  # is served, and refreshed again after a backoff


TestExchangeMachine = ExchangeMachine.TestCase
TestExchangeMachine.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- plain concurrency tests -----------------------------------------------------------------


async def grant_app(scope: Any, receive: Any, send: Any) -> None:
    """``GET /?resource=R&scope=S``: exchanges, answers the grant (token included) or error."""
    ctx = scope["state"]["access_context"]
    params = dict(parse_qsl(scope["query_string"].decode()))
    document: dict[str, Any] = {"subject": ctx.subject}
    try:
        grant = await ctx.exchange(params["resource"], scope=params.get("scope"))
        document["grant"] = {
            "access_token": grant.access_token,
            "resource": grant.resource,
            "scope": grant.scope,
        }
    except ExchangeError as exc:
        document["error"] = {"class": type(exc).__name__, "error": exc.error}
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Gated:
    server: GatedAuthorizationServer
    gateway: Gateway

    async def exchange(self, token: str, resource: str, scope: str | None = None) -> Any:
        params = {"resource": resource, **({"scope": scope} if scope else {})}
        response = await self.gateway.get(token, path="/", params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
async def gated(auth: LocalAuthorizationServer, gateway_factory: Any) -> AsyncIterator[Gated]:
    server = GatedAuthorizationServer(auth)
    async with server.http_client() as client:
        yield Gated(server, gateway_factory(http_client=client, app=grant_app))


async def test_cancelling_the_leader_does_not_fail_the_others(
    auth: LocalAuthorizationServer, gated: Gated, token: str
) -> None:
    auth.token_latency = 0.2
    await gated.exchange(token, GOOGLE)  # the token is validated and the metadata fetched
    gated.server.gate = anyio.Event()
    answers: dict[int, Any] = {}
    scopes = [anyio.CancelScope() for _ in range(5)]

    async def caller(i: int) -> None:
        with scopes[i]:
            answers[i] = await gated.exchange(token, GITHUB, "repo")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(caller, 0)
            await anyio.wait_all_tasks_blocked()  # the leader's request is at the token endpoint
            assert len(gated.server.requests) == 2
            for i in range(1, 5):
                tasks.start_soon(caller, i)
            await anyio.wait_all_tasks_blocked()  # the others wait for its answer
            assert len(gated.server.requests) == 2
            scopes[0].cancel()
            gated.server.gate.set()
    exchanges = [e for e in auth.exchanges if e.get("resource") == GITHUB]
    assert len(exchanges) == 1
    assert sorted(answers) in ([1, 2, 3, 4], [0, 1, 2, 3, 4])
    tokens = {answer["grant"]["access_token"] for answer in answers.values()}
    assert len(tokens) == 1
    check_grant(auth, answers[1]["grant"], "alice", GITHUB, "repo")
    # The grant the cancelled leader obtained was cached: the next exchange sends nothing.
    again = await gated.exchange(token, GITHUB, "repo")
    assert again["grant"] == answers[1]["grant"]
    assert len([e for e in auth.exchanges if e.get("resource") == GITHUB]) == 1


async def test_every_waiter_gets_the_same_error(
    auth: LocalAuthorizationServer, gated: Gated, token: str
) -> None:
    await gated.exchange(token, GOOGLE)  # the token is validated and the metadata fetched
    token_path = gated.server.token_path
    before = auth.requests[token_path]
    auth.token_answers.append(ScriptedAnswer(status=400, body={"error": "invalid_grant"}))
    gated.server.gate = anyio.Event()
    answers: list[Any] = []

    async def caller() -> None:
        answers.append(await gated.exchange(token, GITHUB))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for _ in range(10):
                tasks.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            gated.server.gate.set()
    assert auth.requests[token_path] - before == 1
    assert [a["error"] for a in answers] == [
        {"class": "ExchangeDenied", "error": "invalid_grant"}
    ] * 10
    # Failures are not cached: the next exchange asks again, and succeeds.
    answer = await gated.exchange(token, GITHUB)
    assert auth.requests[token_path] - before == 2
    assert answer["grant"]["resource"] == GITHUB


async def test_two_hundred_identical_exchanges_make_one_token_request(
    auth: LocalAuthorizationServer, gated: Gated, token: str
) -> None:
    gated.server.gate = anyio.Event()
    answers: list[Any] = []

    async def caller() -> None:
        answers.append(await gated.exchange(token, SLACK, "chat:write"))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tasks:
            for _ in range(200):
                tasks.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            gated.server.gate.set()
    assert len(auth.exchanges) == 1
    assert len(answers) == 200
    assert len({a["grant"]["access_token"] for a in answers}) == 1
    check_grant(auth, answers[0]["grant"], "alice", SLACK, "chat:write")


async def test_many_users_and_resources_each_get_their_own_grant(
    auth: LocalAuthorizationServer, gated: Gated
) -> None:
    auth.token_latency = 0.01
    users = [f"user-{i}" for i in range(20)]
    tokens = {user: auth.mint(user, audience=RESOURCE, scope="read") for user in users}
    answers: dict[tuple[str, str], Any] = {}

    async def caller(user: str, resource: str) -> None:
        answers[user, resource] = await gated.exchange(tokens[user], resource)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for user in users:
                for resource in (GITHUB, GOOGLE, SLACK):
                    tasks.start_soon(caller, user, resource)
    assert len(auth.exchanges) == 60
    assert auth.token_requests_peak <= 32  # max_concurrent_exchanges
    assert len(answers) == 60
    for (user, resource), answer in answers.items():
        assert answer["subject"] == user
        check_grant(auth, answer["grant"], user, resource, None)


# Found while writing these tests, against the SingleFlight that ran the shared work in the
# leader's task under an anyio shield: a plain asyncio cancellation of the leader (task.cancel(),
# asyncio.timeout, asyncio.wait_for: no anyio cancel scope) went through the shield, cancelled the
# token request, and every waiter was handed the leader's CancelledError. Fixed since.


async def test_asyncio_cancellation_of_the_leader_does_not_fail_the_others(
    auth: LocalAuthorizationServer, gated: Gated, token: str
) -> None:
    await gated.exchange(token, GOOGLE)  # the token is validated and the metadata fetched
    gated.server.gate = anyio.Event()
    leader = asyncio.create_task(gated.exchange(token, GITHUB))
    await anyio.wait_all_tasks_blocked()  # the leader is at the token endpoint
    waiters = [asyncio.create_task(gated.exchange(token, GITHUB)) for _ in range(3)]
    await anyio.wait_all_tasks_blocked()  # the waiters wait for its answer
    leader.cancel()
    gated.server.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    await asyncio.gather(leader, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["dict"] * 3
    assert len({r["grant"]["access_token"] for r in results}) == 1  # type: ignore[index]
    assert len([e for e in auth.exchanges if e.get("resource") == GITHUB]) == 1
