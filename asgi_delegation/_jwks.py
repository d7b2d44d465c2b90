"""The issuer's signing keys (JWKS): fetched lazily, filtered, cached, refetched carefully.

Refetch rules: the set is refetched when its ``Cache-Control`` lifetime (clamped) runs out; a
token naming an unknown ``kid`` triggers one refetch at once, and after that at most one per
cooldown, so a key rotated just after start-up is picked up immediately while a flood of forged
``kid``s costs at most one fetch per cooldown. A ``kid`` confirmed absent is remembered for the
cooldown so it is rejected without any work.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cachetools import TTLCache
from joserfc.jwk import ECKey, OKPKey, RSAKey

from . import _clock
from ._audit import Auditor
from ._discovery import Discovery
from ._fetch import FetchError, fetch_json, max_age
from ._http import HTTPClient
from ._refresh import Refreshing

MAX_BYTES = 512 * 1024  # of a JWKS document
_MAX_KEYS = 64
#: The longest ``kid`` accepted, in a token header or a published key: real ones are UUIDs,
#: thumbprints or short names, far below this.
MAX_KID_LENGTH = 256
# What the kids confirmed absent may hold in all, counting each as its length plus this much
# bookkeeping: forged kids must not buy memory.
_ABSENT_BYTES = 256 * 1024
_ABSENT_ENTRY_OVERHEAD = 100
_DEFAULT_TTL = 600.0
_MIN_TTL, _MAX_TTL = 60.0, 86400.0
_MIN_RSA_BITS = 2048

# (kty, curve) each algorithm needs; None: any curve of that type.
ALGORITHM_KEYS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "ES256K": ("EC", "secp256k1"),
    "Ed25519": ("OKP", "Ed25519"),
    "Ed448": ("OKP", "Ed448"),
    "EdDSA": ("OKP", None),
}

_IMPORTERS: Mapping[str, type[RSAKey] | type[ECKey] | type[OKPKey]] = {
    "RSA": RSAKey,
    "EC": ECKey,
    "OKP": OKPKey,
}
_SIGNING_CURVES = frozenset({"P-256", "P-384", "P-521", "secp256k1", "Ed25519", "Ed448"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

VerificationKey = RSAKey | ECKey | OKPKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: VerificationKey

    def fits(self, alg: str) -> bool:
        kty, crv = ALGORITHM_KEYS[alg]
        return (
            self.kty == kty
            and (crv is None or self.crv == crv)
            and (self.alg is None or self.alg == alg)
        )


#: What :func:`check_key` says of keys that hold secret material: publishing one is a leak.
PRIVATE_KEY = "private key"
SYMMETRIC_KEY = "symmetric (oct)"


def check_key(jwk: object, algorithms: Iterable[str]) -> SigningKey | str:
    """The verification key ``jwk`` describes, or why it must not be used for signatures, in a
    few words (``PRIVATE_KEY``, ``"use 'enc'"``, ``"RSA under 2048 bits"``...)."""
    if not isinstance(jwk, dict):
        return "not an object"
    kty, crv, alg, kid = jwk.get("kty"), jwk.get("crv"), jwk.get("alg"), jwk.get("kid")
    if kty == "oct":
        return SYMMETRIC_KEY
    if not isinstance(kty, str) or kty not in _IMPORTERS:
        return f"kty {_quoted(kty)}"
    if _PRIVATE_MEMBERS & jwk.keys():
        return PRIVATE_KEY
    if jwk.get("use", "sig") != "sig":
        return f"use {_quoted(jwk.get('use'))}"
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return "key_ops without verify"
    if kty != "RSA" and crv not in _SIGNING_CURVES:
        return f"crv {_quoted(crv)}"
    if alg is not None and alg not in algorithms:
        return f"alg {_quoted(alg)} not accepted"
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        return f"kid not a string of at most {MAX_KID_LENGTH} characters"
    if kty == "RSA" and _rsa_bits(jwk.get("n")) < _MIN_RSA_BITS:
        return f"RSA under {_MIN_RSA_BITS} bits"
    try:
        key = _IMPORTERS[kty].import_key(jwk)
    except Exception:  # joserfc raises KeyError, ValueError, TypeError... on malformed keys
        return "malformed"
    return SigningKey(kid, kty, crv if kty != "RSA" else None, alg, key)


def usable_key(jwk: object, algorithms: Iterable[str]) -> SigningKey | None:
    """The verification key ``jwk`` describes, or None if it must not be used for signatures."""
    checked = check_key(jwk, algorithms)
    return checked if isinstance(checked, SigningKey) else None


def _quoted(value: object, limit: int = 20) -> str:
    """A value from a remote document, quoted and bounded (a JWKS may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rsa_bits(n: object) -> int:
    # Measured before import: joserfc would import a short key, with only a warning.
    if not isinstance(n, str) or len(n) > 4096:
        return 0
    try:
        return int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))).bit_length()
    except (ValueError, binascii.Error):
        return 0


