"""What a failed exchange means for the person running the deployment, in the words of the
delegated-access guide's troubleshooting section. Shared by ``doctor`` and ``bench``."""

from __future__ import annotations

from .._errors import ExchangeError

_CAUSES = {
    "invalid_target": (
        "not a dependency of the application",
        "add the upstream API as a Dependency of your Application at the authorization server",
    ),
    "invalid_client": (
        "bad application credentials",
        "check the client id and secret (KEYCARD_CLIENT_ID / KEYCARD_CLIENT_SECRET) or key",
    ),
    "unauthorized_client": (
        "the application may not exchange tokens",
        "allow the token-exchange grant for your Application's client",
    ),
    "access_denied": (
        "user has not consented",
        "the user must complete the OAuth consent flow for the upstream API",
    ),
    "consent_required": (
        "user has not consented",
        "the user must complete the OAuth consent flow for the upstream API",
    ),
    "interaction_required": (
        "user has not consented",
        "the user must complete the OAuth consent flow for the upstream API",
    ),
    "invalid_scope": (
        "scope mismatch",
        "make the scopes configured for the upstream API match what it requires",
    ),
    "invalid_grant": (
        "the user's token or the provider grant was refused",
        "the user may need to sign in again or re-authorize the upstream API; "
        "if it persists, check the provider's OAuth credentials in the resource catalog",
    ),
    "server_error": (
        "bad provider credentials",
        "check the OAuth App's client id and secret for the upstream API in the resource "
        "catalog, and that its redirect URL is the zone's",
    ),
}


def explain(error: ExchangeError) -> tuple[str, str]:
    """(what it points to, how to fix it) for a failed exchange."""
    if error.error in _CAUSES:
        return _CAUSES[error.error]
    if error.error == "temporarily_unavailable":
        return (
            "the authorization server is unreachable or failing",
            "check the issuer URL, the network path to it, and its status; retry later",
        )
    if error.error == "not_allowed":
        return ("refused by this application's own policy", "see allowed_resources= / policy=")
    return (f"the authorization server answered {error.error}", "see error_description")
