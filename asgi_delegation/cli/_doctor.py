"""Check a deployment step by step, the way the delegated-access guide's troubleshooting does,
and say how to fix what fails. One line per check, in this order:

  resource URL        --resource is https:// (http:// only on loopback hosts), no #fragment
  issuer URL          --issuer likewise
  discovery           the issuer's metadata (RFC 8414, then OpenID Connect) is reachable and
                      names --issuer byte for byte (a trailing slash counts)
  JWKS                the issuer's keys are reachable, with at least one usable signing key
  token endpoint      present, and advertising the token-exchange grant (RFC 8693)
  introspection       with --introspection ISSUER: that issuer's introspection endpoint (its
                      metadata's, or --introspection-endpoint) accepts the client credentials
                      and answers a random token {"active": false} (RFC 7662)
  user token          the token validates for --resource with the middleware itself; if not,
                      why: signature, iss, aud, exp, scopes (with --token, --token-file or
                      ASGI_DELEGATION_TOKEN; skipped without one). A JWT is checked at the
                      issuer its iss names, an opaque token introspected at --introspection
  client credentials  the token endpoint accepts --client-id / --client-secret (an exchange
                      for the first --upstream; skipped without a client id or an upstream)
  upstream RESOURCE   one per --upstream: the exchange succeeds, or what it points to (not a
                      dependency of the application, user has not consented, scope mismatch...)
  redis reachable     with --redis URL, the shared grant cache (RedisGrantCache): its Redis
                      answers PING within the cache's timeout (--redis-timeout); or why not:
                      nothing listening, credentials refused (AUTH), TLS, no answer in time
  redis writable      a probe entry under the namespace is written (SET NX PX, 10 s), read back
                      and released with the cache's lease script; or why not: out of memory,
                      a read-only replica, an ACL without the command (NOPERM)
  redis keys decrypt  the keys in $ASGI_DELEGATION_ENCRYPTION_KEYS (comma-separated base64url,
                      newest first, as in encryption_keys=) open the probe, and up to 100 of the
                      cache's entries: WARN when some open with none of them (written with
                      another key, or with one already dropped)
  redis events        a message on the namespace's channel reaches a subscription: the channel
                      that carries invalidations and grant announcements between processes

--issuer may be repeated, once per issuer the middleware trusts (issuers=[...]): the issuer
URL to introspection checks then run for each, named "discovery (ISSUER)" and so on, and the
client credentials and upstream checks exchange at the user token's issuer (without a token,
the first). The --redis checks need no authorization server (--issuer and --resource are
still required): they run, and their lines appear, whatever the others find.

Each line is PASS, FAIL (followed by a "fix:" line), WARN (not a failure, also followed by a
"fix:" line) or SKIP (a check it needs did not pass). The user token, the client secret,
exchanged tokens, encryption keys and the Redis URL's password are never printed. Prefer
--token-file or ASGI_DELEGATION_TOKEN to --token, and KEYCARD_CLIENT_SECRET to
--client-secret: command lines are visible to other users of the machine (so is a password
in --redis URL).

Exit codes: 0 no check failed, 1 a check failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from hashlib import sha256
from secrets import token_urlsafe
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from .. import _clock
from .._context import AccessContext
from .._discovery import MAX_BYTES as DISCOVERY_MAX_BYTES
from .._discovery import discovery_urls
from .._errors import ConfigurationError, ExchangeError, ExchangeUnavailable
from .._exchange import TARGET, TOKEN_EXCHANGE, normalize_scope
from .._fetch import FetchError, fetch_json, parse_json_object
from .._grant import Grant
from .._introspection import _Unusable
from .._issuer import DEFAULT_ALGORITHMS, Issuer
from .._jwks import MAX_BYTES as JWKS_MAX_BYTES
from .._jwks import PRIVATE_KEY, SYMMETRIC_KEY, SigningKey, check_key
from .._middleware import DelegationMiddleware
from .._refresh import Unavailable
from .._scopes import SCOPE_TOKEN
from .._tokens import REFUSED_HEADERS, InvalidToken, unverified
from .._trust import unverified_issuer
from .._types import Message, Receive, Scope, Send
from .._urls import secure_url
from ._args import number
from ._diagnosis import _CAUSES, explain
from ._doctor_redis import (
    ENCRYPTION_KEYS_ENV,
    RedisOptions,
    _redis_secrets,
    _redis_usage_problem,
    shared_cache,
)
from ._report import FAIL, PASS, SKIP, WARN, Check

TOKEN_ENV = "ASGI_DELEGATION_TOKEN"

_CLIENT_PROBLEMS = frozenset({"invalid_client", "unauthorized_client", "client_not_configured"})


@dataclass
class Options:
    issuers: list[str]  # in configuration order
    resource: str
    token: str | None
    token_problem: str | None
    client_id: str | None
    client_secret: str | None
    upstreams: list[tuple[str, str | None]]
    scopes: list[str]
    timeout: float
    introspection: str | None = None  # the issuer of opaque tokens, one of issuers
    introspection_endpoint: str | None = None
    secrets: list[str] = field(default_factory=list)
    redis: RedisOptions | None = None


# -- arguments ----------------------------------------------------------------------------------


def _scope_list(value: str) -> list[str]:
    scopes = value.split()
    for scope in scopes:
        if not SCOPE_TOKEN.fullmatch(scope):
            raise argparse.ArgumentTypeError(f"not an OAuth scope: {scope!r}")
    return scopes


def _upstream(value: str) -> tuple[str, str | None]:
    if not value.split():
        raise argparse.ArgumentTypeError("an upstream resource is required")
    resource, *scopes = value.split()  # resources never contain spaces: the rest is scopes
    if not TARGET.fullmatch(resource):
        raise argparse.ArgumentTypeError(f"not a resource identifier: {resource!r}")
    _scope_list(" ".join(scopes))
    return resource, normalize_scope(" ".join(scopes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--issuer",
        required=True,
        action="append",
        metavar="URL",
        help="an authorization server's issuer; repeat it for each issuer the middleware "
        "trusts, in configuration order",
    )
    parser.add_argument(
        "--introspection",
        action="append",
        default=[],
        metavar="ISSUER",
        help="the --issuer whose opaque tokens are introspected (RFC 7662; introspection=True "
        "in its Issuer): check its introspection endpoint",
    )
    parser.add_argument(
        "--introspection-endpoint",
        metavar="URL",
        help="that issuer's introspection endpoint, when its metadata has none "
        "(introspection_endpoint=)",
    )
    parser.add_argument(
        "--resource",
        required=True,
        metavar="URL",
        help="this server's resource identifier, as given to DelegationMiddleware(resource=)",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        metavar="USER_TOKEN",
        help=f"a user's access token (default: ${TOKEN_ENV}; a command line is visible to "
        "other users, the environment and --token-file are not)",
    )
    token.add_argument(
        "--token-file", metavar="PATH", help="read the user's access token from PATH ('-': stdin)"
    )
    parser.add_argument(
        "--client-id",
        help="the application's client id (default: $KEYCARD_CLIENT_ID)",
    )
    parser.add_argument(
        "--client-secret",
        help="the application's client secret (default: $KEYCARD_CLIENT_SECRET)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        type=_upstream,
        metavar="'RESOURCE [SCOPE ...]'",
        help="an upstream API to exchange the token for, optionally with the scopes to request "
        "(repeatable)",
    )
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        type=_scope_list,
        metavar="SCOPE",
        help="a scope the user token must carry (repeatable, or space-separated)",
    )
    parser.add_argument(
        "--timeout",
        type=number(0.1, 120),
        default=10.0,
        metavar="SECONDS",
        help="total seconds for one request to the authorization server (default: 10)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="check the shared grant cache at this redis://, rediss:// or unix:// URL, as given "
        "to RedisGrantCache (an ACL user and password may be in it; never printed); the "
        f"encryption keys come from ${ENCRYPTION_KEYS_ENV}, comma-separated, newest first",
    )
    parser.add_argument(
        "--redis-namespace",
        metavar="NAMESPACE",
        help="the cache's namespace= (default: asgi-delegation)",
    )
    parser.add_argument(
        "--redis-timeout",
        type=number(0.01, 5),
        metavar="SECONDS",
        help="the cache's timeout= for each Redis operation (default: 0.25)",
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"checks": [...], "ok": ...} instead'
    )


def _read_token(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The user token (None without one), or what went wrong reading it."""
    if args.token is not None:
        raw, source = args.token, "--token"
    elif args.token_file is not None:
        source = f"--token-file {args.token_file}"
        try:
            if args.token_file == "-":
                raw = sys.stdin.read(1024 * 1024)
            else:
                with open(args.token_file, encoding="utf-8") as file:
                    raw = file.read(1024 * 1024)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            return None, f"cannot read {source}: {reason}"
    elif os.environ.get(TOKEN_ENV):
        raw, source = os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    else:
        return None, None
    token = raw.strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    if not token:
        return None, f"{source} holds no token"
    if not token.isascii() or any(ch.isspace() or not ch.isprintable() for ch in token):
        return None, f"{source} is not a bearer token (spaces or non-ASCII characters)"
    return token, None


