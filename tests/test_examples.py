"""The examples in ``examples/`` run as a user would run them: ``python examples/<name>.py``
from the repository root. Each demo starts its own authorization server, fake upstream API and
app on 127.0.0.1, and prints what came back through the delegated token."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0  # generous for slow machines; each demo takes a few seconds at most
# A JWT's header starts with '{"', which base64url-encodes to "eyJ": no output may show one.
JWT = re.compile(r"eyJ[\w-]{8,}")


@dataclass
class Run:
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run_example(name: str) -> Run:
    """Run ``examples/<name>``; fail unless it exits 0 without printing a token."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and file
        [sys.executable, f"examples/{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert not JWT.search(done.stdout + done.stderr), "the demo printed a token"
    return Run(done.stdout, done.stderr)


def test_fastapi_github() -> None:
    run = run_example("fastapi_github.py")
    # The fake GitHub answers only a token whose audience is itself: alice's login coming back
    # means the endpoint exchanged her token rather than forwarding it.
    assert run.lines == [
        "without a token:  401",
        "as alice:         200 {'login': 'alice'}",
    ]


def test_mcp_server() -> None:
    run = run_example("mcp_server.py")
    # demo-agent got its own token through the 401 and discovery (client credentials); the
    # tool's exchanged token named it to the fake notes API.
    assert run.lines == ["count_notes: demo-agent has 2 notes"]


def test_quart_app() -> None:
    run = run_example("quart_app.py")
    assert len(run.lines) == 2, run.stdout
    assert run.lines[0] == "alice: 200 {'events': ['10:00 standup'], 'owner': 'alice'}"
    # bob has not consented: the exchange is denied and the app's error handler answers 403.
    assert re.fullmatch(
        r"bob: 403 \{'error': 'access_denied', 'resource': 'http://127\.0\.0\.1:\d+'\}",
        run.lines[1],
    )
