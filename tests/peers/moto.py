"""A real moto server (AWS STS, IAM, S3, DynamoDB) on a free loopback port, for the SigV4 tests.

``moto_server()`` starts it, waits until it answers and stops it; each test module provisions
what it needs (users, roles, buckets) and switches IAM authentication as TESTING.md describes.
Skips with an install hint when ``moto_server`` is missing (CI installs ``moto[server]``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode} before answering")
        try:
            requests.get(f"{base}/moto-api/", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    pytest.fail("moto_server did not answer within 30 s")


@contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """(base URL, port) of a running moto server; IAM authentication off until a test turns it on."""
    if shutil.which("moto_server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("moto_server not on PATH in CI: .ci/run must install moto[server]")
        pytest.skip("moto_server not on PATH (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc)
        yield base, port
    finally:
        proc.kill()
        proc.wait()