def _options(args: argparse.Namespace) -> Options:
    token, problem = _read_token(args)
    client_id = args.client_id or os.environ.get("KEYCARD_CLIENT_ID") or None
    client_secret = args.client_secret or os.environ.get("KEYCARD_CLIENT_SECRET") or None
    secrets = [s for s in (token, client_secret, args.token) if s]
    redis = None
    if args.redis is not None:
        keys = os.environ.get(ENCRYPTION_KEYS_ENV)
        redis = RedisOptions(args.redis, args.redis_namespace, args.redis_timeout, keys)
        secrets += _redis_secrets(args.redis, keys)
    return Options(
        issuers=list(args.issuer),
        resource=args.resource,
        token=token,
        token_problem=problem,
        client_id=client_id,
        client_secret=client_secret,
        upstreams=list(dict.fromkeys(args.upstream)),
        scopes=list(dict.fromkeys(s for group in args.scope for s in group)),
        timeout=args.timeout,
        introspection=args.introspection[0] if args.introspection else None,
        introspection_endpoint=args.introspection_endpoint,
        secrets=secrets,
        redis=redis,
    )


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What makes the command line one the middleware could not be configured as."""
    issuers: list[str] = args.issuer
    twice = [issuer for issuer, n in Counter(issuers).items() if n > 1]
    if twice:
        return f"--issuer {twice[0]} is given twice"
    if len(args.introspection) > 1:
        # An opaque token does not say who issued it: only one issuer may be sent them.
        return "--introspection may be given once: at most one issuer takes opaque tokens"
    if args.introspection and args.introspection[0] not in issuers:
        return (
            f"--introspection {args.introspection[0]} must be one of the --issuer values "
            f"({', '.join(issuers)})"
        )
    if args.introspection_endpoint is not None and not args.introspection:
        return "--introspection-endpoint needs --introspection ISSUER"
    return _redis_usage_problem(args)


# -- output -------------------------------------------------------------------------------------


def _show(value: object, limit: int = 120) -> str:
    """A value from a remote document or a token, quoted and bounded, safe to print."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float) -> str:
    s = round(abs(seconds))
    if s < 120:
        return f"{s} s"
    if s < 2 * 3600:
        return f"{round(s / 60)} min"
    if s < 2 * 86400:
        return f"{round(s / 3600)} h"
    return f"{round(s / 86400)} days"


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def redacted(checks: Iterable[Check], secrets: Sequence[str]) -> list[Check]:
    """The checks without any of ``secrets``: no check should hold one, but if one ever did
    (say an authorization server echoing it), it is not printed. Done before rendering, so a
    secret is caught before JSON escaping could disguise it."""
    return [
        Check(
            _redact(c.name, secrets),
            c.status,
            _redact(c.detail, secrets),
            None if c.fix is None else _redact(c.fix, secrets),
        )
        for c in checks
    ]


