"""One bounded GET of a JSON document from the authorization server.

httpx timeouts apply per network operation, so a server that trickles bytes never trips them;
the whole call therefore runs under one deadline, reads at most ``max_bytes``, and follows no
redirect (a redirect could point the middleware anywhere).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from ._claims import frozen_object

HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class FetchError(Exception):
    """A document could not be fetched; the message is safe to log (URL and reason only)."""


class BodyRefused(ValueError):
    """:func:`read_capped` would not take a response body; the message says why."""


@dataclass(frozen=True, slots=True)
class Fetched:
    document: dict[str, Any]
    cache_control: str


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


# Built once: json.loads with options constructs a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
_FROZEN_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=frozen_object)


def parse_json_object(
    raw: bytes, *, unique_keys: bool = False, frozen: bool = False
) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object; any parser failure becomes ``ValueError``.

    ``NaN`` and ``Infinity`` are refused; ``unique_keys`` refuses duplicate member names, which
    different parsers resolve differently; ``frozen`` does too, and makes the object read-only
    (claims, as validated tokens keep them).
    """
    decoder = _FROZEN_DECODER if frozen else _STRICT_DECODER if unique_keys else _DECODER
    try:
        text = raw.decode("utf-8")
        # The scanner alone takes a document with nothing around its value (a token's
        # segments); decode() also skips whitespace around it, and words every error.
        try:
            value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]  # not in typeshed
        except StopIteration:
            end = -1
        if end != len(text):
            value = decoder.decode(text)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The body of a streamed response, refusing compressed bodies and more than ``max_bytes``.

    Raises :class:`BodyRefused` with the reason."""
    # Compressed bodies could expand past the cap inside one chunk: refuse them.
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        raise BodyRefused("a compressed body")
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise BodyRefused(f"more than {max_bytes} bytes")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise BodyRefused(f"more than {max_bytes} bytes")
    return bytes(body)


async def fetch_json(
    client: httpx.AsyncClient, url: str, *, deadline: float, max_bytes: int
) -> Fetched:
    try:
        with anyio.fail_after(deadline):
            async with client.stream(
                "GET", url, headers=HEADERS, follow_redirects=False
            ) as response:
                status = response.status_code
                body = await read_capped(response, max_bytes) if status == 200 else b""
                cache_control = response.headers.get("cache-control", "")
    except TimeoutError:
        raise FetchError(f"GET {url} took longer than {deadline:g} s") from None
    except BodyRefused as exc:
        raise FetchError(f"GET {url} answered {exc}") from None
    except Exception as exc:
        # Anything httpx or the network below it raises (not only httpx.HTTPError): named by
        # its type alone, since its text may quote a URL's credentials.
        raise FetchError(f"GET {url} failed: {type(exc).__name__}") from None
    if status != 200:
        raise FetchError(f"GET {url} answered HTTP {status}")
    try:
        return Fetched(parse_json_object(body), cache_control)
    except ValueError as exc:
        raise FetchError(f"GET {url} answered {exc}") from None


def max_age(cache_control: str) -> float | None:
    """Seconds from a ``Cache-Control`` header: 0 for no-store/no-cache, None when absent."""
    result: float | None = None
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            digits = value.strip().strip('"')
            if digits.isascii() and digits.isdigit() and len(digits) <= 12:
                result = float(digits)
    return result
