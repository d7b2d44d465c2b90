"""How the middleware authenticates itself to the token endpoint (RFC 6749 2.3, RFC 7523).

One small protocol, ``ClientAuth``, and one class per method. None of them shows its secret in
``repr``.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote_plus

import anyio
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

from ._errors import ConfigurationError
from ._singleflight import SingleFlight

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ASSERTION_LIFETIME = 60
_MAX_ASSERTION_BYTES = 64 * 1024
_DEFAULT_ALG = {
    "RSA": "RS256",
    "P-256": "ES256",
    "P-384": "ES384",
    "P-521": "ES512",
    "Ed25519": "Ed25519",
    "Ed448": "Ed448",
}


class ClientAuth(Protocol):
    client_id: str

    async def apply(
        self, form: dict[str, str], headers: dict[str, str], token_endpoint: str
    ) -> None:
        """Add the client's credentials to a token request (any file I/O off the event loop)."""

    def secrets(self) -> tuple[str, ...]:
        """What must never be repeated in logs or error messages."""


class SecretBasic:
    """``client_secret_basic``: id and secret form-urlencoded, then base64 (RFC 6749 2.3.1)."""

    __slots__ = ("_header", "_secret", "client_id")

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self._secret = client_secret
        pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
        self._header = "Basic " + base64.b64encode(pair.encode()).decode()

    async def apply(
        self, form: dict[str, str], headers: dict[str, str], token_endpoint: str
    ) -> None:
        headers["Authorization"] = self._header

    def secrets(self) -> tuple[str, ...]:
        return (self._secret, self._header[6:])

    def __repr__(self) -> str:
        return f"SecretBasic(client_id={self.client_id!r})"


class SecretPost:
    """``client_secret_post``: id and secret in the form body."""

    __slots__ = ("_secret", "client_id")

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self._secret = client_secret

    async def apply(
        self, form: dict[str, str], headers: dict[str, str], token_endpoint: str
    ) -> None:
        form["client_id"] = self.client_id
        form["client_secret"] = self._secret

    def secrets(self) -> tuple[str, ...]:
        return (self._secret,)

    def __repr__(self) -> str:
        return f"SecretPost(client_id={self.client_id!r})"


class PrivateKeyJWT:
    """``private_key_jwt``: a fresh signed assertion per request (RFC 7523 2.2)."""

    __slots__ = ("_alg", "_key", "client_id")

    def __init__(self, client_id: str, private_key: object) -> None:
        self.client_id = client_id
        self._key, self._alg = _signing_key(private_key)

    async def apply(
        self, form: dict[str, str], headers: dict[str, str], token_endpoint: str
    ) -> None:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_endpoint,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + _ASSERTION_LIFETIME,
        }
        header = {"alg": self._alg, "typ": "JWT"}
        if self._key.kid:
            header["kid"] = self._key.kid
        assertion = jwt.encode(header, claims, self._key, algorithms=[self._alg])
        form.update(
            client_id=self.client_id,
            client_assertion_type=_ASSERTION_TYPE,
            client_assertion=assertion,
        )

    def secrets(self) -> tuple[str, ...]:
        return ()  # each assertion is fresh and short-lived; the key never leaves this object

    def __repr__(self) -> str:
        return f"PrivateKeyJWT(client_id={self.client_id!r}, alg={self._alg!r})"


