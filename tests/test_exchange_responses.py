"""What the middleware makes of every kind of token endpoint answer (RFC 8693 2.2, RFC 6749
5.1/5.2): one scripted answer per row, one exchange through the gateway, the exact outcome, whether
it is cached, and that nothing secret leaks into an error."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

import pytest

from asgi_delegation import (
    ExchangeDenied,
    ExchangeError,
    ExchangeUnavailable,
    Grant,
)
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import CLIENT_SECRET, GITHUB, Clock, Gateway

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
#: The access token the scripted answers issue: long enough to be recognisably a token.
UPSTREAM = "upstream-at-" + "4f1c9e07b2d84a6c" * 3
REFRESH = "upstream-rt-" + "a7d3e5f90c1b2468" * 3
DAY = 86400.0
MISSING = object()


def ok(**changes: object) -> dict[str, Any]:
    """A well-formed RFC 8693 answer, with members changed (``MISSING`` removes one)."""
    body: dict[str, Any] = {
        "access_token": UPSTREAM,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 3600,
    }
    for name, value in changes.items():
        if value is MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def raw_expires_in(literal: str) -> bytes:
    """A JSON text whose ``expires_in`` is ``literal`` verbatim (what json.dumps cannot write)."""
    return (
        f'{{"access_token": "{UPSTREAM}", "issued_token_type": "{ACCESS_TOKEN_TYPE}", '
        f'"token_type": "Bearer", "expires_in": {literal}}}'
    ).encode()


def answer(status: int = 200, body: Any = b"", **headers: str) -> ScriptedAnswer:
    return ScriptedAnswer(status, body, {k.replace("_", "-"): v for k, v in headers.items()})


def denied(status: int, code: str, description: str | None = None) -> ScriptedAnswer:
    body: dict[str, Any] = {"error": code}
    if description is not None:
        body["error_description"] = description
    return answer(status, body)


# -- what a row expects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """A grant. ``lifetime``: seconds between the answer and ``expires_at`` (None: no
    ``expires_at``); ``cached``: a second identical exchange is served without a request."""

    lifetime: float | None = 3600.0
    cached: bool = True
    token_type: str = "Bearer"
    scope: str | None = None
    issued_token_type: str | None = ACCESS_TOKEN_TYPE
    access_token: str = UPSTREAM


@dataclass(frozen=True)
class Refused:
    """An exception of exactly ``kind`` with error code ``error``. ``description`` is the exact
    sanitized text when given (``...``: not checked beyond the leak checks)."""

    kind: type[ExchangeError]
    error: str
    retry_after: float | tuple[float, float] | None = None
    description: Any = ...


def unusable(description: Any = ...) -> Refused:
    return Refused(ExchangeUnavailable, "invalid_response", description=description)


def unavailable(retry_after: float | tuple[float, float] | None = None) -> Refused:
    return Refused(ExchangeUnavailable, "temporarily_unavailable", retry_after)


def refused(code: str, description: Any = None) -> Refused:
    return Refused(ExchangeDenied, code, description=description)


@dataclass(frozen=True)
class Row:
    #: The scripted answer, or a function of the subject token that makes it.
    answer: ScriptedAnswer | Callable[[str], ScriptedAnswer]
    expect: Granted | Refused
    #: The scope the exchange asks for.
    scope: str | None = None
    #: A path the middleware must never request (a redirect target).
    never_requested: str | None = None


def row(
    answer: ScriptedAnswer | Callable[[str], ScriptedAnswer],
    expect: Granted | Refused,
    id: str,
    *,
    scope: str | None = None,
    never_requested: str | None = None,
) -> Any:
    return pytest.param(Row(answer, expect, scope, never_requested), id=id)


BASE64_RUN = base64.b64encode(bytes(range(48))).decode()
LONG_TOKEN = "A" * (20 * 1024)

ROWS = [
    # -- a normal answer, and token_type --------------------------------------------------------
    row(answer(200, ok()), Granted(), "normal"),
    row(answer(200, ok(), cache_control="no-store", pragma="no-cache"), Granted(), "no-store"),
    row(answer(200, ok(token_type="bearer")), Granted(), "token_type-bearer"),
    row(answer(200, ok(token_type="BEARER")), Granted(), "token_type-BEARER"),
    row(answer(200, ok(token_type="N_A")), Granted(token_type="N_A"), "token_type-N_A"),
    row(answer(200, ok(token_type="mac")), unusable(), "token_type-mac"),
    row(answer(200, ok(token_type="DPoP")), unusable(), "token_type-DPoP"),
    row(answer(200, ok(token_type=MISSING)), unusable(), "token_type-missing"),
    row(answer(200, ok(token_type=1)), unusable(), "token_type-number"),
    row(answer(200, ok(token_type="Bearer ")), unusable(), "token_type-trailing-space"),
    # -- access_token ---------------------------------------------------------------------------
    row(answer(200, ok(access_token=MISSING)), unusable(), "access_token-missing"),
    row(answer(200, ok(access_token="")), unusable(), "access_token-empty"),
    row(answer(200, ok(access_token=12345)), unusable(), "access_token-number"),
    row(answer(200, ok(access_token=[UPSTREAM])), unusable(), "access_token-list"),
    row(answer(200, ok(access_token=UPSTREAM + " x")), unusable(), "access_token-space"),
    row(answer(200, ok(access_token=UPSTREAM + "\n")), unusable(), "access_token-newline"),
    row(answer(200, ok(access_token=UPSTREAM + "\x01")), unusable(), "access_token-control"),
    row(answer(200, ok(access_token=UPSTREAM + "é")), unusable(), "access_token-non-ascii"),
    row(answer(200, ok(access_token=LONG_TOKEN)), unusable(), "access_token-20KB"),
    row(
        answer(200, ok(access_token="B" * 16384)),
        Granted(access_token="B" * 16384),
        "access_token-16KiB-exactly",
    ),
    # -- expires_in -----------------------------------------------------------------------------
    row(answer(200, ok(expires_in=3600)), Granted(3600), "expires_in-int"),
    row(answer(200, ok(expires_in=3600.5)), Granted(3600.5), "expires_in-float"),
    row(answer(200, ok(expires_in="3600")), Granted(3600), "expires_in-numeric-string"),
    row(answer(200, ok(expires_in=" 120 ")), Granted(120), "expires_in-padded-string"),
    row(answer(200, ok(expires_in="soon")), Granted(None), "expires_in-non-numeric-string"),
    row(answer(200, ok(expires_in="NaN")), Granted(None), "expires_in-string-NaN"),
    row(answer(200, ok(expires_in=MISSING)), Granted(None), "expires_in-missing"),
    row(answer(200, ok(expires_in=0)), Granted(0, cached=False), "expires_in-zero"),
    row(answer(200, ok(expires_in=-30)), Granted(0, cached=False), "expires_in-negative"),
    row(answer(200, ok(expires_in=3)), Granted(3, cached=False), "expires_in-inside-skew"),
    # A raw NaN is not JSON (RFC 8259 6): the whole answer is refused like any non-JSON body.
    row(answer(200, raw_expires_in("NaN")), unusable(), "expires_in-raw-NaN"),
    row(answer(200, raw_expires_in("Infinity")), unusable(), "expires_in-raw-Infinity"),
    # 1e999 is JSON but overflows a double: infinite, so unusable (README: cached 60 s).
    row(answer(200, raw_expires_in("1e999")), Granted(None), "expires_in-1e999"),
    row(answer(200, raw_expires_in("9" * 400)), Granted(DAY), "expires_in-400-digits"),
    row(answer(200, ok(expires_in=True)), Granted(None), "expires_in-true"),
    row(answer(200, ok(expires_in=False)), Granted(None), "expires_in-false"),
    row(answer(200, ok(expires_in=None)), Granted(None), "expires_in-null"),
    row(answer(200, ok(expires_in=[3600])), Granted(None), "expires_in-list"),
    row(answer(200, ok(expires_in=10**12)), Granted(DAY), "expires_in-huge-clamped"),
    row(answer(200, ok(expires_in="1" + "0" * 40)), Granted(DAY), "expires_in-huge-string"),
    # -- the other members ----------------------------------------------------------------------
    row(answer(200, ok(refresh_token=REFRESH)), Granted(), "refresh_token-dropped"),
    row(
        answer(200, ok(scope="read write")),
        Granted(scope="read write"),
        "scope-returned",
        scope="read write",
    ),
    row(answer(200, ok(scope="read")), Granted(scope="read"), "scope-narrowed", scope="read write"),
    row(answer(200, ok()), Granted(scope=None), "scope-not-requested-not-returned"),
    row(
        answer(200, ok()),
        Granted(scope="read"),
        "scope-requested-not-returned",
        scope="read",
    ),
    row(answer(200, ok(scope=["read"])), Granted(scope=None), "scope-not-a-string"),
    row(answer(200, ok(issued_token_type=MISSING)), Granted(issued_token_type=None), "itt-absent"),
    row(answer(200, ok(issued_token_type=42)), Granted(issued_token_type=None), "itt-number"),
    row(
        answer(200, ok(issued_token_type=JWT_TOKEN_TYPE)),
        Granted(issued_token_type=JWT_TOKEN_TYPE),
        "itt-jwt",
    ),
    row(answer(200, ok(extension={"nested": [1, 2]})), Granted(), "unknown-members-ignored"),
    # -- bodies that are not a token response ---------------------------------------------------
    row(answer(200, b"access_token=" + UPSTREAM.encode()), unusable(), "body-form-encoded"),
    row(answer(200, b"<html><body>Sign in</body></html>"), unusable(), "body-html"),
    row(answer(200, b'[{"access_token": "' + UPSTREAM.encode() + b'"}]'), unusable(), "body-array"),
    row(answer(200, b'"' + UPSTREAM.encode() + b'"'), unusable(), "body-string"),
    row(answer(200, b""), unusable(), "body-empty"),
    row(answer(200, b"\xef\xbb\xbf" + json.dumps(ok()).encode()), unusable(), "body-utf8-bom"),
    row(answer(200, b'{"access_token": "\xff"}'), unusable(), "body-not-utf8"),
    row(answer(200, ok(padding="x" * 1024 * 1024)), unusable(), "body-1MB"),
    row(answer(200, ok(padding="x" * 60 * 1024)), Granted(), "body-60KB-under-the-cap"),
    row(
        answer(200, gzip.compress(json.dumps(ok()).encode()), content_encoding="gzip"),
        unusable("the token endpoint answered a compressed body"),
        "body-gzip",
    ),
    row(answer(200, {"error": "invalid_grant"}), unusable(), "200-with-an-error"),
    row(answer(201, ok()), unusable(), "201-created"),
    # -- OAuth errors (RFC 6749 5.2) ------------------------------------------------------------
    *(
        row(denied(400, code), refused(code), f"400-{code}")
        for code in (
            "invalid_grant",
            "invalid_target",
            "invalid_scope",
            "invalid_client",
            "unauthorized_client",
            "access_denied",
            "invalid_request",
            "unsupported_grant_type",
        )
    ),
    row(denied(401, "invalid_client"), refused("invalid_client"), "401-invalid_client"),
    row(denied(403, "access_denied"), refused("access_denied"), "403-access_denied"),
    row(
        denied(400, "invalid_scope", "scope 'admin' is not grantable"),
        refused("invalid_scope", "scope 'admin' is not grantable"),
        "400-with-description",
    ),
    row(denied(400, 'invalid"grant'), unusable(), "error-code-with-quote"),
    row(denied(400, "invalid\\grant"), unusable(), "error-code-with-backslash"),
    row(denied(400, "x" * 100), unusable(), "error-code-100-chars"),
    row(denied(400, "invalid_grånt"), unusable(), "error-code-non-ascii"),
    row(denied(400, ""), unusable(), "error-code-empty"),
    row(answer(400, {"error": 42}), unusable(), "error-code-number"),
    row(answer(400, b"Bad Request"), unusable(), "400-without-json"),
    row(answer(401, b""), unusable(), "401-without-body"),
    row(answer(418, {"error": "invalid_grant"}), unusable(), "418-with-an-oauth-error"),
    # -- sanitized descriptions -----------------------------------------------------------------
    row(
        lambda subject: denied(400, "invalid_grant", f"the subject token {subject} is expired"),
        refused("invalid_grant", "the subject token [redacted] is expired"),
        "description-with-the-subject-token",
    ),
    row(
        lambda subject: denied(400, "invalid_grant", f"{'why? ' * 30}{subject}"),
        refused("invalid_grant", ...),
        "description-with-the-subject-token-after-150-chars",
    ),
    row(
        denied(400, "invalid_grant", f"issued {UPSTREAM} already"),
        refused("invalid_grant", "issued [redacted] already"),
        "description-with-an-access-token",
    ),
    row(
        denied(400, "invalid_client", f"signature {BASE64_RUN} does not verify"),
        refused("invalid_client", "signature [redacted] does not verify"),
        "description-with-a-base64-run",
    ),
    row(
        denied(400, "invalid_grant", "bad\r\nX-Injected: 1\x00\x1b[2J\x85tail\x7f"),
        refused("invalid_grant", "bad X-Injected: 1 [2J tail"),
        "description-with-control-characters",
    ),
    row(
        denied(400, "invalid_grant", "word " * 2048),
        refused("invalid_grant", "word " * 40 + "..."),
        "description-10KB",
    ),
    row(denied(400, "invalid_grant", "\x00\x01 \t"), refused("invalid_grant"), "description-blank"),
    row(
        answer(400, {"error": "invalid_grant", "error_description": 42}),
        refused("invalid_grant"),
        "description-number",
    ),
    row(
        denied(401, "invalid_client", f"client secret {CLIENT_SECRET} does not match"),
        refused("invalid_client", ...),
        "description-echoing-the-client-secret",
    ),
    # -- redirects and other statuses -----------------------------------------------------------
    row(answer(404, {"error": "not_found"}), unusable(), "404"),
    row(
        answer(302, b"", location="http://127.0.0.1/elsewhere"),
        unusable(),
        "302-not-followed",
        never_requested="/elsewhere",
    ),
    row(
        answer(307, ok(), location="http://127.0.0.1/token-moved"),
        unusable(),
        "307-not-followed",
        never_requested="/token-moved",
    ),
    row(answer(500, {"error": "server_error"}), unavailable(), "500"),
    row(answer(502, b"<html>Bad Gateway</html>"), unavailable(), "502"),
    row(answer(503, b""), unavailable(), "503"),
    row(answer(504, b""), unavailable(), "504"),
    row(answer(429, {"error": "slow_down"}), unavailable(), "429"),
    row(answer(503, b"", retry_after="7"), unavailable(7.0), "503-retry-after-7"),
    row(answer(429, b"", retry_after="7"), unavailable(7.0), "429-retry-after-7"),
    row(
        lambda _: answer(429, b"", retry_after=formatdate(time.time() + 120, usegmt=True)),
        unavailable((118.0, 120.0)),
        "429-retry-after-http-date",
    ),
    row(
        lambda _: answer(503, b"", retry_after=formatdate(time.time() - 600, usegmt=True)),
        unavailable(0.0),
        "503-retry-after-past-date",
    ),
    row(answer(503, b"", retry_after="99999999999"), unavailable(3600.0), "retry-after-capped"),
    row(answer(503, b"", retry_after="soon"), unavailable(None), "retry-after-garbage"),
    row(answer(503, b"", retry_after="-5"), unavailable(None), "retry-after-negative"),
]


# -- the harness -------------------------------------------------------------------------------


def recording_app(outcomes: list[Grant | ExchangeError]) -> Any:
    """``GET /exchange?resource=R&scope=S``: one exchange; the Grant or the ExchangeError is
    appended to ``outcomes`` (the objects themselves, not a JSON rendering)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        ctx = scope["state"]["access_context"]
        params = dict(parse_qsl(scope["query_string"].decode()))
        document: dict[str, Any] = {"grants": []}
        try:
            grant = await ctx.exchange(params["resource"], scope=params.get("scope"))
        except ExchangeError as exc:
            outcomes.append(exc)
            document["error"] = {"class": type(exc).__name__, "error": exc.error}
        else:
            outcomes.append(grant)
            document["grants"].append({"resource": grant.resource})
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def make_gateway(
    gateway_factory: Callable[..., Gateway], **options: Any
) -> tuple[Gateway, list[Grant | ExchangeError]]:
    outcomes: list[Grant | ExchangeError] = []
    return gateway_factory(app=recording_app(outcomes), **options), outcomes


