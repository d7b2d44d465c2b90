"""Test helpers: a local, standards-conformant authorization server.

``LocalAuthorizationServer`` lets the middleware (and your own application) be tested with real
tokens and real discovery, without any real authorization server.
"""

from ._server import LocalAuthorizationServer

__all__ = ["LocalAuthorizationServer"]
