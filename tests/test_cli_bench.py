"""`asgi-delegation bench`, end to end: embedded, against a served LocalAuthorizationServer as
a "deployment", and its failures explained."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

import anyio
import pytest

from asgi_delegation.cli import main
from asgi_delegation.testing import LocalAuthorizationServer

from .conftest import CLIENT_ID, CLIENT_SECRET, GITHUB, RESOURCE

QUICK = ["--users", "3", "--resources", "2", "--duration", "0.2", "--samples", "10"]


def test_embedded_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *QUICK, "--burst", "200", "--bursts", "3", "--latency", "5"]) == 0
    out = capsys.readouterr().out
    for section in (
        "Inbound validation", "first-seen token", "cached token", "Token exchange, cold",
        "Token exchange, cached",
        "Burst: 200 concurrent identical requests, cold grant cache, 3 bursts (a new user each)",
        "requests served                   600 of 600",
        "token endpoint calls              3 (1 per burst)", "wall time (median of 3)",
        "one cold exchange (median)", "burst / one cold exchange", "Throughput",
        "Cold exchange latency",
    ):  # fmt: skip
        assert section in out


def test_embedded_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["bench", *QUICK, "--burst", "50", "--bursts", "4", "--latency", "0", "--json"]) == 0
    )
    figures = json.loads(capsys.readouterr().out)
    assert figures["mode"] == "embedded"
    burst = figures["burst"]
    # Four bursts, each for a new user: one token-endpoint call each, every request served.
    assert burst == {
        **burst, "requests": 50, "bursts": 4, "served": 200, "token_endpoint_calls": 4,
        "token_endpoint_calls_per_burst": [1, 1, 1, 1],
    }  # fmt: skip
    assert len(burst["wall_ms_samples"]) == 4
    assert burst["wall_ms"] == statistics.median(burst["wall_ms_samples"])
    assert burst["cold_exchange_ms"] == statistics.median(figures["cold_exchange_samples_ms"])
    assert burst["ratio_to_cold_exchange"] == pytest.approx(
        burst["wall_ms"] / burst["cold_exchange_ms"]
    )
    assert figures["throughput"]["token_endpoint_calls"] == 0  # everything cached by then
    assert figures["exchange"]["cold_ms"]["n"] == 6  # 3 users x 2 resources
    assert figures["validation_us"]["first_seen"]["n"] == 10
    assert len(figures["cold_exchange_samples_ms"]) == 6


def test_five_bursts_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *QUICK, "--burst", "10", "--latency", "0", "--json"]) == 0
    burst = json.loads(capsys.readouterr().out)["burst"]
    assert burst["bursts"] == len(burst["wall_ms_samples"]) == 5
    assert burst["token_endpoint_calls_per_burst"] == [1] * 5


def test_the_module_runs_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asgi_delegation", "bench", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert "--issuer" in done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--issuer", "https://a.example"],
        ["bench", "--users", "0"],
        ["bench", "--bursts", "0"],
        ["nonsense"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    try:
        code: object = main(argv)
    except SystemExit as exited:  # argparse's own usage errors
        code = exited.code
    assert code == 2


async def _deployment_bench(
    auth: LocalAuthorizationServer, capsys: pytest.CaptureFixture[str], token: str, *extra: str
) -> tuple[int, str, str]:
    argv = [
        "bench", "--issuer", auth.issuer, "--resource", RESOURCE, "--token", token,
        "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, "--upstream", GITHUB,
        "--samples", "3", "--duration", "0.1", "--burst", "20", "--bursts", "2", *extra,
    ]  # fmt: skip
    code = await anyio.to_thread.run_sync(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_against_a_deployment(
    served_auth: LocalAuthorizationServer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = served_auth.mint("alice", audience=RESOURCE)
    code, out, err = await _deployment_bench(served_auth, capsys, token, "--json")
    assert code == 0, err
    figures: dict[str, Any] = json.loads(out)
    assert figures["mode"] == "deployment"
    burst = figures["burst"]
    assert burst == {**burst, "requests": 20, "bursts": 2, "served": 40}
    assert len(burst["wall_ms_samples"]) == 2
    # A deployment's token endpoint cannot be counted.
    assert burst["token_endpoint_calls"] is burst["token_endpoint_calls_per_burst"] is None
    assert figures["exchange"]["cold_ms"]["n"] == 3
    assert token not in out + err
    assert CLIENT_SECRET not in out + err


async def test_a_failed_exchange_is_explained(
    served_auth: LocalAuthorizationServer, capsys: pytest.CaptureFixture[str]
) -> None:
    served_auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=["other"])
    token = served_auth.mint("alice", audience=RESOURCE)
    code, out, err = await _deployment_bench(served_auth, capsys, token)
    assert code == 1
    assert "invalid_target" in err
    assert "not a dependency of the application" in err
    assert token not in out + err


async def test_a_refused_user_token_points_to_doctor(
    served_auth: LocalAuthorizationServer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = served_auth.mint("alice", audience="https://someone-else.example")
    code, out, err = await _deployment_bench(served_auth, capsys, token)
    assert code == 1
    assert "HTTP 401" in err
    assert "asgi-delegation doctor" in err
    assert token not in out + err
