"""A real moto server (AWS STS, IAM, S3, DynamoDB) on a free loopback port, for the SigV4 tests.

``moto_server()`` starts it, waits until it answers and stops it; the ``moto`` fixture (one server
per test module) provisions a role, a user with a key and a bucket, and ``iam_auth`` switches IAM
authentication on for one test, as TESTING.md describes. Loaded as a plugin by ``tests/conftest.py``.

The server is the moto installed beside the running tests (``python -m moto.server`` with this
interpreter), never a ``moto_server`` found on ``PATH``: a machine-wide older moto would judge our
signatures with its own bugs (moto up to 5.2.3 recomputes an S3 signature over the percent-decoded
query, refusing ``prefix=reports%2Fx`` even when botocore signed it). Skips with an install hint when
moto's server is not installed (CI installs ``moto[server]``); fails when it is older than
:data:`MOTO_MIN` (what pyproject's test extra requires).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from urllib.parse import urlencode

import pytest
import requests

from sidecar.credentials.sigv4 import AwsCredentials, payload_sha256, sign

REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "aws-provider-bucket"
FORM = "application/x-www-form-urlencoded; charset=utf-8"
MOTO_MIN = (5, 2, 4)  # the first moto that checks an S3 signature over the query as sent (pyproject)


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


def _check_moto_installed() -> None:
    """Skip (fail in CI) without moto's server in this environment; fail when that moto is too old."""
    try:
        installed = version("moto")
    except PackageNotFoundError:
        installed = ""
    if not installed or find_spec("flask") is None:  # moto.server needs the [server] extra
        if os.environ.get("CI") == "true":
            pytest.fail(f"moto[server] not installed for {sys.executable} in CI: .ci/run must install '.[test]'")
        pytest.skip(f"moto[server] not installed for {sys.executable} (pip install -e '.[test]')")
    release = tuple(int(part) for part in re.findall(r"\d+", installed)[:3])
    if release < MOTO_MIN:
        pytest.fail(f"moto {installed} is older than {'.'.join(map(str, MOTO_MIN))}: it refuses valid S3 "
                    f"signatures of queries with an encoded '/'; pip install -e '.[test]'")


@contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """(base URL, port) of a running moto server; IAM authentication off until a test turns it on."""
    _check_moto_installed()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc)
        yield base, port
    finally:
        proc.kill()
        proc.wait()


@dataclass(frozen=True, slots=True)
class Moto:
    """A running moto server (IAM authentication off between tests) and a user's key."""

    base: str
    port: int
    user: AwsCredentials


def _setup_call(base: str, port: int, service: str, method: str, path: str, body: bytes = b"") -> str:
    """A setup call while authentication is off: signed only so that moto routes it."""
    bootstrap = AwsCredentials("AKIDBOOTSTRAP", "unchecked-while-auth-is-off")
    headers = [("Content-Type", FORM)] if body else []
    host = f"127.0.0.1:{port}"
    added = sign(method, host, path, "", headers, payload_sha256(body), bootstrap, REGION, service,
                 datetime.now(timezone.utc))
    response = requests.request(method, base + path, data=body, headers=dict([*headers, *added]))
    response.raise_for_status()
    return response.text


def _iam(base: str, port: int, action: str, **params: str) -> str:
    body = urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
    return _setup_call(base, port, "iam", "POST", "/", body)


def xml_value(text: str, tag: str) -> str:
    match = re.search(f"<{tag}>([^<]*)</{tag}>", text)
    assert match, f"no <{tag}> in moto's answer"
    return match.group(1)


def _provision(base: str, port: int) -> AwsCredentials:
    """A role the web identity may assume, a user with a key, both allowed everything; a bucket."""
    allow_all = json.dumps({"Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    trust = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
        "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/agents.example.test"}}]})
    _iam(base, port, "CreateRole", RoleName="agent", AssumeRolePolicyDocument=trust)
    _iam(base, port, "PutRolePolicy", RoleName="agent", PolicyName="all", PolicyDocument=allow_all)
    _iam(base, port, "CreateUser", UserName="static-agent")
    _iam(base, port, "PutUserPolicy", UserName="static-agent", PolicyName="all", PolicyDocument=allow_all)
    key = _iam(base, port, "CreateAccessKey", UserName="static-agent")
    _setup_call(base, port, "s3", "PUT", f"/{BUCKET}")
    return AwsCredentials(xml_value(key, "AccessKeyId"), xml_value(key, "SecretAccessKey"))


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """A provisioned moto server on a free loopback port, IAM authentication off."""
    with moto_server() as (base, port):
        yield Moto(base, port, _provision(base, port))


def _set_auth(moto: Moto, count: str) -> None:
    requests.post(f"{moto.base}/moto-api/reset-auth", data=count.encode()).raise_for_status()


@pytest.fixture
def iam_auth(moto: Moto) -> Iterator[Callable[[], None]]:
    """A switch that turns moto's IAM authentication on; it is off again after the test."""
    yield lambda: _set_auth(moto, "0")
    _set_auth(moto, "inf")
