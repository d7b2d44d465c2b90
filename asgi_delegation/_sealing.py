"""Names and sealed values for a shared store that must not be readable at rest.

Each configured 32-byte key yields two subkeys (HKDF-SHA256, distinct labels): one keys the
HMACs that name entries, one the AES-GCM that seals their values. A name therefore shows
nothing of what it names, not even to someone who can guess it (an unkeyed hash of a subject
or token would be a lookup table away), and a sealed value opens only under the name it was
sealed for, since that name is its associated data: a value copied under another name fails.

The first key seals; every key opens and names, so a lookup tries each key's name, newest
first, and rotation is adding a new first key and dropping the old one once its entries have
expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import ConfigurationError

_VERSION = b"\x01"
_NONCE = 12
_NAME_CHARS = 22  # 128 bits of HMAC, base64url


@dataclass(frozen=True, slots=True, repr=False)
class _Key:
    names: bytes
    seals: AESGCM

    def __repr__(self) -> str:
        return "_Key(...)"  # never the key material


def parse_key(value: object, what: str) -> bytes:
    """32 bytes from bytes or base64url text (padding optional); ``ConfigurationError`` else."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise ConfigurationError(f"{what} must be 32 bytes, as bytes or base64url text")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{what} is not base64url text") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text.rstrip("="):
            raise ConfigurationError(f"{what} is not base64url text")
    else:
        raise ConfigurationError(f"{what} must be 32 bytes, as bytes or base64url text")
    if len(raw) != 32:
        raise ConfigurationError(f"{what} must be 32 bytes, not {len(raw)}")
    return raw


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


class Keyring:
    def __init__(self, keys: Iterable[object], what: str = "encryption_keys") -> None:
        if isinstance(keys, str | bytes | bytearray):
            raise ConfigurationError(f"{what} must be a list of keys, newest first")
        raw = [parse_key(key, f"{what}[{i}]") for i, key in enumerate(keys)]
        if not raw:
            raise ConfigurationError(f"{what} must hold at least one key")
        if len(set(raw)) != len(raw):
            raise ConfigurationError(f"{what} holds the same key twice")
        self._keys = tuple(
            _Key(
                _derive(key, b"asgi-delegation names v1"),
                AESGCM(_derive(key, b"asgi-delegation values v1")),
            )
            for key in raw
        )

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyring({len(self._keys)} keys)"

    def names(self, label: bytes) -> list[str]:
        """``label``'s name under each key, newest first."""
        return [self.name(index, label) for index in range(len(self._keys))]

    def name(self, index: int, label: bytes) -> str:
        mac = hmac.new(self._keys[index].names, label, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode()[:_NAME_CHARS]

    def seal(self, plaintext: bytes, name: bytes) -> bytes:
        """``plaintext`` sealed with the newest key for the entry named ``name``."""
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._keys[0].seals.encrypt(nonce, plaintext, name)

    def open(self, index: int, sealed: object, name: bytes) -> bytes | None:
        """The plaintext of ``sealed``, stored under ``name`` (named with key ``index``), or None
        when it is anything else: corrupt, truncated, foreign, or sealed for another name."""
        if not isinstance(sealed, bytes) or len(sealed) < 1 + _NONCE + 16:
            return None
        if sealed[:1] != _VERSION:
            return None
        try:
            return self._keys[index].seals.decrypt(
                sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], name
            )
        except InvalidTag:
            return None