def render(checks: Sequence[Check], *, as_json: bool) -> str:
    ok = not any(c.status == FAIL for c in checks)  # a WARN is not a failure
    if as_json:
        return json.dumps({"checks": [asdict(c) for c in checks], "ok": ok}, indent=2)
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status}  {check.name:<{width}}  {check.detail}".rstrip())
        if check.fix:
            lines.append(f"      fix: {check.fix}")
    counts = Counter(c.status for c in checks)
    warned = f", {counts[WARN]} warned" if counts[WARN] else ""
    if not ok:
        verdict = "fix the first FAIL first"
    else:
        verdict = "no failure, but see the WARN lines" if warned else "no problem found"
    lines.append(
        f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped{warned}: {verdict}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem is not None:
        print(f"asgi-delegation doctor: {problem}", file=sys.stderr)
        return 2
    options = _options(args)
    checks = redacted(asyncio.run(diagnose(options)), options.secrets)
    print(render(checks, as_json=args.json), flush=True)
    return 1 if any(c.status == FAIL for c in checks) else 0


# -- the checks ---------------------------------------------------------------------------------


def _url_check(name: str, url: str, what: str, fix: str) -> Check:
    try:
        secure_url(url, what)
        if what == "--issuer" and urlsplit(url).query:
            raise ConfigurationError("--issuer must not have a query")
    except ConfigurationError as exc:
        return Check(name, FAIL, f"{exc}: {_show(url)}", fix)
    return Check(name, PASS, url)


async def _discovery(
    client: httpx.AsyncClient, issuer: str, deadline: float
) -> tuple[Check, Mapping[str, Any] | None]:
    reasons: list[str] = []
    mismatch: tuple[str, object] | None = None
    for url in discovery_urls(issuer):
        try:
            fetched = await fetch_json(
                client, url, deadline=deadline, max_bytes=DISCOVERY_MAX_BYTES
            )
        except FetchError as exc:
            reasons.append(str(exc))
            continue
        announced = fetched.document.get("issuer")
        if announced == issuer:
            return Check("discovery", PASS, f"{url} names the issuer"), fetched.document
        if mismatch is None:
            mismatch = (url, announced)
    if mismatch is not None:
        url, announced = mismatch
        if not isinstance(announced, str):
            return Check(
                "discovery",
                FAIL,
                f"{url} has no issuer member",
                "the authorization server metadata must name its issuer (RFC 8414)",
            ), None
        detail = f"{url} names issuer {_show(announced)}, not {_show(issuer)}"
        if announced.rstrip("/") == issuer.rstrip("/"):
            fix = (
                f"trailing slash mismatch: the issuer must match byte for byte; use --issuer "
                f"{announced} and issuer={announced!r} in DelegationMiddleware"
            )
        else:
            fix = (
                f"if {announced} is your authorization server, use exactly that as --issuer "
                "and issuer=; otherwise --issuer points at another server"
            )
        return Check("discovery", FAIL, detail, fix), None
    return Check(
        "discovery",
        FAIL,
        "no authorization server metadata: " + "; ".join(reasons),
        "check --issuer (your zone's issuer URL) and that the authorization server is "
        "reachable from this host (DNS, firewall, proxy)",
    ), None


async def _jwks(
    client: httpx.AsyncClient, metadata: Mapping[str, Any], deadline: float
) -> tuple[Check, set[str | None] | None]:
    uri = metadata.get("jwks_uri")
    if uri is None:
        return Check(
            "JWKS",
            FAIL,
            "the metadata has no jwks_uri",
            "publish jwks_uri in the authorization server metadata, or pass jwks_uri= to "
            "DelegationMiddleware",
        ), None
    try:
        secure_url(uri, "the metadata's jwks_uri")
        fetched = await fetch_json(client, uri, deadline=deadline, max_bytes=JWKS_MAX_BYTES)
    except ConfigurationError as exc:
        return Check("JWKS", FAIL, f"{exc}: {_show(uri)}", "fix the issuer's metadata"), None
    except FetchError as exc:
        return Check(
            "JWKS",
            FAIL,
            str(exc),
            "the JWKS must be reachable from this host; check the network path and the "
            "authorization server's status",
        ), None
    entries = fetched.document.get("keys")
    if not isinstance(entries, list):
        return Check(
            "JWKS", FAIL, f"{uri} has no 'keys' list", "publish a JWK Set (RFC 7517)"
        ), None
    judged = [check_key(entry, DEFAULT_ALGORITHMS) for entry in entries]
    usable = [key for key in judged if isinstance(key, SigningKey)]
    dropped = Counter(reason for reason in judged if isinstance(reason, str))
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
    leaked = dropped[PRIVATE_KEY] + dropped[SYMMETRIC_KEY]
    if leaked:
        return Check(
            "JWKS",
            FAIL,
            f"{uri} publishes secret key material ({why})",
            "remove private and symmetric keys from the JWKS now, and rotate them: anyone "
            "can sign tokens with them",
        ), None
    if not usable:
        return Check(
            "JWKS",
            FAIL,
            f"{uri} has no usable signing key" + (f" ({why})" if why else ""),
            "the issuer must publish its public signing keys (RSA of 2048 bits or more, EC or "
            "Ed25519; use 'sig'; an accepted alg)",
        ), None
    detail = f"{len(usable)} usable signing key{'s' if len(usable) > 1 else ''} at {uri}"
    if dropped:
        detail += f"; {sum(dropped.values())} ignored ({why})"
    return Check("JWKS", PASS, detail), {key.kid for key in usable}


def _token_endpoint(metadata: Mapping[str, Any]) -> Check:
    name = "token endpoint"
    endpoint = metadata.get("token_endpoint")
    if endpoint is None:
        return Check(
            name,
            FAIL,
            "the metadata has no token_endpoint",
            "the authorization server must publish token_endpoint, or pass token_endpoint= "
            "to DelegationMiddleware",
        )
    try:
        secure_url(endpoint, "the metadata's token_endpoint")
    except ConfigurationError as exc:
        return Check(name, FAIL, f"{exc}: {_show(endpoint)}", "fix the issuer's metadata")
    grant_types = metadata.get("grant_types_supported")
    if grant_types is None:
        return Check(
            name,
            PASS,
            f"{endpoint} (note: grant_types_supported is not published, so token exchange "
            "support is unconfirmed)",
        )
    if not isinstance(grant_types, list) or TOKEN_EXCHANGE not in grant_types:
        return Check(
            name,
            FAIL,
            f"{endpoint}, but grant_types_supported does not list token exchange",
            f"enable the {TOKEN_EXCHANGE} grant (RFC 8693) at the authorization server",
        )
    return Check(name, PASS, f"{endpoint} supports token exchange")


_ASYMMETRIC = (
    "the authorization server must sign access tokens with an asymmetric algorithm "
    "(RS256, PS256, ES256, Ed25519, ...)"
)
_KEYS_UNREACHABLE = (
    "the issuer's keys could not be fetched",
    "check that the authorization server is reachable from this host, then retry",
)
_NO_VERDICT = (
    "the introspection endpoint gave no verdict",
    "check that it is reachable from this host and answers, then retry",
)


@dataclass(frozen=True)
class _Route:
    """The configured issuer a user token is taken to: by its signature, or introspected."""

    issuer: str
    opaque: bool


def _route(token: str, options: Options) -> _Route | None:
    """Where ``DelegationMiddleware._verify`` takes the token, or None when to no issuer: the
    same choice, made here to name the issuer and to depend on its checks. The verdict is
    still the middleware's."""
    raw = token.encode("ascii")
    if raw.count(b".") != 2:
        return None if options.introspection is None else _Route(options.introspection, True)
    if len(options.issuers) == 1:  # no routing: the issuer's validator checks iss itself
        return _Route(options.issuers[0], False)
    try:
        issuer = unverified_issuer(raw)
    except InvalidToken:
        return None
    return _Route(issuer, False) if issuer in options.issuers else None


def _where(route: _Route | None, options: Options) -> str:
    """Which issuer judged the token, when there was a choice (nothing with one issuer)."""
    if route is None or not (route.opaque or len(options.issuers) > 1):
        return ""
    return f"{'introspected' if route.opaque else 'checked'} at {route.issuer}"


def _unavailable(route: _Route | None) -> tuple[str, str]:
    return _NO_VERDICT if route is not None and route.opaque else _KEYS_UNREACHABLE


async def _refusal(
    middleware: DelegationMiddleware,
    options: Options,
    route: _Route | None,
    kids: set[str | None],
) -> tuple[str, str]:
    """Why the middleware refused the token, and how to fix it: the validator's (or the
    introspector's) own reason, or the required scopes the validated token lacks (compared as
    the middleware compares them)."""
    assert options.token is not None
    token = options.token.encode("ascii")
    try:
        # The middleware's own validation, asked directly: its answer says no more than 401.
        valid = await middleware._verify(token, sha256(token).digest())
    except InvalidToken as exc:
        return _invalid(exc, options, route, kids)
    except Unavailable:
        return _unavailable(route)
    missing = " ".join(s for s in options.scopes if s not in valid.scopes)
    return (
        f"lacks scope {missing} (it has: {' '.join(sorted(valid.scopes)) or 'none'})",
        f"the client must request scope {missing} when the user signs in, and the "
        "authorization server must grant it; or drop it from --scope",
    )


def _invalid(
    error: InvalidToken, options: Options, route: _Route | None, kids: set[str | None]
) -> tuple[str, str]:
    """The verdict told for people, quoting a JWT's unverified header and claims for context,
    and how to fix it."""
    assert options.token is not None
    reason = error.reason
    if reason == "too_large":
        return (
            f"too large ({len(options.token)} bytes, over the middleware's max_token_bytes)",
            "have the authorization server issue smaller tokens, or raise max_token_bytes",
        )
    if route is not None and route.opaque:
        return _introspected(error, route.issuer, options.resource)
    decoded = unverified(options.token.encode("ascii"))
    if reason == "malformed":
        return _malformed(options.token, decoded, error.member)
    # Past "malformed", the validator has decoded the header (and, for claim reasons, the claims).
    header, claims = decoded or (None, None)
    header, claims = header or {}, claims or {}
    if reason == "wrong_issuer":
        return _wrong_issuer(claims.get("iss"), options.issuers)
    # Only a malformed token or one of no configured issuer is refused before routing.
    assert route is not None
    issuer, resource, now = route.issuer, options.resource, _clock.now()
    fresh = f"get a fresh token from {issuer} (sign in again)"
    if reason == "algorithm":
        return (
            f"signed with alg {_show(header.get('alg'), 30)}, which is not accepted",
            _ASYMMETRIC,
        )
    if reason == "header":
        refused = ", ".join(sorted(REFUSED_HEADERS & header.keys()))
        return (f"its header carries {refused}, which are refused", fresh)
    if reason == "type":
        return (f"typ is {_show(header.get('typ'), 40)}, not an access token type", fresh)
    if reason == "unknown_key":
        return _unknown_key(header, kids, fresh)
    if reason == "expired":
        return (
            f"expired {_duration(now - claims['exp'])} ago",
            f"{fresh}; if it was just issued, check this host's clock",
        )
    if reason == "not_yet_valid":
        # Whichever of nbf and iat is later is the one at fault.
        late, name = max(((claims[n], n) for n in ("nbf", "iat") if n in claims), default=(now, ""))
        return (
            f"{name} is {_duration(late - now)} in the future",
            "check the clocks of this host and the authorization server",
        )
    if reason == "wrong_audience":
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        slash = any(isinstance(a, str) and a.rstrip("/") == resource.rstrip("/") for a in auds)
        return (
            f"aud is {_show(aud)}, expected {_show(resource)}"
            + (" (trailing slash mismatch)" if slash else ""),
            _audience_fix(resource),
        )
    return (  # bad_signature
        "the signature does not verify with the issuer's published keys",
        f"get a fresh token from {issuer}; a token from another environment, or altered, "
        "does not verify",
    )


def _audience_fix(resource: str) -> str:
    return (
        f"the client must request its token for resource={resource} (RFC 8707), and that "
        "exact Resource Identifier must be registered at the authorization server; or "
        "pass the identifier the tokens carry as --resource"
    )


def _wrong_issuer(iss: object, issuers: Sequence[str]) -> tuple[str, str]:
    shown = _show(iss)
    if len(issuers) == 1:
        return (
            f"iss is {shown}, expected {_show(issuers[0])}",
            f"get a token from {issuers[0]}, or if {shown} is the right issuer, "
            "use it as --issuer and issuer=",
        )
    return (
        f"iss is {shown}, which names none of the configured issuers ({', '.join(issuers)})",
        f"get a token from one of them, or if {shown} is an issuer to trust, add it with "
        "--issuer and as an Issuer(...) in issuers=",
    )


def _introspected(error: InvalidToken, issuer: str, resource: str) -> tuple[str, str]:
    """The introspection's verdict on an opaque token, told for people. Only the reason (and
    member) is known here: the middleware keeps nothing of an answer that disqualifies."""
    reason, fresh = error.reason, f"get a fresh token from {issuer} (sign in again)"
    if reason == "inactive":
        return (
            "the introspection endpoint says it is not active (revoked, expired, or not a "
            "token of this issuer)",
            fresh,
        )
    if reason == "expired":
        return (
            "the introspection answer's exp has passed",
            f"{fresh}; if it was just issued, check this host's clock",
        )
    if reason == "not_yet_valid":
        return (
            "the introspection answer's nbf or iat is in the future",
            "check the clocks of this host and the authorization server",
        )
    if reason == "wrong_issuer":
        return (
            f"the introspection answer names another iss than {issuer}",
            "--introspection (introspection=True) must name the issuer of the opaque tokens, "
            "and its introspection endpoint must be its own",
        )
    if reason == "wrong_audience":
        return (
            f"the introspection answer's aud does not name {_show(resource)}",
            _audience_fix(resource),
        )
    if reason == "type":
        return (
            f"the introspection answer's {error.member} says it is no bearer access token",
            "give an access token: refresh tokens and sender-constrained (cnf) ones are refused",
        )
    if error.member == "sub":
        return (
            "the introspection answer has no usable sub",
            "the authorization server must answer sub (a non-empty string) for active tokens",
        )
    return (  # malformed: characters no bearer token has (RFC 6750 b64token)
        "not a bearer token: only letters, digits and -._~+/ (then =) may appear in one",
        "give the token exactly as a client sends it",
    )


_MEMBER_RULES = (
    "the authorization server must set exp (a number; nbf and iat too, if set), sub (a "
    "non-empty string), aud and scope (strings or lists of strings), kid (a string)"
)


def _malformed(
    token: str,
    decoded: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None] | None,
    member: str | None,
) -> tuple[str, str]:
    parts = token.split(".")
    if len(parts) != 3:  # only when no issuer takes opaque tokens: they are introspected
        return (
            f"not a JWT (a signed JWT has 3 dot-separated parts, this has {len(parts)}): an "
            "opaque token, and no --introspection issuer",
            "give the token a client sends; if the authorization server issues opaque tokens, "
            "name it with --introspection ISSUER (introspection=True in the middleware), "
            "otherwise have it issue JWTs for this resource",
        )
    if decoded is None and not parts[2] and all(parts[:2]):
        return ("unsigned: its signature part is empty", _ASYMMETRIC)
    if decoded is None:
        return (
            "not a JWT: its parts are not all base64url (an empty part, padding, other characters)",
            "get a fresh token",
        )
    header, claims = decoded
    if header is None or claims is None:
        return ("not a JWT: its header or claims are not base64url JSON", "get a fresh token")
    if member is not None:
        where = header if member == "kid" else claims
        found = f"it is {_show(where[member], 40)}" if member in where else "it is missing"
        return (
            f"the {'header member' if member == 'kid' else 'claim'} {member} is unusable: " + found,
            _MEMBER_RULES,
        )
    shown = [f"kid {_show(header['kid'], 40)}"] if "kid" in header else []
    for name in ("exp", "nbf", "iat", "sub", "aud", "scope", "scp"):
        if name in claims:
            shown.append(f"{name} {_show(claims[name], 40)}")
        elif name in ("exp", "sub"):
            shown.append(f"no {name}")
    return (
        "a claim or header member is missing or of the wrong type: " + ", ".join(shown),
        _MEMBER_RULES,
    )


