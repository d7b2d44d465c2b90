"""asgi_delegation: delegated access for ASGI applications.

One pure ASGI middleware validates the caller's bearer JWT against the issuer's keys, answers
RFC 6750 / RFC 9728 challenges, and gives the application an :class:`AccessContext` that
exchanges the caller's token (RFC 8693) for upstream grants, lazily, cached and single-flight.
"""

from ._audit import AuthenticationEvent, ExchangeEvent, FetchEvent
from ._context import AccessContext
from ._current import current_access_context
from ._decorator import grant
from ._errors import (
    ConfigurationError,
    DelegationError,
    ExchangeDenied,
    ExchangeError,
    ExchangeNotAllowed,
    ExchangeUnavailable,
    SharedCacheUnavailable,
)
from ._grant import Grant
from ._issuer import DEFAULT_ALGORITHMS, Issuer
from ._middleware import DelegationMiddleware

__all__ = [
    "DEFAULT_ALGORITHMS",
    "AccessContext",
    "AuthenticationEvent",
    "ConfigurationError",
    "DelegationError",
    "DelegationMiddleware",
    "ExchangeDenied",
    "ExchangeError",
    "ExchangeEvent",
    "ExchangeNotAllowed",
    "ExchangeUnavailable",
    "FetchEvent",
    "Grant",
    "Issuer",
    "SharedCacheUnavailable",
    "current_access_context",
    "grant",
]
