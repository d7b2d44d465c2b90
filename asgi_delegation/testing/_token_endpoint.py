"""The token endpoint of LocalAuthorizationServer: RFC 8693 token exchange and the
client-credentials grant (RFC 6749 4.4, with RFC 8707 resources), with client authentication
(RFC 6749 2.3.1, RFC 7523), answering as a real server would; its RFC 7662 introspection
endpoint, which authenticates clients the same way; and RFC 7591 registration."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

if TYPE_CHECKING:
    from ._server import LocalAuthorizationServer

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_CREDENTIALS = "client_credentials"
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Client:
    """A client registered with LocalAuthorizationServer."""

    client_id: str
    # Out of the repr, which pytest prints when an assertion about the client fails.
    secret: str | None = field(default=None, repr=False)
    public_key: RSAKey | ECKey | OKPKey | None = None
    #: The resources this client may exchange for (its dependencies); None: any.
    allowed_resources: frozenset[str] | None = None
    seen_jtis: set[str] = field(default_factory=set)


@dataclass
class ScriptedAnswer:
    """One answer the token or introspection endpoint gives instead of doing its job (then it
    goes back to normal): any status, body and headers, or ``drop`` to break the connection
    mid-answer."""

    status: int = 200
    body: bytes | Mapping[str, Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    drop: bool = False


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


def parse_form(body: bytes) -> dict[str, str]:
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError("invalid_request", "a parameter appears more than once")
    return form


def _basic(header: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials", 401)
    return unquote_plus(client_id), unquote_plus(secret)


def authenticate(
    server: LocalAuthorizationServer,
    form: dict[str, str],
    authorization: str | None,
    endpoint: str,
) -> Client:
    """The client the request to ``endpoint`` (the URL a client assertion must be meant for)
    authenticates as; raises ``invalid_client``."""
    methods = [
        authorization is not None and authorization[:6].lower() == "basic ",
        "client_secret" in form,
        "client_assertion" in form,
    ]
    if sum(methods) != 1:
        raise OAuthError("invalid_client", "exactly one client authentication is required", 401)
    if methods[0]:
        assert authorization is not None
        client_id, secret = _basic(authorization)
    elif methods[1]:
        client_id, secret = form.get("client_id", ""), form["client_secret"]
    else:
        return _assertion_client(server, form, endpoint)
    client = server.clients.get(client_id)
    if client is None or client.secret is None or client.secret != secret:
        raise OAuthError("invalid_client", "client authentication failed", 401)
    return client


def _assertion_client(
    server: LocalAuthorizationServer, form: dict[str, str], endpoint: str
) -> Client:
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise OAuthError("invalid_client", "unsupported client_assertion_type", 401)
    assertion = form["client_assertion"]
    client = server.clients.get(form.get("client_id") or _unverified_issuer(assertion))
    if client is None or client.public_key is None:
        raise OAuthError("invalid_client", "client authentication failed", 401)
    try:
        claims = jwt.decode(assertion, client.public_key, algorithms=_ALGORITHMS).claims
    except Exception:
        raise OAuthError("invalid_client", "the client assertion is not valid", 401) from None
    now = time.time()
    if (
        claims.get("iss") != client.client_id
        or claims.get("sub") != client.client_id
        or claims.get("aud") not in (endpoint, server.issuer)
        or not isinstance(claims.get("exp"), int | float)
        or claims["exp"] <= now
        or not isinstance(claims.get("jti"), str)
        or claims["jti"] in client.seen_jtis
    ):
        raise OAuthError("invalid_client", "the client assertion is not valid", 401)
    client.seen_jtis.add(claims["jti"])
    return client


_ALGORITHMS = ["RS256", "ES256", "ES384", "ES512", "PS256", "Ed25519"]


def _unverified_issuer(assertion: str) -> str:
    # Only to find which client's key to verify with; the signature is checked next.
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("iss", ""))
    except (IndexError, ValueError, AttributeError, binascii.Error):
        return ""


def token_response(server: LocalAuthorizationServer, form: dict[str, str], client: Client) -> Any:
    """The answer to a token request; raises :class:`OAuthError`."""
    grant_type = form.get("grant_type")
    if grant_type == TOKEN_EXCHANGE:
        return _exchange(server, form, client)
    if grant_type == CLIENT_CREDENTIALS:
        return _client_credentials(server, form, client)
    raise OAuthError("unsupported_grant_type", "only token exchange and client credentials are")


def introspection_response(
    server: LocalAuthorizationServer, form: dict[str, str], authorization: str | None
) -> dict[str, Any]:
    """The answer to an RFC 7662 introspection request; raises :class:`OAuthError`.

    ``token_type_hint`` is accepted and ignored, as RFC 7662 2.1 allows: the token is looked
    up among opaque and JWT access tokens alike.
    """
    authenticate(server, form, authorization, server.introspection_endpoint)
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "the token parameter is required")
    claims = server.introspect(token)
    # Claims go over "active", so a test can make the server answer a malformed one.
    return {"active": False} if claims is None else {"active": True, **claims}


def _client_credentials(
    server: LocalAuthorizationServer, form: dict[str, str], client: Client
) -> Any:
    # A token for the client itself: the subject is the client (RFC 9068 2.2).
    resource = form.get("resource")
    requested = form.get("scope")
    _check_scope(server, resource, requested)
    claims: dict[str, Any] = {"client_id": client.client_id}
    token = server.mint(client.client_id, audience=resource, scope=requested or None, claims=claims)
    return _answer(token, 300, requested)


def _check_scope(
    server: LocalAuthorizationServer, target: str | None, requested: str | None
) -> None:
    grantable = server.grantable_scopes.get(target or "")
    if requested and grantable is not None and not set(requested.split()) <= grantable:
        raise OAuthError("invalid_scope", "the requested scope exceeds what may be granted")


def _answer(token: str, expires_in: float, scope: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": expires_in,
    }
    if scope:
        answer["scope"] = scope
    return answer


def register(server: LocalAuthorizationServer, body: bytes) -> Any:
    """RFC 7591 dynamic registration: a new confidential client; raises :class:`OAuthError`."""
    try:
        metadata = json.loads(body)
    except ValueError:
        raise OAuthError("invalid_client_metadata", "the body is not JSON") from None
    if not isinstance(metadata, dict):
        raise OAuthError("invalid_client_metadata", "the body is not a JSON object")
    method = metadata.get("token_endpoint_auth_method", "client_secret_basic")
    if method not in ("client_secret_basic", "client_secret_post"):
        raise OAuthError("invalid_client_metadata", "token_endpoint_auth_method is not supported")
    grant_types = metadata.get("grant_types", [CLIENT_CREDENTIALS])
    if not isinstance(grant_types, list) or not set(grant_types) <= {
        TOKEN_EXCHANGE,
        CLIENT_CREDENTIALS,
    }:
        raise OAuthError("invalid_client_metadata", "only client_credentials and token exchange")
    client_id, secret = uuid.uuid4().hex, secrets.token_urlsafe(24)
    server.register_client(client_id, secret=secret)
    return {
        **metadata,
        "client_id": client_id,
        "client_secret": secret,
        "client_id_issued_at": int(time.time()),
        "client_secret_expires_at": 0,
        "token_endpoint_auth_method": method,
        "grant_types": grant_types,
    }


def _exchange(server: LocalAuthorizationServer, form: dict[str, str], client: Client) -> Any:
    if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
        raise OAuthError("invalid_request", "subject_token_type must be an access token")
    # Opaque subject tokens too: the resource server exchanges what its caller sent.
    subject = server.introspect(form.get("subject_token", ""))
    # A token minted without a string sub is refused, not answered with a server error.
    if subject is None or not isinstance(subject.get("sub"), str):
        raise OAuthError("invalid_grant", "the subject token is not valid")
    resource, audience = form.get("resource"), form.get("audience")
    if server.exchange_target == "resource" and audience is not None:
        raise OAuthError("invalid_request", "the audience parameter is not supported")
    if server.exchange_target == "audience" and resource is not None:
        raise OAuthError("invalid_request", "the resource parameter is not supported")
    target = resource or audience
    if not target or (resource and audience and resource != audience):
        raise OAuthError("invalid_target", "exactly one target is required")
    if client.allowed_resources is not None and target not in client.allowed_resources:
        raise OAuthError("invalid_target", "the resource is not a dependency of the client")
    if (subject["sub"], target) in server.unconsented:
        raise OAuthError("access_denied", "the user has not consented to this resource")
    requested = form.get("scope")
    _check_scope(server, target, requested)
    expires_in = server.exchange_expires_in
    claims: dict[str, Any] = {"aud": target, "act": {"sub": client.client_id}}
    if requested:
        claims["scope"] = requested
    token = server.mint(subject["sub"], expires_in=expires_in, claims=claims)
    return _answer(token, expires_in, requested)