def secrets_of(subject_token: str, scripted: ScriptedAnswer) -> list[str]:
    """What must never appear in an error: the caller's token, the client secret, and the
    access token the scripted answer carried."""
    found = [subject_token, CLIENT_SECRET, UPSTREAM]
    if isinstance(scripted.body, dict):
        issued = scripted.body.get("access_token")
        if isinstance(issued, str) and len(issued) >= 8:
            found.append(issued.strip())
    return found


def check_grant(grant: Grant | ExchangeError, expect: Granted, start: float, end: float) -> None:
    assert isinstance(grant, Grant), f"expected a grant, got {grant!r}"
    assert grant.access_token == expect.access_token
    assert grant.token_type == expect.token_type
    assert grant.scope == expect.scope
    assert grant.issued_token_type == expect.issued_token_type
    assert grant.resource == GITHUB
    assert not hasattr(grant, "refresh_token")
    if expect.lifetime is None:
        assert grant.expires_at is None
    else:
        assert grant.expires_at is not None
        assert start + expect.lifetime <= grant.expires_at <= end + expect.lifetime
        assert grant.expires_at <= end + DAY  # never trusted for longer than a day
    shown = repr(grant)
    assert expect.access_token not in shown
    assert REFRESH not in shown


def check_error(error: Grant | ExchangeError, expect: Refused, secrets: list[str]) -> None:
    assert type(error) is expect.kind, f"expected {expect.kind.__name__}, got {error!r}"
    assert isinstance(error, ExchangeError)
    assert error.error == expect.error
    assert error.resource == GITHUB
    if isinstance(expect.retry_after, tuple):
        assert error.retry_after is not None
        assert expect.retry_after[0] <= error.retry_after <= expect.retry_after[1]
    else:
        assert error.retry_after == expect.retry_after
    description = error.error_description
    if expect.description is not ...:
        assert description == expect.description
    if description is not None:
        assert len(description) <= 203
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in description)
    shown = [str(error), repr(error), description or "", *map(str, error.args)]
    for secret in secrets:
        for text in shown:
            assert secret not in text


