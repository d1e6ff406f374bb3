"""Shared fixtures: real peers live in tests/peers/ and are loaded as plugins.

The event loop is the one production runs (``sidecar run`` installs uvloop) unless
``SIDECAR_TEST_LOOP=asyncio`` asks for asyncio's own: ``scripts/test`` runs the suite under both,
since some defects show only under one of them (uvloop delivers bytes to a protocol that paused
reading in ``connection_made``).
"""

pytest_plugins = ["tests.peers.oidc", "tests.peers.moto", "tests.peers.mcp_tools", "tests.peers.grpc_greeter",
                  "tests.peers.a2a"]

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import trustme

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
async def agent() -> AsyncIterator[Upstream]:
    """A real HTTP agent on loopback (what ``inbound.forward_to`` names) that records what reached it."""
    server = await Upstream().start()
    yield server
    await server.stop()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[int]]]:
    """Start a loopback server running ``handler(reader, writer)`` per connection; returns its port.

    Every byte on the wire is the test's, so that framing and reuse are seen, not assumed."""
    servers: list[asyncio.Server] = []
    connections: list[asyncio.Task[Any]] = []

    async def start(handler: RawHandler) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client closed: this connection's script ends
            finally:
                writer.close()

        servers.append(await asyncio.start_server(run, "127.0.0.1", 0))
        return servers[-1].sockets[0].getsockname()[1]

    yield start
    for task in connections:
        task.cancel()
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    """A CA for HTTPS upstreams, one per test module (issuing is slow)."""
    return trustme.CA()


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
