"""Shared fixtures: real peers live in tests/peers/ and are loaded as plugins."""

pytest_plugins = ["tests.peers.oidc"]

from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.harness import SidecarHarness, Upstream


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
