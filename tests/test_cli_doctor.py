"""``asgi-delegation doctor`` end to end, against LocalAuthorizationServer on a loopback port."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from asgi_delegation.cli import main
from asgi_delegation.cli._doctor import redacted, render
from asgi_delegation.cli._report import Check
from asgi_delegation.testing import LocalAuthorizationServer, ScriptedAnswer

from .conftest import CLIENT_ID, CLIENT_SECRET, GITHUB, GOOGLE, RESOURCE, SLACK

_LINE = re.compile(r"(PASS|FAIL|SKIP)  (\S(?:.*?\S)?)(?:  +(.*))?")


class Line(NamedTuple):
    status: str
    detail: str
    fix: str | None


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEYCARD_CLIENT_ID", "KEYCARD_CLIENT_SECRET", "ASGI_DELEGATION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def issuer(auth: LocalAuthorizationServer) -> Iterator[str]:
    """``auth`` on a loopback port (its issuer becomes that origin); tokens are minted after."""
    with auth.running() as url:
        yield url


@pytest.fixture
def token(auth: LocalAuthorizationServer, issuer: str) -> str:
    return auth.mint("alice", audience=RESOURCE, scope="read write")


def doctor(capsys: pytest.CaptureFixture[str], *argv: str, hidden: tuple[str, ...] = ()) -> Any:
    """Run the command; return (exit code, stdout). Nothing secret may reach the output."""
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    assert_nothing_secret(out + err, hidden)
    return code, out


def assert_nothing_secret(output: str, hidden: tuple[str, ...]) -> None:
    for secret in (*hidden, CLIENT_SECRET):
        assert secret not in output
    # No JWT at all, not even a prefix: neither the user's token nor an exchanged one.
    assert "eyJ" not in output


def checklist(out: str) -> dict[str, Line]:
    """The printed checklist by check name (a FAIL's fix from the line below it)."""
    lines = out.splitlines()
    found: dict[str, Line] = {}
    for i, text in enumerate(lines):
        match = _LINE.fullmatch(text)
        if match:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            fix = following.strip()[5:] if following.startswith("      fix: ") else None
            found[match[2]] = Line(match[1], match[3] or "", fix)
    return found


def base_args(issuer: str, token: str) -> list[str]:
    return [
        "--issuer",
        issuer,
        "--resource",
        RESOURCE,
        # One argument: an opaque token may start with "-", which argparse would take for an
        # option.
        f"--token={token}",
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ALL_CHECKS = [
    "resource URL",
    "issuer URL",
    "discovery",
    "JWKS",
    "token endpoint",
    "user token",
    "client credentials",
    f"upstream {GITHUB}",
    f"upstream {GOOGLE}",
]


def test_all_green(capsys: pytest.CaptureFixture[str], issuer: str, token: str) -> None:
    code, out = doctor(
        capsys,
        *base_args(issuer, token),
        "--scope",
        "read",
        "--upstream",
        f"{GITHUB} repo",
        "--upstream",
        GOOGLE,
        hidden=(token,),
    )
    checks = checklist(out)
    assert code == 0, out
    assert list(checks) == ALL_CHECKS
    assert {line.status for line in checks.values()} == {"PASS"}
    assert "fix:" not in out
    assert "sub 'alice'" in checks["user token"].detail
    assert "has the required scope read" in checks["user token"].detail
    assert checks[f"upstream {GITHUB}"].detail == "granted: scope repo, expires in 5 min"
    assert out.splitlines()[-1] == "9 passed, 0 failed, 0 skipped: no problem found"


def test_wrong_client_secret(capsys: pytest.CaptureFixture[str], issuer: str, token: str) -> None:
    wrong = "not-the-right-secret-42"
    args = base_args(issuer, token)
    args[args.index(CLIENT_SECRET)] = wrong
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token, wrong))
    checks = checklist(out)
    assert code == 1
    client = checks["client credentials"]
    assert client.status == "FAIL"
    assert "bad application credentials" in client.detail
    assert "invalid_client" in client.detail
    assert "KEYCARD_CLIENT_SECRET" in (client.fix or "")
    assert checks[f"upstream {GITHUB}"] == Line("SKIP", "the client credentials check failed", None)


