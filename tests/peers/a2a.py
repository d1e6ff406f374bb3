"""The ``a2a-sdk`` agent (``tests/peers/a2a_sdk/server.py``) as a fixture: a real A2A server on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from a2a.helpers.proto_helpers import new_message, new_text_part
from a2a.types.a2a_pb2 import Role, SendMessageRequest

SERVER = Path(__file__).parent / "a2a_sdk" / "server.py"


@pytest.fixture(scope="module")
def planner() -> Iterator[str]:
    """The a2a-sdk agent on 127.0.0.1: its base URL."""
    proc = subprocess.Popen([sys.executable, str(SERVER)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline() if proc.stdout else b""
    assert line.startswith(b"PORT "), line
    yield f"http://127.0.0.1:{int(line.split()[1])}"
    proc.kill()
    proc.wait()


def text(words: str, task_id: str | None = None) -> SendMessageRequest:
    """A user message of one text part (continuing ``task_id`` if given)."""
    return SendMessageRequest(message=new_message([new_text_part(words)], task_id=task_id, role=Role.ROLE_USER))