class KeySet:
    def __init__(self, keys: Iterable[SigningKey]) -> None:
        self.keys = tuple(keys)
        self._by_kid: dict[str | None, list[SigningKey]] = {}
        for key in self.keys:
            self._by_kid.setdefault(key.kid, []).append(key)

    def knows(self, kid: str | None) -> bool:
        return kid is None or kid in self._by_kid

    def find(self, kid: str | None, alg: str) -> SigningKey | None:
        if kid is None:
            # Without a kid only an unambiguous key is used: trying several would let one forged
            # token cost several signature checks.
            fitting = [key for key in self.keys if key.fits(alg)]
            return fitting[0] if len(fitting) == 1 else None
        for key in self._by_kid.get(kid, ()):
            if key.fits(alg):
                return key
        return None


class JWKS:
    def __init__(
        self,
        discovery: Discovery,
        http: HTTPClient,
        *,
        jwks_uri: str | None,
        algorithms: frozenset[str],
        deadline: float,
        cooldown: float,
        auditor: Auditor,
    ) -> None:
        self._discovery = discovery
        self._auditor = auditor
        self._http = http
        self._jwks_uri = jwks_uri
        self._algorithms = algorithms
        self._deadline = deadline
        self._cooldown = cooldown
        self._keys = Refreshing("JWKS", self._load)
        self._last_forced = -math.inf
        self._absent: TTLCache[str, int] = TTLCache(
            maxsize=_ABSENT_BYTES,
            ttl=max(cooldown, 1.0),
            timer=lambda: _clock.monotonic(),
            getsizeof=lambda size: size,
        )

    async def find(self, kid: str | None, alg: str) -> SigningKey | None:
        """The key to verify a token with; raises ``Unavailable`` when there are no keys."""
        started = _clock.monotonic()
        keys = await self._keys.get()
        if keys.knows(kid) or kid in self._absent:
            return keys.find(kid, alg)
        assert kid is not None
        fetched_for_us = self._keys.loaded_at >= started
        if not fetched_for_us and (
            self._keys.refreshing or started - self._last_forced >= self._cooldown
        ):
            if not self._keys.refreshing:
                self._last_forced = started
            keys = await self._keys.get(force=True)
        if not keys.knows(kid):
            self._absent[kid] = len(kid) + _ABSENT_ENTRY_OVERHEAD
        return keys.find(kid, alg)

    async def _load(self) -> tuple[KeySet, float]:
        uri = self._jwks_uri
        if uri is None:
            # Discovery keeps its own last good metadata; it fails only before it ever succeeded.
            uri = (await self._discovery.get()).jwks_uri
            if uri is None:
                raise FetchError("the authorization server metadata has no jwks_uri")
        started = time.perf_counter()
        try:
            fetched = await fetch_json(
                self._http.get(), uri, deadline=self._deadline, max_bytes=MAX_BYTES
            )
        except FetchError as exc:
            self._auditor.fetched("jwks", uri, started, str(exc))
            raise
        self._auditor.fetched("jwks", uri, started, None)
        entries = fetched.document.get("keys")
        if not isinstance(entries, list):
            raise FetchError(f"GET {uri} answered a document without a 'keys' list")
        keys = [k for k in map(self._usable, entries[: _MAX_KEYS * 4]) if k is not None]
        if not keys:
            raise FetchError(f"GET {uri} answered no usable signing key")
        self._absent.clear()
        ttl = max_age(fetched.cache_control)
        ttl = _DEFAULT_TTL if ttl is None else min(max(ttl, _MIN_TTL), _MAX_TTL)
        return KeySet(keys[:_MAX_KEYS]), ttl

    def _usable(self, jwk: object) -> SigningKey | None:
        return usable_key(jwk, self._algorithms)