@pytest.mark.parametrize("case", ROWS)
async def test_token_endpoint_answer(
    case: Row,
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, exchange_attempts=1)
    scripted = case.answer(token) if callable(case.answer) else case.answer
    auth.token_answers.append(scripted)
    start = time.time()
    await gateway.exchange(token, GITHUB, case.scope)
    end = time.time()
    assert auth.requests["/token"] == 1
    assert auth.token_answers == []
    first = outcomes[-1]
    if isinstance(case.expect, Granted):
        check_grant(first, case.expect, start, end)
    else:
        check_error(first, case.expect, secrets_of(token, scripted))

    # The same exchange again: from the cache, or (failures and short-lived grants) a new
    # request, which the real token endpoint answers.
    await gateway.exchange(token, GITHUB, case.scope)
    second = outcomes[-1]
    if isinstance(case.expect, Granted) and case.expect.cached:
        assert auth.requests["/token"] == 1
        assert second is first
    else:
        assert auth.requests["/token"] == 2
        assert isinstance(second, Grant)
        claims = auth.verify(second.access_token)
        assert claims is not None
        assert (claims["sub"], claims["aud"]) == ("alice", GITHUB)
    if case.never_requested is not None:
        assert auth.requests[case.never_requested] == 0


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 40


# -- retries, and what is (not) cached ---------------------------------------------------------


