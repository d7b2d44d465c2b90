"""The per-request access context the middleware hands to the application."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._tokens import ValidToken


class AccessContext:
    """Who is calling, as the validated bearer token says.

    Found at ``scope["state"]["access_context"]`` (Starlette: ``request.state.access_context``).
    Its ``repr`` shows the subject and scopes, never the token.
    """

    __slots__ = ("_token", "_valid")

    def __init__(self, valid: ValidToken, token: bytes) -> None:
        self._valid = valid
        self._token = token  # the subject token for token exchange; never shown

    @property
    def subject(self) -> str:
        """The token's ``sub`` claim."""
        return self._valid.subject

    @property
    def claims(self) -> Mapping[str, Any]:
        """Every claim of the validated token, read-only (JSON arrays appear as tuples)."""
        return self._valid.claims

    @property
    def scopes(self) -> frozenset[str]:
        """The scopes granted by the token (``scope`` string and/or ``scp`` list)."""
        return self._valid.scopes

    def __repr__(self) -> str:
        return f"AccessContext(subject={self.subject!r}, scopes={sorted(self.scopes)!r})"
