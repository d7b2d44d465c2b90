"""Test helpers: a local, standards-conformant authorization server, and real servers on
loopback for the applications under test.

``LocalAuthorizationServer`` lets the middleware (and your own application) be tested with real
tokens and real discovery, without any real authorization server. ``loopback_socket()`` binds a
free port on 127.0.0.1 first (so the application can be configured with its own URL) and
``serve(app, sock)`` runs it there with uvicorn, in the current event loop.
"""

from ._serve import loopback_socket, serve
from ._server import LocalAuthorizationServer
from ._token_endpoint import Client, ScriptedAnswer

__all__ = ["Client", "LocalAuthorizationServer", "ScriptedAnswer", "loopback_socket", "serve"]