async def test_429_then_200_is_retried(
    auth: LocalAuthorizationServer, gateway_factory: Callable[..., Gateway], token: str
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, exchange_attempts=2)
    auth.token_answers += [answer(429, b"", retry_after="0"), answer(200, ok())]
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 2
    grant = outcomes[-1]
    assert isinstance(grant, Grant)
    assert grant.access_token == UPSTREAM
    assert auth.token_answers == []


async def test_every_attempt_unavailable(
    auth: LocalAuthorizationServer, gateway_factory: Callable[..., Gateway], token: str
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, exchange_attempts=3)
    auth.token_answers += [answer(503, b"", retry_after="0")] * 3 + [answer(200, ok())]
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 3
    error = outcomes[-1]
    assert type(error) is ExchangeUnavailable
    assert (error.error, error.retry_after) == ("temporarily_unavailable", 0.0)
    assert len(auth.token_answers) == 1  # the fourth answer was never asked for


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_a_denial_is_not_retried(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    status: int,
) -> None:
    gateway, outcomes = make_gateway(gateway_factory)  # the default: 3 attempts
    auth.token_answers += [denied(status, "invalid_grant"), answer(200, ok())]
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 1
    error = outcomes[-1]
    assert type(error) is ExchangeDenied
    assert error.error == "invalid_grant"
    assert len(auth.token_answers) == 1