def _unknown_key(header: Mapping[str, Any], kids: set[str | None], fresh: str) -> tuple[str, str]:
    kid, alg = header.get("kid"), _show(header.get("alg"), 30)
    if kid is None:
        return (
            f"it names no key (no kid), and the issuer's JWKS has no single key for alg {alg}",
            "the authorization server must put the signing key's kid in the token header",
        )
    if kid not in kids:
        return (
            f"signed with key {_show(kid, 60)}, which the issuer's JWKS does not publish",
            f"{fresh}; the token may come from another environment, or a key was retired",
        )
    return (
        f"signed with key {_show(kid, 60)} and alg {alg}, which that key does not fit",
        "the authorization server must sign with an alg that fits the key (its kty, crv, alg)",
    )


async def _call(middleware: DelegationMiddleware, resource: str, token: str) -> Message:
    """One GET to ``resource`` through the middleware; the answer's start message + body."""
    parts = urlsplit(resource)
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": parts.scheme,
        "path": parts.path or "/",
        "raw_path": (parts.path or "/").encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", parts.netloc.encode()),
            (b"authorization", b"Bearer " + token.encode("ascii")),
        ],
        "client": None,
        "server": None,
    }
    answer: Message = {"status": 0, "headers": [], "body": b""}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = message.get("headers", [])
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await middleware(scope, receive, send)
    return answer


