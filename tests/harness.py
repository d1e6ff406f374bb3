"""Running a real sidecar in the test's event loop, with real loopback peers around it.

``SidecarHarness`` writes a config and policy into a temporary directory (every listener on
port 0), starts :class:`sidecar.app.Sidecar`, captures its log lines, and offers clients for
each listener. ``Upstream`` is a real aiohttp server that records what reached it.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import jsonschema  # type: ignore[import-untyped]
import yaml
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.observe.decision_log import configure_logging

EPHEMERAL = "127.0.0.1:0"
SCHEMA = json.loads((Path(__file__).parents[1] / "sidecar" / "schemas" / "trust_decision.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@dataclass
class Seen:
    method: str
    path: str  # raw path + query, as received
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def has_header(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k, _ in self.headers)


class Upstream:
    """A real HTTP server on loopback that records every request that reached it."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None) -> None:
        self.seen: list[Seen] = []
        self._handler = handler
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _record(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if self._handler is None else b""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.seen.append(Seen(request.method, request.raw_path, headers, body))
        if self._handler is not None:
            return await self._handler(request)
        return web.json_response({"ok": True, "path": request.raw_path})

    async def start(self, ssl_context: Any = None) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Held:
    """An upstream handler that holds each request until ``release`` is set; ``started`` says one arrived."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: web.Request) -> web.Response:
        self.started.set()
        await self.release.wait()
        return web.Response(text="done")


@dataclass
class SidecarHarness:
    tmp: Path
    config: dict[str, Any]
    policy: dict[str, Any]
    log: io.BytesIO = field(default_factory=io.BytesIO)
    sidecar: Sidecar | None = None
    watch_policy: bool = False  # as under ``sidecar run``

    async def start(self) -> SidecarHarness:
        policy_path = self.tmp / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(self.policy))
        raw = json.loads(json.dumps(self.config))
        raw.setdefault("state_dir", str(self.tmp / "state"))
        raw.setdefault("policy", {}).setdefault("files", [str(policy_path)])
        for section in ("health", "metrics", "admin"):
            raw.setdefault(section, {}).setdefault("listen", EPHEMERAL)
        raw.setdefault("outbound", {}).setdefault("listen", EPHEMERAL)
        if "inbound" in raw:
            raw["inbound"].setdefault("listen", EPHEMERAL)
        raw.setdefault("shutdown", {}).setdefault("drain", "2s")
        configure_logging("debug", stream=self.log)
        self.sidecar = Sidecar(parse_config(raw, base_dir=self.tmp), watch_policy=self.watch_policy)
        await self.sidecar.start()
        return self

    async def stop(self) -> None:
        if self.sidecar is not None:
            await self.sidecar.stop()
        from sidecar.observe import decision_log

        decision_log.WRITER.flush()

    def port(self, listener: str) -> int:
        assert self.sidecar is not None
        return self.sidecar.ports[listener]

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.port('outbound')}"

    def admin_token(self) -> str:
        assert self.sidecar is not None
        return self.sidecar.config.admin.token_file.read_text().strip()

    def lines(self) -> list[dict[str, Any]]:
        from sidecar.observe import decision_log

        decision_log.WRITER.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.strip()]

    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("event") == "trust_decision"]

    async def settle(self) -> list[dict[str, Any]]:
        """Let the event loop finish recording, then return the trust-decision events."""
        await asyncio.sleep(0.01)
        return self.events()

    def raw_log(self) -> bytes:
        from sidecar.observe import decision_log

        decision_log.WRITER.flush()
        return self.log.getvalue()


def assert_valid(events: list[dict[str, Any]]) -> None:
    """Every trust-decision event given matches the published schema (and there is at least one)."""
    assert events, "no trust-decision events were emitted"
    for event in events:
        errors = sorted(VALIDATOR.iter_errors(event), key=str)
        assert not errors, f"{event}: {[e.message for e in errors]}"


async def admin(h: SidecarHarness, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {h.admin_token()}", **kwargs.pop("headers", {})}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"http://127.0.0.1:{h.port('admin')}{path}", headers=headers, **kwargs) as r:
            return r.status, await r.json(content_type=None)


async def wait_ready(session: aiohttp.ClientSession, port: int, *, tries: int = 200) -> None:
    """Until the health listener on ``port`` answers /readyz 200 (a sidecar started as a process)."""
    for _ in range(tries):
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("sidecar did not become ready")


async def raw_http(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection and read the response until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for a listener whose port a config must name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"  # the smallest whole answer a raw server writes
BOUND = 3.0  # seconds any single wait on a raw connection may take before it counts as a hang


async def open_outbound(h: SidecarHarness, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the outbound listener with ``head`` (``%d``: the listener's port) written on it."""
    port = h.port("outbound")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace(b"%d", str(port).encode()))
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    async with asyncio.timeout(BOUND):
        return await reader.readuntil(marker)


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(BOUND):
        return await reader.read()
