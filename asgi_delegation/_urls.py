"""Checks and constructions for the URLs the middleware is configured with or discovers.

Every URL the middleware fetches comes from configuration or from the issuer's own metadata,
never from request data; this module makes sure each one is safe to fetch.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import httpx

from ._errors import ConfigurationError

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_url(url: object, what: str) -> str:
    """Return ``url`` if it is an absolute https URL (or http on a loopback host).

    Raises :class:`ConfigurationError` naming ``what`` otherwise. No fragment, no userinfo.
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"{what} must be a non-empty URL string")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ConfigurationError(f"{what} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"{what} is not a valid URL: {exc}") from None
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        # urllib's parser is the laxer one; what httpx refuses could never be fetched. Its
        # message quotes the URL: not repeated.
        raise ConfigurationError(f"{what} is not a valid URL") from None
    if not host:
        raise ConfigurationError(f"{what} must be an absolute URL with a host")
    if parts.fragment or "#" in url:
        raise ConfigurationError(f"{what} must not have a fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(f"{what} must not carry credentials")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and is_loopback_host(host):
        return url
    if parts.scheme == "http":
        raise ConfigurationError(f"{what} must use https:// (http:// only on loopback hosts)")
    raise ConfigurationError(f"{what} must be an https:// URL")


def well_known_urls(base: str, suffix: str) -> tuple[str, str]:
    """The RFC 8414 / RFC 9728 "path insertion" URL for ``base``, and the root one.

    ``https://as.example/tenant`` with ``oauth-authorization-server`` gives
    ``https://as.example/.well-known/oauth-authorization-server/tenant``.
    For a base without a path both are the same.
    """
    parts = urlsplit(base)
    path = parts.path.rstrip("/") if parts.path != "/" else ""
    origin = f"{parts.scheme}://{parts.netloc}"
    root = f"{origin}/.well-known/{suffix}"
    return (f"{root}{path}" if path else root), root


def url_path(url: str) -> str:
    """The path of ``url``, ``""`` for a bare origin or ``/``."""
    path = urlsplit(url).path
    return "" if path in ("", "/") else path
