"""What the package needs at run time: its declared dependencies, and nothing it does not use."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires


def test_asgiref_is_not_a_dependency() -> None:
    core = [r for r in requires("asgi-delegation") or [] if "extra ==" not in r]
    assert not [r for r in core if r.lower().startswith("asgiref")], core


def test_the_package_runs_without_asgiref() -> None:
    script = (
        "import sys; sys.modules['asgiref'] = None\n"
        "import asgi_delegation, asgi_delegation.cli, asgi_delegation.testing\n"
        "app = asgi_delegation.DelegationMiddleware(\n"
        "    lambda scope, receive, send: None,\n"
        "    issuer='https://as.example', resource='https://tools.example/mcp')\n"
        "print('ok')\n"
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