async def test_an_unusable_answer_is_not_retried(
    auth: LocalAuthorizationServer, gateway_factory: Callable[..., Gateway], token: str
) -> None:
    gateway, outcomes = make_gateway(gateway_factory)
    auth.token_answers += [answer(200, b"<html>"), answer(200, ok())]
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 1
    assert isinstance(outcomes[-1], ExchangeUnavailable)
    assert outcomes[-1].error == "invalid_response"


@pytest.mark.parametrize(
    "failure",
    [denied(400, "invalid_grant"), answer(503, b""), answer(200, b"{}")],
    ids=["denied", "unavailable", "unusable"],
)
async def test_failures_are_not_cached(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    failure: ScriptedAnswer,
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, exchange_attempts=1)
    auth.token_answers += [failure, answer(200, ok())]
    await gateway.exchange(token, GITHUB)
    assert isinstance(outcomes[-1], ExchangeError)
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 2
    grant = outcomes[-1]
    assert isinstance(grant, Grant)
    assert grant.access_token == UPSTREAM
    await gateway.exchange(token, GITHUB)  # now the grant is cached
    assert auth.requests["/token"] == 2
    assert outcomes[-1] is grant


@pytest.mark.parametrize(
    "expires_in", [MISSING, None, "soon", True], ids=["missing", "null", "non-numeric", "true"]
)
async def test_an_unknown_lifetime_is_cached_for_a_minute_only(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    clock: Clock,
    expires_in: object,
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, refresh_margin=0)
    auth.token_answers.append(answer(200, ok(expires_in=expires_in)))
    await gateway.exchange(token, GITHUB)
    first = outcomes[-1]
    assert isinstance(first, Grant)
    assert first.expires_at is None
    clock.advance(50)
    await gateway.exchange(token, GITHUB)
    assert outcomes[-1] is first
    assert auth.requests["/token"] == 1
    clock.advance(10)  # 60 s: past the minute (less the 5 s skew)
    await gateway.exchange(token, GITHUB)
    assert auth.requests["/token"] == 2
    assert isinstance(outcomes[-1], Grant)
    assert outcomes[-1] is not first


async def test_a_huge_lifetime_is_trusted_for_a_day_at_most(
    auth: LocalAuthorizationServer,
    gateway_factory: Callable[..., Gateway],
    token: str,
    clock: Clock,
) -> None:
    gateway, outcomes = make_gateway(gateway_factory, refresh_margin=0)
    auth.token_answers.append(answer(200, ok(expires_in=10**9)))
    await gateway.exchange(token, GITHUB)
    grant = outcomes[-1]
    assert isinstance(grant, Grant)
    assert grant.expires_at is not None
    assert grant.expires_at <= time.time() + clock.offset + DAY
    # The caller's token lives 300 s, so the cache is looked at before it expires.
    clock.advance(200)
    await gateway.exchange(token, GITHUB)
    assert outcomes[-1] is grant
    assert auth.requests["/token"] == 1
