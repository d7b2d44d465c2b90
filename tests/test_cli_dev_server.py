"""``asgi-delegation dev-server``, run as a user would: a subprocess read line by line, then
real requests on loopback, then a signal."""

from __future__ import annotations

import asyncio
import json
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from asgi_delegation import DelegationMiddleware, ExchangeError

UPSTREAM = "https://api.example.com"
OTHER = "https://other.example.com"
TIMEOUT = 15.0  # generous for slow machines; a healthy start takes well under a second


@dataclass
class DevServer:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        # A reader thread, so that a child that hangs fails the test instead of blocking it.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, marker: str) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no {marker!r} line within {TIMEOUT} s; got {seen}")
            if line is None:
                pytest.fail(f"dev-server exited ({self.proc.wait()}) before {marker!r}: {seen}")
            seen.append(line)
            if line == marker:
                return seen

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=5)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "asgi_delegation", "dev-server", *args]


@pytest.fixture
def start() -> Iterator[Any]:
    started: list[DevServer] = []

    def run(*args: str) -> DevServer:
        proc = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            _command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.append(DevServer(proc))
        return started[-1]

    yield run
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        for stream in (server.proc.stdout, server.proc.stderr):
            assert stream is not None
            stream.close()


def _parse(lines: list[str]) -> dict[str, Any]:
    facts: dict[str, Any] = {"env": {}}
    for line in lines:
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            facts["env"][name] = value
        elif line.startswith(("issuer:", "token:")):
            key, _, value = line.partition(":")
            facts[key] = value.strip()
        elif line.startswith("curl "):
            facts["curl"] = shlex.split(line)
    return facts


async def _exchanging_app(scope: Any, receive: Any, send: Any) -> None:
    ctx = scope["state"]["access_context"]
    document: dict[str, Any] = {"subject": ctx.subject, "scopes": sorted(ctx.scopes)}
    try:
        grant = await ctx.exchange(parse_qs(scope["query_string"].decode())["resource"][0])
        document["grant"] = grant.access_token
    except ExchangeError as exc:
        document["error"] = exc.error
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


async def _through_middleware(
    issuer: str, resource: str, client_id: str, secret: str, token: str, targets: list[str]
) -> list[httpx.Response]:
    middleware = DelegationMiddleware(  # its own HTTP client: real requests to the dev server
        _exchanging_app,
        issuer=issuer,
        resource=resource,
        client_id=client_id,
        client_secret=secret,
    )
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=resource) as client:
            headers = {"Authorization": f"Bearer {token}"}
            return [
                await client.get("/exchange", params={"resource": target}, headers=headers)
                for target in targets
            ]
    finally:
        await middleware.aclose()


def test_text_output_serves_validates_exchanges_and_stops_on_sigterm(start: Any) -> None:
    server = start("--port", "0", "--sub", "alice", "--scope", "read  write")
    lines = server.read_until("ready")
    facts = _parse(lines)
    issuer, token, env = facts["issuer"], facts["token"], facts["env"]
    assert issuer.startswith("http://127.0.0.1:")
    assert int(issuer.rsplit(":", 1)[1]) > 0  # the port chosen is printed
    assert env["ASGI_DELEGATION_ISSUER"] == issuer
    assert env["ASGI_DELEGATION_RESOURCE"] == "http://127.0.0.1:8000/mcp"
    assert env["KEYCARD_CLIENT_ID"] == "dev-client"
    secret = env["KEYCARD_CLIENT_SECRET"]
    assert len(secret) >= 20
    assert facts["curl"][-1] == "http://127.0.0.1:8000/mcp"
    assert f"Authorization: Bearer {token}" in facts["curl"]

    metadata = httpx.get(f"{issuer}/.well-known/oauth-authorization-server", timeout=5).json()
    assert metadata["issuer"] == issuer
    assert httpx.get(metadata["jwks_uri"], timeout=5).json()["keys"]

    (answer,) = asyncio.run(
        _through_middleware(
            issuer, env["ASGI_DELEGATION_RESOURCE"], "dev-client", secret, token, [UPSTREAM]
        )
    )
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["subject"] == "alice"
    assert document["scopes"] == ["read", "write"]
    assert document["grant"].count(".") == 2

    exchanged = httpx.post(
        metadata["token_endpoint"],
        auth=("dev-client", secret),
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "resource": OTHER,
        },
        timeout=5,
    )
    assert exchanged.status_code == 200, exchanged.text
    assert exchanged.json()["token_type"] == "Bearer"
    refused = httpx.post(
        metadata["token_endpoint"],
        auth=("dev-client", "not-the-secret"),
        data={"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange"},
        timeout=5,
    )
    assert refused.json()["error"] == "invalid_client"

    assert server.stop(signal.SIGTERM) == 0
    assert server.proc.stderr is not None
    assert "Traceback" not in server.proc.stderr.read()


def test_json_output_and_ctrl_c(start: Any) -> None:
    server = start(
        "--json", "--client-id", "my-app", "--client-secret", "s3cret", "--expires-in", "60",
        "--audience", "https://tools.example.com/mcp", "--upstream", UPSTREAM, "--latency", "0.01",
    )  # fmt: skip
    line = server.lines.get(timeout=TIMEOUT)
    assert line is not None, "dev-server exited before printing"
    facts = json.loads(line)
    assert facts["env"] == {
        "ASGI_DELEGATION_ISSUER": facts["issuer"],
        "ASGI_DELEGATION_RESOURCE": "https://tools.example.com/mcp",
        "KEYCARD_CLIENT_ID": "my-app",
        "KEYCARD_CLIENT_SECRET": "s3cret",
    }
    assert facts["issuer"] == f"http://127.0.0.1:{facts['port']}"
    assert facts["token_endpoint"] == f"{facts['issuer']}/token"
    assert facts["allowed_resources"] == [UPSTREAM]
    assert (facts["subject"], facts["scope"], facts["expires_in"]) == ("dev-user", None, 60)

    answers = asyncio.run(
        _through_middleware(
            facts["issuer"],
            "https://tools.example.com/mcp",
            "my-app",
            "s3cret",
            facts["token"],
            [UPSTREAM, OTHER],
        )
    )
    assert [a.status_code for a in answers] == [200, 200]
    assert "grant" in answers[0].json()
    assert answers[1].json()["error"] == "invalid_target"  # not one of the --upstream

    assert server.stop(signal.SIGINT) == 0


def test_help_exits_0() -> None:
    result = subprocess.run(  # noqa: S603
        _command("--help"), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0
    assert "--upstream" in result.stdout
    assert "Ctrl-C" in result.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.com"])  # noqa: S104
def test_non_loopback_host_is_a_usage_error(host: str) -> None:
    result = subprocess.run(  # noqa: S603
        _command("--host", host), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 2
    assert "not a loopback host" in result.stderr
    assert result.stdout == ""