def _validity(ctx: AccessContext, options: Options, where: str) -> str:
    exp = ctx.claims.get("exp")
    left = f", expires in {_duration(exp - _clock.now())}" if isinstance(exp, int | float) else ""
    scopes = " ".join(sorted(ctx.scopes)) or "none"
    detail = (
        f"valid for {options.resource}{f' ({where})' if where else ''}: "
        f"sub {_show(ctx.subject, 60)}, scopes {scopes}{left}"
    )
    if options.scopes:
        detail += f"; has the required scope {' '.join(options.scopes)}"
    return detail


class _Capture:
    """The application behind the middleware: keeps the access context it is handed."""

    def __init__(self) -> None:
        self.context: AccessContext | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.context = scope["state"]["access_context"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _user_token(
    middleware: DelegationMiddleware,
    app: _Capture,
    options: Options,
    route: _Route | None,
    kids: set[str | None],
) -> Check:
    name, token = "user token", options.token
    assert token is not None
    where = _where(route, options)
    answer = await _call(middleware, options.resource, token)
    if app.context is not None:
        return Check(name, PASS, _validity(app.context, options, where))
    try:
        body = parse_json_object(answer["body"])
    except ValueError:
        body = {}
    said = f"{answer['status']} {body.get('error', '')}".strip() + (f"; {where}" if where else "")
    if answer["status"] == 503:
        problem = _unavailable(route)
    else:
        problem = await _refusal(middleware, options, route, kids)
    return Check(name, FAIL, f"refused ({said}): {problem[0]}", problem[1])


async def _exchange(ctx: AccessContext, resource: str, scope: str | None) -> Grant | ExchangeError:
    try:
        return await ctx.exchange(resource, scope=scope)
    except ExchangeError as exc:
        return exc


def _cause(error: ExchangeError) -> str:
    cause, _ = explain(error)
    said = error.error + (f": {error.error_description}" if error.error_description else "")
    return f"{cause} ({said})"


def _client_check(options: Options, first: str, result: Grant | ExchangeError) -> Check:
    name, client = "client credentials", _show(options.client_id)
    if isinstance(result, Grant):
        return Check(name, PASS, f"client {client} accepted by the token endpoint")
    if result.error in _CLIENT_PROBLEMS or isinstance(result, ExchangeUnavailable):
        return Check(name, FAIL, f"client {client}: {_cause(result)}", explain(result)[1])
    return Check(
        name,
        PASS,
        f"client {client} accepted (the exchange for {first} failed otherwise: see below)",
    )


def _upstream_check(resource: str, scope: str | None, result: Grant | ExchangeError) -> Check:
    name = f"upstream {resource}"
    if isinstance(result, ExchangeError):
        asked = f"; requested scope {scope}" if scope else ""
        return Check(name, FAIL, _cause(result) + asked, explain(result)[1])
    granted = f"scope {result.scope}" if result.scope else "no scope stated"
    if result.expires_at is None:
        life = "lifetime not stated"
    else:
        life = f"expires in {_duration(max(result.expires_at - _clock.now(), 0))}"
    kind = "" if result.token_type == "Bearer" else f" ({result.token_type} token)"
    return Check(name, PASS, f"granted: {granted}, {life}{kind}")


def _client_configuration(options: Options) -> Check | None:
    """A check result when the client is not usable as configured; None when it is."""
    name = "client credentials"
    if options.client_id and not options.client_secret:
        return Check(
            name,
            FAIL,
            f"client {_show(options.client_id)} has no secret",
            "set KEYCARD_CLIENT_SECRET (or --client-secret) to the Application's client secret",
        )
    if options.client_secret and not options.client_id:
        return Check(
            name,
            FAIL,
            "a client secret but no client id",
            "set KEYCARD_CLIENT_ID (or --client-id) to the Application's client id",
        )
    if not options.client_id:
        return Check(name, SKIP, "no client id (--client-id or KEYCARD_CLIENT_ID)")
    return None


@dataclass
class _IssuerReport:
    """One issuer's own checks, and what the checks after them need to know of it."""

    issuer: str
    checks: list[Check]  # issuer URL, discovery, JWKS, token endpoint
    usable: bool  # its URL passed: the middleware can be configured with it
    metadata: Mapping[str, Any] | None = None
    kids: set[str | None] | None = None  # its usable signing keys; None when JWKS failed
    exchange_ready: bool = False  # its token endpoint check passed
    # With --introspection, for that issuer: where the check probes (and the middleware sends
    # opaque tokens), then the check itself.
    introspection_endpoint: str | None = None
    introspection: Check | None = None


async def _issuer(client: httpx.AsyncClient, issuer: str, deadline: float) -> _IssuerReport:
    url = _url_check(
        "issuer URL",
        issuer,
        "--issuer",
        "use your authorization server's issuer, an https:// URL (http:// only on "
        "loopback hosts) without query or fragment",
    )
    report = _IssuerReport(issuer, [url], usable=url.status == PASS)
    if report.usable:
        discovered, report.metadata = await _discovery(client, issuer, deadline)
        report.checks.append(discovered)
    else:
        report.checks.append(Check("discovery", SKIP, "the issuer URL is unusable"))
    if report.metadata is None:
        report.checks += [
            Check("JWKS", SKIP, "discovery failed"),
            Check("token endpoint", SKIP, "discovery failed"),
        ]
    else:
        jwks, report.kids = await _jwks(client, report.metadata, deadline)
        endpoint = _token_endpoint(report.metadata)
        report.checks += [jwks, endpoint]
        report.exchange_ready = endpoint.status == PASS
    return report


async def _issuers(client: httpx.AsyncClient, options: Options) -> dict[str, _IssuerReport]:
    """Every issuer's checks, in configuration order. They run at once, so that an unreachable
    issuer costs its timeout once rather than delaying every issuer after it."""
    reports: dict[str, _IssuerReport] = {}

    async def check(issuer: str) -> None:
        reports[issuer] = await _issuer(client, issuer, options.timeout)

    async with anyio.create_task_group() as tasks:
        for issuer in options.issuers:
            tasks.start_soon(check, issuer)
    return {issuer: reports[issuer] for issuer in options.issuers}


def _introspection_endpoint(options: Options, report: _IssuerReport) -> str | Check:
    """Where the introspection issuer's opaque tokens go, or the check saying why nowhere."""
    name = "introspection"
    if not report.usable:
        return Check(name, SKIP, "the issuer URL is unusable")
    endpoint: object = options.introspection_endpoint
    if endpoint is not None:
        what = "--introspection-endpoint"
        fix = "give the introspection endpoint's https:// URL (http:// only on loopback hosts)"
    elif report.metadata is None:
        return Check(name, SKIP, "discovery failed (or give --introspection-endpoint)")
    else:
        endpoint = report.metadata.get("introspection_endpoint")
        what, fix = "the metadata's introspection_endpoint", "fix the issuer's metadata"
        if endpoint is None:
            return Check(
                name,
                FAIL,
                "the metadata has no introspection_endpoint",
                "publish introspection_endpoint in the authorization server metadata (RFC 8414), "
                "or give it with --introspection-endpoint and introspection_endpoint=",
            )
    try:
        return secure_url(endpoint, what)
    except ConfigurationError as exc:
        return Check(name, FAIL, f"{exc}: {_show(endpoint)}", fix)


_Gateway = tuple[DelegationMiddleware, _Capture]


def _gateway(
    client: httpx.AsyncClient,
    options: Options,
    resource_ok: bool,
    reports: Mapping[str, _IssuerReport],
) -> _Gateway | Check:
    """The middleware configured as the application would configure it (with every issuer
    whose URL is usable), in front of an app that keeps the access context it is handed; or,
    for the checks that need it, why there is none (a check still to be named)."""
    usable = [report for report in reports.values() if report.usable]
    if not resource_ok:
        return Check("", SKIP, "the resource URL is unusable")
    if not usable:
        return Check("", SKIP, "no issuer URL is usable")
    client_ok = _client_configuration(options) is None
    app = _Capture()
    try:
        middleware = DelegationMiddleware(
            app,
            issuers=[
                Issuer(
                    report.issuer,
                    introspection=report.issuer == options.introspection,
                    # Where the introspection check probes: the user token goes there too.
                    introspection_endpoint=report.introspection_endpoint,
                    # Explicit, so the environment is not consulted again. Without a usable
                    # client no exchange or introspection is attempted, and a placeholder
                    # keeps the middleware constructible.
                    client_id=options.client_id if client_ok else "asgi-delegation-doctor",
                    client_secret=options.client_secret if client_ok else "unused",
                )
                for report in usable
            ],
            resource=options.resource,
            required_scopes=options.scopes,
            http_client=client,
            http_timeout=options.timeout,
            exchange_timeout=options.timeout,
        )
    except ConfigurationError as exc:
        return Check("", FAIL, str(exc), "see the message")
    return middleware, app


# How the Introspector's reasons for giving no verdict begin: what they point to, and the fix.
_REACHABLE = (
    "the introspection endpoint must be reachable from this host: check its URL, the network "
    "path and the authorization server's status"
)
_NO_VERDICT_CAUSES = (
    ("refused", *_CAUSES["invalid_client"]),
    ("could not be reached", None, _REACHABLE),
    ("no answer within", None, _REACHABLE),
)
_NOT_RFC_7662 = (
    "the introspection endpoint must answer 200 with a JSON object whose active member is a "
    "boolean (RFC 7662 2.2); check that the URL is the issuer's introspection endpoint"
)


def _no_verdict(reason: str) -> tuple[str, str]:
    """What the Introspector's reason points to (": cause", or nothing), and how to fix it."""
    for start, cause, fix in _NO_VERDICT_CAUSES:
        if reason.startswith(start):
            return ("" if cause is None else f": {cause}"), fix
    return "", _NOT_RFC_7662


async def _introspection(
    gateway: _Gateway | Check, options: Options, report: _IssuerReport
) -> Check:
    """Introspect a random token, which no server issued: a working endpoint authenticates
    the client and answers it {"active": false}. The middleware's own introspector sends the
    request and judges the answer, so what passes here is what the middleware accepts."""
    name, endpoint = "introspection", report.introspection_endpoint
    assert endpoint is not None  # else report.introspection already says why there is none
    if options.client_id is None and options.client_secret is None:
        return Check(
            name,
            FAIL,
            "introspection is authenticated (RFC 7662 2.1), and there is no client id "
            "(--client-id or KEYCARD_CLIENT_ID)",
            "set KEYCARD_CLIENT_ID and KEYCARD_CLIENT_SECRET (or --client-id and "
            "--client-secret) to the Application's client credentials",
        )
    if _client_configuration(options) is not None:
        return Check(name, SKIP, "no usable client credentials")
    if isinstance(gateway, Check):
        return replace(gateway, name=name)
    introspector = gateway[0]._trusts[report.issuer]._introspector
    assert introspector is not None  # introspection=True, with a client, makes one
    probe = token_urlsafe(32)
    try:
        introspector._judge(await introspector._post(endpoint, probe))
    except _Unusable as exc:
        cause, fix = _no_verdict(str(exc))
        return Check(name, FAIL, f"{endpoint} {exc}{cause}", fix)
    except InvalidToken as exc:
        if exc.reason == "inactive":
            client = _show(options.client_id)
            detail = f"{endpoint} accepts client {client} and answers a random token inactive"
            return Check(name, PASS, detail)
    return Check(
        name,
        FAIL,
        f"{endpoint} answered that a random token, never issued, is active",
        'an introspection endpoint answers {"active": false} for a token it did not issue '
        "(RFC 7662 2.2); check that the URL is the issuer's introspection endpoint",
    )


async def diagnose(options: Options) -> list[Check]:
    resource = _url_check(
        "resource URL",
        options.resource,
        "--resource",
        "use the https:// URL clients reach this server at (http:// only on localhost, "
        "127.0.0.1 or ::1), without #fragment, registered as the Resource Identifier",
    )
    resource_ok = resource.status == PASS
    async with httpx.AsyncClient(
        follow_redirects=False, timeout=httpx.Timeout(options.timeout)
    ) as client:
        reports = await _issuers(client, options)
        home = None
        if options.introspection is not None:
            home = reports[options.introspection]
            endpoint = _introspection_endpoint(options, home)
            if isinstance(endpoint, Check):
                home.introspection = endpoint
            else:
                home.introspection_endpoint = endpoint
        gateway = _gateway(client, options, resource_ok, reports)
        try:
            if home is not None and home.introspection is None:
                home.introspection = await _introspection(gateway, options, home)
            checks = [resource]
            for report in reports.values():
                own = [*report.checks, *filter(None, [report.introspection])]
                if len(reports) > 1:  # so that the report says which issuer fails
                    own = [replace(c, name=f"{c.name} ({report.issuer})") for c in own]
                checks += own
            checks += await _delegation(options, resource_ok, gateway, reports)
        finally:
            if not isinstance(gateway, Check):
                await gateway[0].aclose()
    if options.redis is not None:  # needs nothing of the checks above
        checks += await shared_cache(options.redis)
    return checks


async def _delegation(
    options: Options,
    resource_ok: bool,
    gateway: _Gateway | Check,
    reports: Mapping[str, _IssuerReport],
) -> list[Check]:
    """The user token, client credentials and upstream checks, at the user token's issuer
    (without a token, the first)."""
    route = None if options.token is None else _route(options.token, options)
    home = reports[options.issuers[0] if route is None else route.issuer]
    user, ctx = await _user_token_check(options, resource_ok, gateway, home, route)
    configured = _client_configuration(options)
    return [user, *await _exchanges(options, ctx, configured, home.exchange_ready)]


async def _user_token_check(
    options: Options,
    resource_ok: bool,
    gateway: _Gateway | Check,
    home: _IssuerReport,
    route: _Route | None,
) -> tuple[Check, AccessContext | None]:
    """The user token check, and the access context of a valid token."""
    name = "user token"
    if options.token_problem is not None:
        fix = f"give a user's access token with --token-file PATH or ${TOKEN_ENV}"
        return Check(name, FAIL, options.token_problem, fix), None
    if options.token is None:
        return Check(name, SKIP, f"no token (--token, --token-file or ${TOKEN_ENV})"), None
    if not resource_ok:
        return Check(name, SKIP, "the resource URL is unusable"), None
    if route is not None and route.opaque:
        if home.introspection is None or home.introspection.status != PASS:
            return Check(name, SKIP, "the introspection check did not pass"), None
    elif route is not None and home.kids is None:
        keys = "the issuer's keys" if len(options.issuers) == 1 else f"the keys of {home.issuer}"
        return Check(name, SKIP, f"{keys} are not usable"), None
    if isinstance(gateway, Check):
        return replace(gateway, name=name), None
    middleware, app = gateway
    check = await _user_token(middleware, app, options, route, home.kids or set())
    return check, app.context


async def _exchanges(
    options: Options, ctx: AccessContext | None, configured: Check | None, exchange_ready: bool
) -> list[Check]:
    checks: list[Check] = []
    if configured is not None:
        checks.append(configured)
        why = "no usable client credentials"
    elif not options.upstreams:
        checks.append(Check("client credentials", SKIP, "no --upstream to exchange for"))
        why = ""
    elif not exchange_ready:
        why = "the token endpoint check did not pass"
        checks.append(Check("client credentials", SKIP, why))
    elif ctx is None:
        why = "no valid user token to exchange"
        checks.append(Check("client credentials", SKIP, why))
    else:
        (first, first_scope), *others = options.upstreams
        results = {(first, first_scope): await _exchange(ctx, first, first_scope)}
        client_check = _client_check(options, first, results[(first, first_scope)])
        checks.append(client_check)
        if client_check.status == FAIL:
            why = "the client credentials check failed"
        else:

            async def one(resource: str, scope: str | None) -> None:
                results[(resource, scope)] = await _exchange(ctx, resource, scope)

            async with anyio.create_task_group() as tasks:
                for resource, scope in others:
                    tasks.start_soon(one, resource, scope)
            return checks + [_upstream_check(r, s, results[(r, s)]) for r, s in options.upstreams]
    return checks + [Check(f"upstream {r}", SKIP, why) for r, _ in options.upstreams]
