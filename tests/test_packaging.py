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


class _Lookups:
    """A meta path finder that finds nothing and notes what it was asked for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


async def test_requests_to_the_authorization_server_search_for_no_module() -> None:
    # httpcore imports sniffio on every request; were it missing, each import would search
    # sys.path again (the declared dependency keeps that off every exchange).
    import httpx

    from asgi_delegation.testing import LocalAuthorizationServer

    assert any(r.lower().startswith("sniffio") for r in requires("asgi-delegation") or [])
    auth = LocalAuthorizationServer()
    lookups = _Lookups()
    async with auth.serve() as issuer, httpx.AsyncClient() as http:
        await http.get(f"{issuer}/.well-known/oauth-authorization-server")  # imports, once
        sys.meta_path.insert(0, lookups)
        try:
            for _ in range(3):
                answer = await http.get(f"{issuer}/.well-known/oauth-authorization-server")
                assert answer.status_code == 200
        finally:
            sys.meta_path.remove(lookups)
    assert lookups.names == []
