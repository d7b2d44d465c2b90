"""Real redis-server processes on loopback ports, for the shared-cache tests.

``.ci/run`` installs Debian's redis-server when it is missing. Run elsewhere without it, these
tests skip; in CI (``CI=true``) they fail instead, so a missing server never passes silently.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

READY = b"Ready to accept connections"


def require_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _program(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, name
    return path


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, one whose bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            return port
    for _ in range(1000):
        port = random.randrange(20000, 55000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server on 127.0.0.1: started, stopped, killed and started again on its port."""

    def __init__(
        self, directory: Path, extra: Sequence[str] = (), *, cluster: bool = False
    ) -> None:
        self.directory = directory
        self.port = free_port(cluster)
        self._extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        # No persistence: a restarted server starts empty, as after losing its data.
        self.process = subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            [
                _program("redis-server"),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                *self._extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        seen = b""
        for line in self.process.stdout:  # blocks until the server says it is ready
            seen += line
            if READY in line:
                break
        else:
            self.process.wait(10)
            self.process.stdout.close()
            self.process = None
            raise RuntimeError(f"redis-server did not start:\n{seen.decode(errors='replace')}")
        # Keep its output flowing so that a full pipe never stalls it.
        self._drain = subprocess.Popen(  # noqa: S603
            [_program("cat")], stdin=self.process.stdout, stdout=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self._drain.wait(10)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None

    def cli(self, *args: str) -> str:
        return subprocess.run(  # noqa: S603
            [_program("redis-cli"), "-p", str(self.port), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout


@contextmanager
def redis_server(directory: Path, extra: Sequence[str] = ()) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(directory, extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_cluster(directory: Path, nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``nodes`` masters on loopback ports, slots spread over them."""
    require_redis()
    servers = [
        RedisServer(
            directory / f"node{i}",
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
            cluster=True,
        )
        for i in range(nodes)
    ]
    try:
        for server in servers:
            server.start()
        subprocess.run(  # noqa: S603
            [
                _program("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{server.port}" for server in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        # Wait until every node agrees the cluster is up: redis-cli --cluster check does.
        for server in servers:
            for _ in range(100):
                if "cluster_state:ok" in server.cli("cluster", "info"):
                    break
                time.sleep(0.05)  # gossip has no event to await
            else:
                raise RuntimeError("the cluster did not come up")
        yield servers
    finally:
        for server in servers:
            server.stop()
