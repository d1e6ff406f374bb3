"""Shared fixtures: real peers live in tests/peers/ and are loaded as plugins.

The event loop is the one production runs (``sidecar run`` installs uvloop) unless
``SIDECAR_TEST_LOOP=asyncio`` asks for asyncio's own: ``scripts/test`` runs the suite under both,
since some defects show only under one of them (uvloop delivers bytes to a protocol that paused
reading in ``connection_made``).
"""

pytest_plugins = ["tests.peers.oidc"]

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.harness import SidecarHarness, Upstream

TEST_LOOP = os.environ.get("SIDECAR_TEST_LOOP", "uvloop")
if TEST_LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
elif TEST_LOOP != "asyncio":
    raise RuntimeError(f"tests: SIDECAR_TEST_LOOP is {TEST_LOOP!r}; expected 'uvloop' or 'asyncio'")


def pytest_report_header() -> str:
    return f"event loop: {TEST_LOOP}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real HTTP upstream on loopback that records what reached it."""
    server = await Upstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def make_sidecar(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SidecarHarness]]]:
    """Start real sidecars from a config and policy dict; stopped at the end of the test."""
    started: list[SidecarHarness] = []

    async def make(config: dict[str, Any], policy: dict[str, Any]) -> SidecarHarness:
        harness = await SidecarHarness(tmp_path, config, policy).start()
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.stop()
