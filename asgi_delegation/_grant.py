"""Grant: the result of a token exchange, an upstream token acting as the calling user."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Grant:
    """An access token for ``resource``, obtained by exchanging the caller's token.

    Immutable; its ``repr`` never shows the token. ``expires_at`` is a Unix time, or None when
    the authorization server did not say (the grant is then cached only briefly).
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float | None
    scope: str | None
    resource: str
    issued_token_type: str | None
