"""Run a LocalAuthorizationServer on a loopback port for local development, until Ctrl-C.

It registers a client that may exchange tokens (RFC 8693), mints an access token for a user,
and prints everything an application needs to use it: the issuer, the token, the environment
variables (as `export` lines) and an example curl. The last line, `ready`, says the server is
up. With --json, one JSON object (on one line) with the same facts is printed instead.

The credentials and tokens are generated for local development only. Only loopback hosts can
be served on. Ctrl-C or SIGTERM stops the server (exit 0); a second one forces the exit.

Needs uvicorn: pip install 'asgi-delegation[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import secrets
import shlex
import signal
import sys
import threading
import time
from contextlib import ExitStack
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from .._errors import ConfigurationError
from .._urls import is_loopback_host, secure_url
from ._args import count, number

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_AUDIENCE = "http://127.0.0.1:8000/mcp"
READY = "ready"


def _loopback(value: str) -> str:
    if not is_loopback_host(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a loopback host: the development server only listens on "
            "loopback addresses (127.0.0.1, ::1, localhost)"
        )
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 - 65535)")
    return port


def _text_value(value: str) -> str:
    if not value or not value.isprintable():
        raise argparse.ArgumentTypeError("must be a non-empty string of printable characters")
    return value


def _resource(value: str) -> str:
    try:
        return secure_url(value, "the resource")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve = parser.add_argument_group("server")
    serve.add_argument(
        "--host",
        type=_loopback,
        default="127.0.0.1",
        help="loopback host to listen on (default: %(default)s)",
    )
    serve.add_argument(
        "--port", type=_port, default=0, help="port to listen on (default: 0, a free one)"
    )
    serve.add_argument(
        "--latency",
        type=number(0, 3600),
        default=0.0,
        metavar="SECONDS",
        help="delay every token endpoint answer by this much (default: 0)",
    )
    user = parser.add_argument_group("the user token")
    user.add_argument(
        "--sub", type=_text_value, default="dev-user", help="its subject (default: %(default)s)"
    )
    user.add_argument(
        "--scope", default=None, help='its scopes, space-separated ("read write"; default: none)'
    )
    user.add_argument(
        "--audience",
        type=_resource,
        default=DEFAULT_AUDIENCE,
        metavar="RESOURCE",
        help="the resource it is for: your application's resource identifier "
        "(default: %(default)s)",
    )
    user.add_argument(
        "--expires-in",
        type=count,
        default=3600,
        metavar="SECONDS",
        help="its lifetime (default: 3600)",
    )
    client = parser.add_argument_group("the application's client")
    client.add_argument(
        "--client-id", type=_text_value, default="dev-client", help="(default: %(default)s)"
    )
    client.add_argument(
        "--client-secret",
        default=None,
        type=_text_value,
        help="(default: a random one, printed at start)",
    )
    client.add_argument(
        "--upstream",
        action="append",
        default=None,
        metavar="RESOURCE",
        help="a resource the client may exchange tokens for; repeatable (default: any)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _facts(args: argparse.Namespace, server: Any, secret: str, token: str) -> dict[str, Any]:
    env = {
        "ASGI_DELEGATION_ISSUER": server.issuer,
        "ASGI_DELEGATION_RESOURCE": args.audience,
        "KEYCARD_CLIENT_ID": args.client_id,
        "KEYCARD_CLIENT_SECRET": secret,
    }
    curl = shlex.join(["curl", "-i", "-H", f"Authorization: Bearer {token}", args.audience])
    return {
        "issuer": server.issuer,
        "port": urlsplit(server.issuer).port,
        "token_endpoint": server.token_endpoint,
        "jwks_uri": server.metadata()["jwks_uri"],
        "client_id": args.client_id,
        "client_secret": secret,
        "allowed_resources": args.upstream,
        "subject": args.sub,
        "scope": args.scope,
        "audience": args.audience,
        "expires_in": args.expires_in,
        "expires_at": int(time.time() + args.expires_in),
        "token": token,
        "env": env,
        "curl": curl,
    }


def _text(facts: dict[str, Any]) -> str:
    upstream = ", ".join(facts["allowed_resources"] or ["any resource"])
    scope = f'"{facts["scope"]}"' if facts["scope"] else "none"
    expires = time.strftime("%H:%M:%S", time.localtime(facts["expires_at"]))
    lines = [
        "asgi-delegation dev-server: a local authorization server, for development only",
        f"issuer:  {facts['issuer']}",
        f"client:  {facts['client_id']} (may exchange tokens for: {upstream})",
        f"user:    {facts['subject']}, scope {scope}, audience {facts['audience']}, "
        f"expires in {facts['expires_in']} s (at {expires})",
        f"token:   {facts['token']}",
        "",
        "# Point your application at it (DelegationMiddleware reads KEYCARD_CLIENT_ID and",
        "# KEYCARD_CLIENT_SECRET itself; pass issuer= and resource= from the other two):",
        *(f"export {name}={shlex.quote(value)}" for name, value in facts["env"].items()),
        "",
        "# Call your application as the user:",
        facts["curl"],
        "",
        "Ctrl-C stops the server.",
        READY,
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("uvicorn") is None:
        print(
            "asgi-delegation dev-server: needs uvicorn: pip install 'asgi-delegation[serve]'",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from ..testing import LocalAuthorizationServer

    server = LocalAuthorizationServer()
    secret = args.client_secret or secrets.token_urlsafe(24)
    server.register_client(args.client_id, secret=secret, allowed_resources=args.upstream)
    server.token_latency = args.latency
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: stop waiting for the server to shut down
            raise KeyboardInterrupt
        # Event.set() takes the lock Event.wait() holds while it checks the flag; a handler
        # running in that window (in this very thread) would deadlock. Another thread waits.
        threading.Thread(target=stop.set, daemon=True).start()

    with ExitStack() as stack:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(signum, on_signal)
                stack.callback(signal.signal, signum, previous or signal.SIG_DFL)
        try:
            stack.enter_context(server.running(args.host, args.port))
        except OSError as exc:
            print(
                f"asgi-delegation dev-server: cannot listen on {args.host} port {args.port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        args.scope = " ".join((args.scope or "").split()) or None
        token = server.mint(
            args.sub, audience=args.audience, scope=args.scope, expires_in=args.expires_in
        )
        facts = _facts(args, server, secret, token)
        output = json.dumps(facts) + "\n" if args.json else _text(facts)
        sys.stdout.write(output)
        sys.stdout.flush()
        while not stop.wait(1.0):  # a timeout keeps Ctrl-C working where waits ignore it
            pass
    return EXIT_OK