class AssertionFile:
    """A client assertion read from a file that something else keeps fresh (workload identity,
    e.g. a Kubernetes projected service account token); re-read whenever the file changes."""

    __slots__ = ("_assertion", "_path", "_reading", "_stamp", "client_id")

    def __init__(self, client_id: str, path: str | os.PathLike[str]) -> None:
        self.client_id = client_id
        self._path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self._assertion = ""
        self._reading: SingleFlight[str] = SingleFlight()

    def _current(self) -> str:
        """The assertion, re-read if the file changed: blocking I/O, run in a worker thread."""
        try:
            stat = self._path.stat()
            # ctime too: a writer cannot set it back, even where mtime ticks coarsely.
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
            if stamp != self._stamp:
                if stat.st_size > _MAX_ASSERTION_BYTES:
                    raise OSError("the client assertion file is too large")
                self._assertion = self._path.read_text("utf-8").strip()
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"cannot read the client assertion file {self._path}: {exc}") from None
        return self._assertion

    async def apply(
        self, form: dict[str, str], headers: dict[str, str], token_endpoint: str
    ) -> None:
        # The file may be on a stalled network file system, or a FIFO: its I/O goes to a thread,
        # one read at a time, so that a read that hangs holds one thread, not one per exchange,
        # and each exchange waiting for it can still give up. Abandoned when its task is
        # cancelled (the loop shutting down), since a blocked read cannot be interrupted.
        read = partial(anyio.to_thread.run_sync, self._current, abandon_on_cancel=True)
        form.update(
            client_id=self.client_id,
            client_assertion_type=_ASSERTION_TYPE,
            client_assertion=await self._reading.run(self._path, read),
        )

    def secrets(self) -> tuple[str, ...]:
        return (self._assertion,)

    def __repr__(self) -> str:
        return f"AssertionFile(client_id={self.client_id!r}, path={str(self._path)!r})"


def _signing_key(private_key: object) -> tuple[RSAKey | ECKey | OKPKey, str]:
    try:
        key: Any = import_key(private_key) if isinstance(private_key, dict) else private_key
    except Exception:
        raise ConfigurationError("private_key is not a usable private JWK") from None
    if not isinstance(key, RSAKey | ECKey | OKPKey) or not key.is_private:
        raise ConfigurationError("private_key must be a private RSA, EC or OKP key")
    kind = key.key_type if isinstance(key, RSAKey) else str(key.get("crv"))
    alg = key.alg or _DEFAULT_ALG.get(kind)
    if alg is None:
        raise ConfigurationError("private_key has a curve that cannot sign client assertions")
    return key, alg


def from_environment(
    client_id: str | None,
    client_secret: str | None,
    private_key: object,
    client_assertion_file: str | os.PathLike[str] | None,
) -> tuple[str | None, str | None]:
    """``client_id`` and ``client_secret``, with ``KEYCARD_CLIENT_ID`` / ``KEYCARD_CLIENT_SECRET``
    standing in for missing ones (the single-issuer form only: with several issuers, which one
    the environment meant cannot be told)."""
    client_id = client_id or os.environ.get("KEYCARD_CLIENT_ID") or None
    if client_secret is None and private_key is None and client_assertion_file is None:
        client_secret = os.environ.get("KEYCARD_CLIENT_SECRET") or None
    return client_id, client_secret


def client_auth_from(
    *,
    client_id: str | None,
    client_secret: str | None,
    client_auth: str | None,
    private_key: object,
    client_assertion_file: str | os.PathLike[str] | None,
) -> ClientAuth | None:
    """The configured method; None when no client is configured."""
    if client_id is None:
        if client_secret or private_key is not None or client_assertion_file is not None:
            raise ConfigurationError("client credentials were given without a client_id")
        return None
    method = client_auth or (
        "private_key_jwt"
        if private_key is not None or client_assertion_file is not None
        else "client_secret_basic"
    )
    if method in ("client_secret_basic", "client_secret_post"):
        if not client_secret:
            raise ConfigurationError(f"client_auth={method!r} needs a client_secret")
        return (SecretBasic if method == "client_secret_basic" else SecretPost)(
            client_id, client_secret
        )
    if method == "private_key_jwt":
        if (private_key is None) == (client_assertion_file is None):
            raise ConfigurationError(
                "client_auth='private_key_jwt' needs exactly one of private_key and "
                "client_assertion_file"
            )
        if private_key is not None:
            return PrivateKeyJWT(client_id, private_key)
        assert client_assertion_file is not None
        return AssertionFile(client_id, client_assertion_file)
    raise ConfigurationError(
        "client_auth must be 'client_secret_basic', 'client_secret_post' or 'private_key_jwt'"
    )
