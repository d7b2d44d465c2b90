"""Test helpers: a local, standards-conformant authorization server.

``LocalAuthorizationServer`` lets the middleware (and your own application) be tested with real
tokens and real discovery, without any real authorization server.
"""

from ._server import LocalAuthorizationServer
from ._token_endpoint import Client, ScriptedAnswer

__all__ = ["Client", "LocalAuthorizationServer", "ScriptedAnswer"]
