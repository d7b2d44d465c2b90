"""Reading a token endpoint's answer (RFC 8693 2.2, RFC 6749 5.1/5.2) without trusting it.

Whatever the authorization server sends becomes either a :class:`Grant` and how long it may be
cached, or an :class:`ExchangeError` whose text is safe to log and show.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote_plus

from . import _clock
from ._errors import ExchangeDenied, ExchangeError, ExchangeUnavailable
from ._fetch import parse_json_object
from ._grant import Grant

MAX_TOKEN_CHARS = 16 * 1024
#: Lifetime assumed when ``expires_in`` is missing or unusable: short, never forever.
UNKNOWN_LIFETIME = 60.0
MAX_LIFETIME = 86400.0
MAX_RETRY_AFTER = 3600.0

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")
# Runs long enough to be a token, a secret or key material: never repeated in a description.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9+/=_.~-]{24,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_MAX_DESCRIPTION = 200


def sanitize(text: object, secrets: Iterable[str] = ()) -> str | None:
    """A server-supplied description made safe to log: none of ``secrets`` (raw or
    form-encoded), no control characters, nothing shaped like a token, at most 200 characters."""
    if not isinstance(text, str) or not text:
        return None
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]").replace(quote_plus(secret), "[redacted]")
    text = _SECRET_LIKE.sub("[redacted]", _CONTROL.sub(" ", text[: _MAX_DESCRIPTION * 4]))
    text = text.strip()
    return (text[:_MAX_DESCRIPTION] + "...") if len(text) > _MAX_DESCRIPTION else text or None


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value[:8]), MAX_RETRY_AFTER)
    try:
        seconds = parsedate_to_datetime(value).timestamp() - _clock.now()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def lifetime(expires_in: object) -> float | None:
    """Seconds the grant lives: a number or numeric string, clamped; None when unusable."""
    if isinstance(expires_in, bool):
        return None
    if isinstance(expires_in, str):
        try:
            expires_in = float(expires_in.strip()[:32])
        except ValueError:
            return None
    if not isinstance(expires_in, int | float):
        return None
    try:
        seconds = float(expires_in)
    except OverflowError:  # an integer too large for a float
        return MAX_LIFETIME
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_LIFETIME)


def _unusable(resource: str, why: str) -> ExchangeUnavailable:
    return ExchangeUnavailable(resource, "invalid_response", f"the token endpoint answered {why}")


def error_from(
    resource: str, status: int, body: bytes, headers: Any, secrets: Iterable[str]
) -> ExchangeError:
    """The exception for a non-200 answer; ``secrets`` never appear in its description."""
    wait = retry_after(headers.get("retry-after"))
    if status == 429 or status >= 500:
        return ExchangeUnavailable(
            resource,
            "temporarily_unavailable",
            f"the token endpoint answered HTTP {status}",
            retry_after=wait,
        )
    try:
        document = parse_json_object(body)
    except ValueError:
        document = {}
    code = document.get("error")
    if status in (400, 401, 403) and isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return ExchangeDenied(
            resource, code, sanitize(document.get("error_description"), secrets), retry_after=wait
        )
    return _unusable(resource, f"HTTP {status} without an OAuth error")


def grant_from(
    resource: str, requested_scope: str | None, body: bytes
) -> tuple[Grant, float | None]:
    """The grant in a 200 answer, and its lifetime in seconds (None when unknown).

    An answer without ``scope`` granted the requested scope (RFC 6749 5.1)."""
    try:
        document = parse_json_object(body)
    except ValueError as exc:
        raise _unusable(resource, str(exc)) from None
    token = document.get("access_token")
    if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
        raise _unusable(resource, "no usable access_token")
    if len(token) > MAX_TOKEN_CHARS:
        raise _unusable(resource, "an access_token that is too large")
    token_type = document.get("token_type")
    if not isinstance(token_type, str):
        raise _unusable(resource, "no token_type")
    if token_type.lower() == "bearer":
        token_type = "Bearer"
    elif token_type != "N_A":  # RFC 8693 2.2.1: the issued token is not an access token
        raise _unusable(resource, "a token_type other than Bearer")
    seconds = lifetime(document.get("expires_in"))
    scope = document.get("scope")
    issued = document.get("issued_token_type")
    grant = Grant(
        access_token=token,
        token_type=token_type,
        expires_at=None if seconds is None else _clock.now() + seconds,
        scope=scope if isinstance(scope, str) else requested_scope,
        resource=resource,
        # Interned: every grant shares the one string its server keeps sending.
        issued_token_type=sys.intern(issued) if isinstance(issued, str) else None,
    )
    return grant, seconds