def test_missing_dependency(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str, token: str
) -> None:
    auth.register_client(CLIENT_ID, secret=CLIENT_SECRET, allowed_resources=[GITHUB])
    args = base_args(issuer, token)
    code, out = doctor(capsys, *args, "--upstream", SLACK, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    # The first exchange was refused for its target, not the client: the client passes.
    assert checks["client credentials"].status == "PASS"
    slack = checks[f"upstream {SLACK}"]
    assert slack.status == "FAIL"
    assert slack.detail.startswith("not a dependency of the application (invalid_target")
    assert "Dependency" in (slack.fix or "")
    assert checks[f"upstream {GITHUB}"].status == "PASS"


def test_user_has_not_consented(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str, token: str
) -> None:
    auth.unconsented.add(("alice", GOOGLE))
    args = base_args(issuer, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, "--upstream", GOOGLE, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert checks[f"upstream {GITHUB}"].status == "PASS"
    google = checks[f"upstream {GOOGLE}"]
    assert google.status == "FAIL"
    assert "user has not consented (access_denied" in google.detail
    assert "consent" in (google.fix or "")


def test_scope_mismatch(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str, token: str
) -> None:
    auth.grantable_scopes[GITHUB] = frozenset({"repo"})
    args = base_args(issuer, token)
    code, out = doctor(capsys, *args, "--upstream", f"{GITHUB} repo admin:org", hidden=(token,))
    github = checklist(out)[f"upstream {GITHUB}"]
    assert code == 1
    assert github.status == "FAIL"
    assert github.detail.startswith("scope mismatch (invalid_scope")
    assert github.detail.endswith("requested scope admin:org repo")
    assert "scopes" in (github.fix or "")


def test_wrong_audience(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str
) -> None:
    other = "http://127.0.0.1:9000/other"
    token = auth.mint("alice", audience=other, scope="read")
    code, out = doctor(capsys, *base_args(issuer, token), "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    user = checks["user token"]
    assert user.status == "FAIL"
    assert user.detail == f"refused (401 invalid_token): aud is {other!r}, expected {RESOURCE!r}"
    assert f"resource={RESOURCE}" in (user.fix or "")
    assert checks["client credentials"] == Line("SKIP", "no valid user token to exchange", None)
    assert checks[f"upstream {GITHUB}"].status == "SKIP"


def test_expired_token(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str
) -> None:
    token = auth.mint("alice", audience=RESOURCE, expires_in=-600)
    code, out = doctor(capsys, *base_args(issuer, token), hidden=(token,))
    user = checklist(out)["user token"]
    assert code == 1
    assert user.status == "FAIL"
    assert user.detail == "refused (401 invalid_token): expired 10 min ago"
    assert "fresh token" in (user.fix or "")


@pytest.mark.parametrize(
    ("mint_options", "detail"),
    [
        ({"omit": ["exp"]}, "the claim exp is unusable: it is missing"),
        ({"claims": {"exp": "tomorrow"}}, "the claim exp is unusable: it is 'tomorrow'"),
        ({"claims": {"sub": 7}}, "the claim sub is unusable: it is 7"),
        ({"header": {"kid": 5}}, "the header member kid is unusable: it is 5"),
    ],
)
def test_malformed_token_names_the_member(
    capsys: pytest.CaptureFixture[str],
    auth: LocalAuthorizationServer,
    issuer: str,
    mint_options: dict[str, Any],
    detail: str,
) -> None:
    token = auth.mint("alice", audience=RESOURCE, **mint_options)
    code, out = doctor(capsys, *base_args(issuer, token), hidden=(token,))
    user = checklist(out)["user token"]
    assert code == 1
    assert user.detail == f"refused (401 invalid_token): {detail}"


def test_token_lacking_a_required_scope(
    capsys: pytest.CaptureFixture[str], issuer: str, token: str
) -> None:
    code, out = doctor(capsys, *base_args(issuer, token), "--scope", "read admin", hidden=(token,))
    user = checklist(out)["user token"]
    assert code == 1
    assert user.detail == (
        "refused (403 insufficient_scope): lacks scope admin (it has: read write)"
    )


def test_token_signed_with_another_key(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str
) -> None:
    stranger = LocalAuthorizationServer()
    unknown_kid = auth.mint("alice", audience=RESOURCE, key=stranger.signing_key)
    forged = auth.mint(
        "alice", audience=RESOURCE, key=stranger.signing_key, header={"kid": auth.kid}
    )
    code, out = doctor(capsys, *base_args(issuer, unknown_kid), hidden=(unknown_kid,))
    assert code == 1
    assert "which the issuer's JWKS does not publish" in checklist(out)["user token"].detail
    code, out = doctor(capsys, *base_args(issuer, forged), hidden=(forged,))
    assert code == 1
    assert "the signature does not verify" in checklist(out)["user token"].detail


def test_opaque_token_without_an_introspection_issuer(
    capsys: pytest.CaptureFixture[str], issuer: str
) -> None:
    opaque = "gho_16C7e42F292c6912E7710c838347Ae178B4a"
    code, out = doctor(capsys, *base_args(issuer, opaque), hidden=(opaque,))
    user = checklist(out)["user token"]
    assert code == 1
    assert "not a JWT" in user.detail
    assert user.detail.endswith(": an opaque token, and no --introspection issuer")
    assert "--introspection ISSUER" in (user.fix or "")


def test_token_endpoint_failing(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str, token: str
) -> None:
    auth.token_answers = [ScriptedAnswer(503) for _ in range(3)]  # every attempt
    code, out = doctor(capsys, *base_args(issuer, token), "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    client = checks["client credentials"]
    assert client.status == "FAIL"
    assert "unreachable or failing (temporarily_unavailable" in client.detail
    assert checks[f"upstream {GITHUB}"].status == "SKIP"


def test_secrets_are_redacted_whatever_a_check_says() -> None:
    secret = 'se"cr\\et'  # characters JSON would escape
    checks = [Check("user token", "FAIL", f"the server said {secret}", f"not {secret}")]
    for as_json in (False, True):
        out = render(redacted(checks, [secret]), as_json=as_json)
        assert secret not in out
        assert json.dumps(secret)[1:-1] not in out
        assert out.count("[redacted]") == 2


def test_unreachable_issuer(capsys: pytest.CaptureFixture[str], token: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    args = base_args(nowhere, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert checks["issuer URL"].status == "PASS"
    discovery = checks["discovery"]
    assert discovery.status == "FAIL"
    assert "ConnectError" in discovery.detail
    assert "reachable" in (discovery.fix or "")
    assert [c.status for c in checks.values()][3:] == ["SKIP"] * 5
    assert checks["JWKS"].detail == "discovery failed"


def test_issuer_trailing_slash_mismatch(
    capsys: pytest.CaptureFixture[str], issuer: str, token: str
) -> None:
    code, out = doctor(capsys, *base_args(issuer + "/", token), hidden=(token,))
    discovery = checklist(out)["discovery"]
    assert code == 1
    assert discovery.status == "FAIL"
    assert f"names issuer {issuer!r}, not {issuer + '/'!r}" in discovery.detail
    assert discovery.fix is not None
    assert discovery.fix.startswith("trailing slash mismatch")
    assert f"--issuer {issuer} " in discovery.fix


def test_http_resource_on_a_public_host(
    capsys: pytest.CaptureFixture[str], issuer: str, token: str
) -> None:
    args = base_args(issuer, token)
    args[args.index(RESOURCE)] = "http://tools.example.com/mcp"
    code, out = doctor(capsys, *args, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert checks["resource URL"].status == "FAIL"
    assert "must use https://" in checks["resource URL"].detail
    assert checks["discovery"].status == "PASS"  # independent of the resource
    assert checks["user token"] == Line("SKIP", "the resource URL is unusable", None)


def test_json_output(capsys: pytest.CaptureFixture[str], issuer: str, token: str) -> None:
    args = [*base_args(issuer, token), "--upstream", GITHUB, "--upstream", GOOGLE, "--json"]
    code, out = doctor(capsys, *args, hidden=(token,))
    document = json.loads(out)
    assert code == 0
    assert set(document) == {"checks", "ok"}
    assert document["ok"] is True
    assert [c["name"] for c in document["checks"]] == ALL_CHECKS
    for check in document["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] == "PASS"
        assert check["fix"] is None

    code, out = doctor(capsys, *args[:-1], "--scope", "admin", "--json", hidden=(token,))
    document = json.loads(out)
    assert code == 1
    assert document["ok"] is False
    failed = [c for c in document["checks"] if c["status"] == "FAIL"]
    assert [c["name"] for c in failed] == ["user token"]
    assert isinstance(failed[0]["fix"], str)


def test_without_a_token_or_client(capsys: pytest.CaptureFixture[str], issuer: str) -> None:
    code, out = doctor(capsys, "--issuer", issuer, "--resource", RESOURCE, "--upstream", GITHUB)
    checks = checklist(out)
    assert code == 0  # nothing failed; what could not be checked says why
    assert checks["user token"].status == "SKIP"
    assert "ASGI_DELEGATION_TOKEN" in checks["user token"].detail
    assert checks["client credentials"].detail == "no client id (--client-id or KEYCARD_CLIENT_ID)"
    assert checks[f"upstream {GITHUB}"] == Line("SKIP", "no usable client credentials", None)


def test_token_file_and_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    issuer: str,
    token: str,
) -> None:
    monkeypatch.setenv("KEYCARD_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("KEYCARD_CLIENT_SECRET", CLIENT_SECRET)
    path = tmp_path / "token"
    path.write_text(f"Bearer {token}\n")
    args = ["--issuer", issuer, "--resource", RESOURCE, "--upstream", GITHUB]
    code, out = doctor(capsys, *args, "--token-file", str(path), hidden=(token,))
    assert code == 0, out
    assert checklist(out)["client credentials"].status == "PASS"

    monkeypatch.setenv("ASGI_DELEGATION_TOKEN", token)
    code, out = doctor(capsys, *args, hidden=(token,))
    assert code == 0, out

    code, out = doctor(capsys, *args, "--token-file", str(tmp_path / "missing"), hidden=(token,))
    assert code == 1
    assert checklist(out)["user token"].status == "FAIL"
    assert "cannot read --token-file" in checklist(out)["user token"].detail


def test_client_id_without_secret(
    capsys: pytest.CaptureFixture[str], issuer: str, token: str
) -> None:
    args = ["--issuer", issuer, "--resource", RESOURCE, "--token", token, "--client-id", CLIENT_ID]
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert checks["user token"].status == "PASS"  # validation does not need the client
    assert checks["client credentials"].status == "FAIL"
    assert "has no secret" in checks["client credentials"].detail


def test_grant_types(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    auth: LocalAuthorizationServer,
    issuer: str,
    token: str,
) -> None:
    original = auth.metadata()
    del original["grant_types_supported"]
    monkeypatch.setattr(auth, "metadata", lambda: original)
    args = [*base_args(issuer, token), "--upstream", GITHUB]
    code, out = doctor(capsys, *args, hidden=(token,))
    endpoint = checklist(out)["token endpoint"]
    assert code == 0  # the member is optional: a note, not a failure
    assert endpoint.status == "PASS"
    assert "grant_types_supported is not published" in endpoint.detail

    original["grant_types_supported"] = ["authorization_code"]
    code, out = doctor(capsys, *args, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert checks["token endpoint"].status == "FAIL"
    assert checks["token endpoint"].fix is not None
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in checks["token endpoint"].fix
    assert checks["client credentials"].status == "SKIP"


def test_jwks_problems(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str, token: str
) -> None:
    auth.extra_jwks = [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}, {"kty": "EC", "use": "enc"}]
    code, out = doctor(capsys, *base_args(issuer, token), hidden=(token,))
    jwks = checklist(out)["JWKS"]
    assert code == 0
    assert jwks.detail.endswith("; 2 ignored (1 RSA under 2048 bits, 1 use 'enc')")

    auth.extra_jwks = [{"kty": "oct", "k": "c2VjcmV0"}]
    code, out = doctor(capsys, *base_args(issuer, token), hidden=(token,))
    checks = checklist(out)
    assert code == 1
    assert "publishes secret key material" in checks["JWKS"].detail
    assert checks["user token"] == Line("SKIP", "the issuer's keys are not usable", None)


def test_authorization_server_failing(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str
) -> None:
    auth.fail_status = 500
    code, out = doctor(capsys, "--issuer", issuer, "--resource", RESOURCE)
    assert code == 1
    assert "answered HTTP 500" in checklist(out)["discovery"].detail


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["doctor", "--resource", RESOURCE],  # no --issuer
        ["doctor", "--issuer", "https://as.example", "--resource", RESOURCE, "--timeout", "0"],
        ["doctor", "--issuer", "https://as.example", "--resource", RESOURCE, "--scope", 'a"b'],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "--issuer" in capsys.readouterr().err


def test_command_line(auth: LocalAuthorizationServer, issuer: str, token: str) -> None:
    """The real entry point, with the token and the secret only in the environment."""
    env = {
        **os.environ,
        "ASGI_DELEGATION_TOKEN": token,
        "KEYCARD_CLIENT_ID": CLIENT_ID,
        "KEYCARD_CLIENT_SECRET": CLIENT_SECRET,
    }
    command = [sys.executable, "-m", "asgi_delegation", "doctor", "--issuer", issuer]
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [*command, "--resource", RESOURCE, "--upstream", GITHUB],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_nothing_secret(done.stdout + done.stderr, (token,))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("8 passed, 0 failed, 0 skipped")

    helped = subprocess.run(  # noqa: S603
        [*command[:4], "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0
    assert "Exit codes: 0 no check failed, 1 a check failed, 2 usage error." in helped.stdout


@pytest.mark.parametrize("verbose", [False, True])
def test_only_the_report_is_printed_unless_verbose(
    auth: LocalAuthorizationServer, issuer: str, token: str, verbose: bool
) -> None:
    args = base_args(issuer, token)
    args[args.index(CLIENT_SECRET)] = "not-the-right-secret-42"
    command = [sys.executable, "-m", "asgi_delegation", "doctor", *args, "--upstream", GITHUB]
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [*command, *(["--verbose"] if verbose else [])],
        env={k: v for k, v in os.environ.items() if not k.startswith("KEYCARD_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "FAIL  client credentials" in done.stdout
    assert_nothing_secret(done.stdout + done.stderr, (token, "not-the-right-secret-42"))
    if verbose:
        assert "asgi_delegation.audit: POST token failed" in done.stderr
    else:
        assert done.stderr == ""


# -- several issuers, and opaque tokens ---------------------------------------------------------

PER_ISSUER = ["issuer URL", "discovery", "JWKS", "token endpoint"]


@pytest.fixture
def second() -> Iterator[LocalAuthorizationServer]:
    """Another issuer, on a loopback port of its own, with keys of its own and the same client
    registered (one set of credentials for both, as with ``delegation_auth_servers``)."""
    server = LocalAuthorizationServer()
    server.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    with server.running():
        yield server


def two_issuers(first: str, other: str, token: str) -> list[str]:
    return ["--issuer", first, *base_args(other, token)]


def test_two_issuers_all_green(
    capsys: pytest.CaptureFixture[str],
    issuer: str,
    second: LocalAuthorizationServer,
    token: str,
) -> None:
    args = two_issuers(issuer, second.issuer, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 0, out
    assert list(checks) == [
        "resource URL",
        *(f"{name} ({issuer})" for name in PER_ISSUER),
        *(f"{name} ({second.issuer})" for name in PER_ISSUER),
        "user token",
        "client credentials",
        f"upstream {GITHUB}",
    ]
    assert {line.status for line in checks.values()} == {"PASS"}
    assert checks["user token"].detail.startswith(f"valid for {RESOURCE} (checked at {issuer}): ")


def test_second_issuer_failing_is_named(
    capsys: pytest.CaptureFixture[str],
    auth: LocalAuthorizationServer,
    issuer: str,
    second: LocalAuthorizationServer,
    token: str,
) -> None:
    second.fail_status = 500
    args = two_issuers(issuer, second.issuer, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    failed = [name for name, line in checks.items() if line.status == "FAIL"]
    assert failed == [f"discovery ({second.issuer})"]
    assert "answered HTTP 500" in checks[f"discovery ({second.issuer})"].detail
    assert checks[f"JWKS ({second.issuer})"] == Line("SKIP", "discovery failed", None)
    # The first issuer's token does not depend on the second issuer.
    assert checks[f"discovery ({issuer})"].status == "PASS"
    assert checks["user token"].status == "PASS"
    assert checks[f"upstream {GITHUB}"].status == "PASS"

    theirs = second.mint("alice", audience=RESOURCE)
    code, out = doctor(capsys, *two_issuers(issuer, second.issuer, theirs), hidden=(theirs,))
    user = checklist(out)["user token"]
    assert user == Line("SKIP", f"the keys of {second.issuer} are not usable", None)


def test_jwt_from_the_second_issuer(
    capsys: pytest.CaptureFixture[str],
    auth: LocalAuthorizationServer,
    issuer: str,
    second: LocalAuthorizationServer,
) -> None:
    token = second.mint("bob", audience=RESOURCE, scope="read")
    args = two_issuers(issuer, second.issuer, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 0, out
    user = checks["user token"].detail
    assert user.startswith(f"valid for {RESOURCE} (checked at {second.issuer}): sub 'bob'")
    # The exchange went to the token's own issuer, not the first one configured.
    assert checks[f"upstream {GITHUB}"].status == "PASS"
    assert (len(auth.exchanges), len(second.exchanges)) == (0, 1)

    expired = second.mint("bob", audience=RESOURCE, expires_in=-600)
    code, out = doctor(capsys, *two_issuers(issuer, second.issuer, expired), hidden=(expired,))
    user_line = checklist(out)["user token"]
    assert code == 1
    assert user_line.detail == (
        f"refused (401 invalid_token; checked at {second.issuer}): expired 10 min ago"
    )
    assert f"get a fresh token from {second.issuer}" in (user_line.fix or "")


def test_jwt_naming_an_unconfigured_issuer(
    capsys: pytest.CaptureFixture[str],
    auth: LocalAuthorizationServer,
    issuer: str,
    second: LocalAuthorizationServer,
) -> None:
    stranger = "https://login.elsewhere.example"
    token = auth.mint("alice", audience=RESOURCE, claims={"iss": stranger})
    args = two_issuers(issuer, second.issuer, token)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(token,))
    checks = checklist(out)
    assert code == 1
    user = checks["user token"]
    assert user.detail == (
        f"refused (401 invalid_token): iss is {stranger!r}, which names none of the configured "
        f"issuers ({issuer}, {second.issuer})"
    )
    assert "--issuer" in (user.fix or "")
    assert checks["client credentials"] == Line("SKIP", "no valid user token to exchange", None)


def test_opaque_token_introspected(
    capsys: pytest.CaptureFixture[str], issuer: str, second: LocalAuthorizationServer
) -> None:
    opaque = second.mint_opaque("carol", audience=RESOURCE, scope="read")
    args = [*two_issuers(issuer, second.issuer, opaque), "--introspection", second.issuer]
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(opaque,))
    checks = checklist(out)
    assert code == 0, out
    assert f"introspection ({issuer})" not in checks  # only the issuer of opaque tokens
    introspection = checks[f"introspection ({second.issuer})"]
    assert introspection.detail == (
        f"{second.introspection_endpoint} accepts client {CLIENT_ID!r} and answers a random "
        "token inactive"
    )
    probe, user_token = (form["token"] for form in second.introspections)
    assert probe != opaque
    assert user_token == opaque
    assert checks["user token"].detail.startswith(
        f"valid for {RESOURCE} (introspected at {second.issuer}): sub 'carol', scopes read"
    )
    assert checks[f"upstream {GITHUB}"].status == "PASS"
    assert list(checks).index(f"introspection ({second.issuer})") == 9  # in its issuer's block

    second.revoke(opaque)
    code, out = doctor(capsys, *args, "--upstream", GITHUB, hidden=(opaque,))
    checks = checklist(out)
    assert code == 1
    assert checks[f"introspection ({second.issuer})"].status == "PASS"
    user = checks["user token"]
    assert user.detail == (
        f"refused (401 invalid_token; introspected at {second.issuer}): the introspection "
        "endpoint says it is not active (revoked, expired, or not a token of this issuer)"
    )
    assert user.fix == f"get a fresh token from {second.issuer} (sign in again)"
    assert checks["client credentials"] == Line("SKIP", "no valid user token to exchange", None)


@pytest.mark.parametrize(
    ("answer", "detail", "fix"),
    [
        (
            ScriptedAnswer(401, {"error": "invalid_client"}),
            "refused this middleware's client credentials (HTTP 401): bad application credentials",
            "KEYCARD_CLIENT_SECRET",
        ),
        (
            ScriptedAnswer(403),
            "refused this middleware's client credentials (HTTP 403): bad application credentials",
            "KEYCARD_CLIENT_SECRET",
        ),
        (
            ScriptedAnswer(200, {"active": "false"}),
            "answered an active member that is not a boolean",
            "RFC 7662 2.2",
        ),
        (ScriptedAnswer(200, b"<html>"), "answered not valid JSON", "RFC 7662 2.2"),
        (ScriptedAnswer(200, {"active": True}), "that a random token, never issued, is active", ""),
    ],
)
def test_introspection_endpoint_failing(
    capsys: pytest.CaptureFixture[str],
    auth: LocalAuthorizationServer,
    issuer: str,
    answer: ScriptedAnswer,
    detail: str,
    fix: str,
) -> None:
    opaque = auth.mint_opaque("alice", audience=RESOURCE)
    auth.introspection_answers = [answer]  # the check's request only: the next one is real
    args = [*base_args(issuer, opaque), "--introspection", issuer]
    code, out = doctor(capsys, *args, hidden=(opaque,))
    checks = checklist(out)
    assert code == 1
    introspection = checks["introspection"]  # one issuer: the name says no more
    assert introspection.status == "FAIL"
    assert introspection.detail.startswith(f"{auth.introspection_endpoint} ")
    assert detail in introspection.detail
    assert fix in (introspection.fix or "")
    assert checks["user token"] == Line("SKIP", "the introspection check did not pass", None)
    assert auth.requests["/introspect"] == 1  # the check's: the user token was not sent


def test_introspection_endpoint_location(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    auth: LocalAuthorizationServer,
    issuer: str,
) -> None:
    document = auth.metadata()
    del document["introspection_endpoint"]
    monkeypatch.setattr(auth, "metadata", lambda: document)
    opaque = auth.mint_opaque("alice", audience=RESOURCE)
    args = [*base_args(issuer, opaque), "--introspection", issuer]
    code, out = doctor(capsys, *args, hidden=(opaque,))
    checks = checklist(out)
    assert code == 1
    assert checks["introspection"].detail == "the metadata has no introspection_endpoint"
    assert "--introspection-endpoint" in (checks["introspection"].fix or "")
    assert checks["user token"].status == "SKIP"

    # Given, the endpoint serves the check and the middleware's own introspection alike.
    given = [*args, "--introspection-endpoint", auth.introspection_endpoint]
    code, out = doctor(capsys, *given, hidden=(opaque,))
    checks = checklist(out)
    assert code == 0, out
    assert checks["introspection"].status == "PASS"
    assert checks["user token"].status == "PASS"

    nowhere = f"http://127.0.0.1:{free_port()}/introspect"
    code, out = doctor(capsys, *args, "--introspection-endpoint", nowhere, hidden=(opaque,))
    introspection = checklist(out)["introspection"]
    assert code == 1
    assert introspection.detail == f"{nowhere} could not be reached (ConnectError)"
    assert "reachable" in (introspection.fix or "")

    public = "http://introspection.example/introspect"
    code, out = doctor(capsys, *args, "--introspection-endpoint", public, hidden=(opaque,))
    introspection = checklist(out)["introspection"]
    assert code == 1
    assert introspection.detail.startswith("--introspection-endpoint must use https://")


def test_introspection_without_a_client(
    capsys: pytest.CaptureFixture[str], auth: LocalAuthorizationServer, issuer: str
) -> None:
    args = ["--issuer", issuer, "--resource", RESOURCE, "--introspection", issuer]
    code, out = doctor(capsys, *args)
    checks = checklist(out)
    assert code == 1
    assert checks["introspection"].status == "FAIL"
    assert "no client id" in checks["introspection"].detail
    assert "KEYCARD_CLIENT_ID" in (checks["introspection"].fix or "")
    assert auth.requests["/introspect"] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--introspection", "https://c.example"],
            "--introspection https://c.example must be one of the --issuer values "
            "(https://a.example, https://b.example)",
        ),
        (
            ["--introspection", "https://a.example", "--introspection", "https://b.example"],
            "--introspection may be given once",
        ),
        (["--issuer", "https://a.example"], "--issuer https://a.example is given twice"),
        (["--introspection-endpoint", "https://a.example/i"], "needs --introspection ISSUER"),
    ],
)
def test_issuer_usage_errors(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["--issuer", "https://a.example", "--issuer", "https://b.example", *extra]
    assert main(["doctor", *argv, "--resource", RESOURCE]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("asgi-delegation doctor: ")
    assert message in err
