"""A real Redis for tests: ``redis-server`` on 127.0.0.1, on a free port, without persistence.

Fixture ``redis_server`` -> :class:`RedisServer` (``.url``, ``.port``, ``.stop()``, ``.start()``).
``stop()`` then ``start()`` simulates an outage and a recovery on the same port; the new
server starts empty (``--save '' --appendonly no``), like a Redis that lost its data.
Skipped when ``redis-server`` is missing (a failure under ``CI=true``); install it with
``apt-get install -y redis-server``. Import it into a test module with
``from tests.peers.redis import redis_server  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

INSTALL_HINT = "apt-get install -y redis-server"
STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """The redis-server path; skip (or fail under CI=true) when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = f"redis-server is not installed ({INSTALL_HINT})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; restartable on the same port."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start (again) on this port and wait until it answers PING."""
        assert not self.running, "redis: already running"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis: redis-server exited with {self.process.returncode}: {err[-500:]}")
            if _pings(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis: no PONG on port {self.port} within {STARTUP_TIMEOUT_S}s")

    def stop(self) -> None:
        """Kill the server: clients see their connections drop, like an outage."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real, empty Redis on a free loopback port; killed at the end of the test."""
    server = RedisServer(redis_binary(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
