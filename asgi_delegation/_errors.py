"""Exceptions raised by asgi_delegation to the code that uses it.

The hierarchy::

    DelegationError                  base class: catch this to catch everything below
    ├── ConfigurationError           the middleware was given arguments it cannot work with
    │                                (also a ValueError); raised at construction, never per request
    ├── SharedCacheUnavailable       the shared grant cache (Redis) could not be told something
    │                                that must reach every process: an invalidation
    └── ExchangeError                a token exchange (RFC 8693) did not produce a grant
        ├── ExchangeDenied           the authorization server refused (invalid_grant,
        │                            invalid_target, invalid_scope, invalid_client, ...):
        │                            retrying the same request will not help
        ├── ExchangeUnavailable      the authorization server could not be reached or answered
        │                            nonsense (network, timeout, 5xx, 429, malformed answer):
        │                            retrying later may help; see ``retry_after``
        └── ExchangeNotAllowed       refused here, by local policy, before any request was sent

Problems with an *inbound* request (a missing, malformed or invalid bearer token) are not
exceptions: the middleware answers them itself with RFC 6750 challenges, and the wrapped
application never sees the request.

No message or attribute in this module ever contains a token, a secret or key material:
``error_description`` is what the authorization server said, truncated, stripped of control
characters and of anything shaped like a token.
"""

from __future__ import annotations

from ._printable import printable


class DelegationError(Exception):
    """Base class of every exception asgi_delegation raises."""


class ConfigurationError(DelegationError, ValueError):
    """An argument given to the middleware is unusable; the message names it and says why."""


class SharedCacheUnavailable(DelegationError):
    """Redis could not be reached, so other processes may not have been told; retry."""


class ExchangeError(DelegationError):
    """A token exchange for ``resource`` failed.

    ``error`` is the OAuth error code (from the authorization server, or one of this package's:
    ``temporarily_unavailable``, ``invalid_response``, ``not_allowed``);
    ``error_description`` is sanitized text or None; ``retry_after`` is the number of seconds
    the authorization server asked to wait, when it said so.
    """

    def __init__(
        self,
        resource: str,
        error: str,
        error_description: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.resource = resource
        self.error = error
        self.error_description = error_description
        self.retry_after = retry_after
        detail = f": {error_description}" if error_description else ""
        # The resource may come from request data: no line breaks into whoever logs this.
        super().__init__(f"token exchange for {printable(resource)} failed with {error}{detail}")


class ExchangeDenied(ExchangeError):
    """The authorization server refused the exchange."""


class ExchangeUnavailable(ExchangeError):
    """The authorization server could not be reached, or its answer was unusable."""


class ExchangeNotAllowed(ExchangeError):
    """Local policy refused the exchange; no request was sent."""
