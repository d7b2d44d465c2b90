"""asgi_delegation: delegated access for ASGI applications.

One pure ASGI middleware validates the caller's bearer JWT against the issuer's keys, answers
RFC 6750 / RFC 9728 challenges, and gives the application an :class:`AccessContext`.
"""

from ._context import AccessContext
from ._errors import ConfigurationError, DelegationError
from ._middleware import DEFAULT_ALGORITHMS, DelegationMiddleware

__all__ = [
    "DEFAULT_ALGORITHMS",
    "AccessContext",
    "ConfigurationError",
    "DelegationError",
    "DelegationMiddleware",
]
