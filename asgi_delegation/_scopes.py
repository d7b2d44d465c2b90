"""Scopes as configuration gives them: RFC 6749 scope tokens, and the hierarchy among them.

The MCP authorization spec (revision 2026-07-28) requires servers to "account for scope
hierarchies, where a broader scope implies narrower ones, when deciding whether a token is
sufficient". ``scope_hierarchy`` maps a broader scope to the scopes it implies; implication is
transitive, and a cycle (``a`` implies ``b`` implies ``a``) is refused: it would make two scopes
one, which is better said by granting both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ._errors import ConfigurationError

# RFC 6749 scope-token characters: printable ASCII without space, '"' and '\'.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
#: Asks for a refresh token; the MCP spec says challenges and scopes_supported SHOULD NOT
#: name it (a client that asks for it gets a refresh token it did not need).
OFFLINE_ACCESS = "offline_access"

Implied = Mapping[str, frozenset[str]]


def scope_list(value: Iterable[str], what: str) -> tuple[str, ...]:
    """``value`` as distinct scope tokens, in order; raises :class:`ConfigurationError`."""
    if isinstance(value, str):
        raise ConfigurationError(f"{what} must be a list of scopes, not a string")
    scopes = tuple(dict.fromkeys(value))
    for scope in scopes:
        if not isinstance(scope, str) or not SCOPE_TOKEN.fullmatch(scope):
            raise ConfigurationError(f"{what} holds a scope that is not an RFC 6749 scope token")
    return scopes


def advertised(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes a challenge or the resource metadata may name."""
    return tuple(scope for scope in scopes if scope != OFFLINE_ACCESS)


def implied_scopes(hierarchy: Mapping[str, Iterable[str]] | None) -> dict[str, frozenset[str]]:
    """Every scope the hierarchy names as broader, with all the scopes it implies, however
    indirectly; raises :class:`ConfigurationError` for a malformed mapping or a cycle."""
    if hierarchy is None:
        return {}
    if not isinstance(hierarchy, Mapping):
        raise ConfigurationError("scope_hierarchy must map scopes to the scopes they imply")
    direct = {
        broad: frozenset(scope_list(narrower, f"scope_hierarchy[{broad!r}]"))
        for broad, narrower in hierarchy.items()
    }
    scope_list(direct, "scope_hierarchy")
    closure: dict[str, frozenset[str]] = {}

    def implied(scope: str, path: tuple[str, ...]) -> frozenset[str]:
        done = closure.get(scope)
        if done is not None:
            return done
        found: set[str] = set()
        chain = (*path, scope)
        for narrower in direct.get(scope, ()):
            if narrower in chain:
                cycle = " -> ".join((*chain[chain.index(narrower) :], narrower))
                raise ConfigurationError(f"scope_hierarchy has a cycle: {cycle}")
            found.add(narrower)
            found |= implied(narrower, chain)
        closure[scope] = frozenset(found)
        return closure[scope]

    for broad in direct:
        implied(broad, ())
    return {broad: scopes for broad, scopes in closure.items() if scopes}


def with_implied(scopes: frozenset[str], implied: Implied) -> frozenset[str]:
    """``scopes`` and every scope they imply (the same set when they imply nothing)."""
    extra = [implied[scope] for scope in scopes if scope in implied]
    return scopes.union(*extra) if extra else scopes
