"""Exceptions raised by asgi_delegation to the code that uses it.

The hierarchy::

    DelegationError                  base class: catch this to catch everything below
    └── ConfigurationError           the middleware was given arguments it cannot work with
                                     (also a ValueError); raised at construction, never per request

Problems with an *inbound* request (a missing, malformed or invalid bearer token) are not
exceptions: the middleware answers them itself with RFC 6750 challenges, and the wrapped
application never sees the request.

No message in this module ever contains a token, a secret or key material.
"""

from __future__ import annotations


class DelegationError(Exception):
    """Base class of every exception asgi_delegation raises."""


class ConfigurationError(DelegationError, ValueError):
    """An argument given to the middleware is unusable; the message names it and says why."""
