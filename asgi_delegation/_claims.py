"""Claims as validated tokens keep them: read-only, and holding once what many tokens repeat.

A validated token stays cached, and its claims are shared by every request that carries it (and
by the MCP SDK's principal, which wants a ``dict``), so they are a ``dict`` whose mutators raise,
with JSON arrays as tuples. Token segments are parsed straight into that form.

Ten thousand cached users would otherwise hold ten thousand copies of the same claim names,
issuer, audience, client and scope strings and scope sets: more memory than the rest of their
entries. Names are shared through a fixed table (a parse happens before the signature is
checked, so nothing an attacker sends may grow it); values only once a token is valid, in
bounded tables.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ._scopes import Implied, with_implied

# Claim and header names registered or in wide use (RFC 7519, 7515, 9068, 8693, 7662, OIDC).
_NAMES = {
    name: name
    for name in [
        "iss",
        "sub",
        "aud",
        "exp",
        "nbf",
        "iat",
        "jti",
        "scope",
        "scp",
        "client_id",
        "azp",
        "act",
        "may_act",
        "cnf",
        "auth_time",
        "acr",
        "amr",
        "sid",
        "tid",
        "oid",
        "roles",
        "groups",
        "entitlements",
        "email",
        "email_verified",
        "name",
        "preferred_username",
        "given_name",
        "family_name",
        "token_type",
        "username",
        "active",
        "alg",
        "typ",
        "kid",
    ]
}
# Claims whose values most tokens of a deployment share.
_REPEATED = ("iss", "aud", "azp", "client_id", "scope")
_MAX_SHARED_CHARS = 256
_MAX_SHARED = 4096


class ReadOnlyDict(dict[str, Any]):
    """A JSON object that cannot be changed (``copy()`` gives a mutable ``dict``)."""

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("validated claims are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self) -> ReadOnlyDict:
        return self

    def __deepcopy__(self, memo: object) -> ReadOnlyDict:
        return self  # nothing in it can change

    def __reduce__(self) -> tuple[type[ReadOnlyDict], tuple[dict[str, Any]]]:
        return ReadOnlyDict, (dict(self),)


def frozen_object(pairs: list[tuple[str, Any]]) -> ReadOnlyDict:
    """The JSON decoder's hook: one object's members, read-only; refuses duplicate names, which
    parsers resolve differently. Inner objects have been through it already."""
    names = _NAMES
    obj = ReadOnlyDict([(names.get(k, k), _tuples(v) if type(v) is list else v) for k, v in pairs])
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _tuples(array: list[Any]) -> tuple[Any, ...]:
    return tuple(_tuples(v) if type(v) is list else v for v in array)


def freeze(value: Any) -> Any:
    """A parsed JSON value in the read-only form (a copy)."""
    if isinstance(value, dict):
        return frozen_object([(k, freeze(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


class Common:
    """What validated tokens have in common, kept once: strings of repeated claims, and scope
    sets with the scopes they imply. Tables stop growing when full; then values are kept as
    they came."""

    def __init__(self, implied: Implied) -> None:
        self.implied = implied
        self._strings: dict[str, str] = {}
        self._scopes: dict[frozenset[str], tuple[frozenset[str], frozenset[str]]] = {}

    def scopes(self, scopes: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
        """``scopes`` and those they imply, as equal sets seen before were."""
        known = self._scopes.get(scopes)
        if known is None:
            known = scopes, with_implied(scopes, self.implied)
            if len(self._scopes) < _MAX_SHARED:
                self._scopes[scopes] = known
        return known

    def share(self, claims: ReadOnlyDict) -> None:
        """Swap the repeated claims' strings of a valid token's claims, not yet in anyone's
        hands, for equal ones seen before."""
        strings = self._strings
        for name in _REPEATED:
            value = claims.get(name)
            if type(value) is str and len(value) <= _MAX_SHARED_CHARS:
                kept = strings.get(value)
                if kept is None:
                    if len(strings) < _MAX_SHARED:
                        strings[value] = value
                elif kept is not value:
                    dict.__setitem__(claims, name, kept)
