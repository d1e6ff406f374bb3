"""A fleet of real ``sidecar run`` processes sharing one real Redis, for the fleet test and benchmark.

:class:`Fleet` takes the members' ``revocation`` section (``{"redis_url": ...}``, or ``{"sentinel":
...}`` for a Sentinel group), writes one config per member (its own ``state_dir``, admin token file and free
loopback ports), starts every process at once (``python -m sidecar run -c FILE``), waits until
each answers ``/readyz`` 200, and stops them with SIGTERM. :class:`Member` offers the admin
API, outbound calls naming a task, ``/metrics``, and ways to cut a member off: ``pause()``
(SIGSTOP) and ``drop_redis_connections()`` (Redis ``CLIENT KILL`` of the member's sockets,
found through ``/proc``). :class:`PlainUpstream` is a real HTTP upstream in a thread.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.peers.redis import free_ports

REPO = Path(__file__).resolve().parents[2]
LISTENERS = ("outbound", "health", "metrics", "admin")
READY_POLL_S = 0.1
READY_POLLS = 900  # bounded: 10 cold Python processes on 2 cores take a while
MAX_RESTARTS = 3

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "billing-all", "direction": "outbound", "upstream": "billing", "paths": ["/v1/**"], "effect": "allow"},
]}


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sidecar that cuts a revoked call mid-response breaks the pipe: expected, not printed."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class PlainUpstream:
    """A real HTTP/1.1 server on loopback, answering every GET with 200 JSON, in a daemon thread."""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Ok)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Member:
    index: int
    dir: Path
    revocation: dict[str, Any]
    upstream_url: str
    ports: dict[str, int] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"fleet-{self.index:02d}"

    @property
    def config_file(self) -> Path:
        return self.dir / "sidecar.yaml"

    @property
    def log_file(self) -> Path:
        return self.dir / "sidecar.log"

    def url(self, listener: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    def write_config(self, policy_file: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(LISTENERS, free_ports(len(LISTENERS))))
        token_file = self.dir / "admin-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        config = {
            "agent": {"name": self.name, "environment": "fleet-test"},
            "state_dir": str(self.dir / "state"),
            "outbound": {"listen": f"127.0.0.1:{self.ports['outbound']}",
                         "upstreams": {"billing": {"url": self.upstream_url + "/api"}}},
            "policy": {"files": [str(policy_file)]},
            "revocation": {**self.revocation, "require_sync": True},
            "admin": {"listen": f"127.0.0.1:{self.ports['admin']}", "token_file": str(token_file)},
            "health": {"listen": f"127.0.0.1:{self.ports['health']}"},
            "metrics": {"listen": f"127.0.0.1:{self.ports['metrics']}"},
            "logging": {"level": "warning"},
            "shutdown": {"drain": "1s"},
        }
        self.config_file.write_text(yaml.safe_dump(config))

    # -- the process -------------------------------------------------------------------------
    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(self.config_file)],
                                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("health", "/readyz"), timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def readiness(self) -> str:
        """What /readyz answers now (its status and body), for the error that says why a member waits."""
        try:
            with urllib.request.urlopen(self.url("health", "/readyz"), timeout=2) as r:
                return f"{r.status} {r.read(300)!r}"
        except urllib.error.HTTPError as exc:
            return f"{exc.code} {exc.read(300)!r}"
        except (urllib.error.URLError, OSError) as exc:
            return f"no answer ({type(exc).__name__})"

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.process.terminate()

    def wait(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def drop_redis_connections(self, redis_port: int) -> int:
        """Close this member's Redis connections from the server side (CLIENT KILL); how many."""
        assert self.process is not None
        ports = client_ports(self.process.pid, redis_port)
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as s:
            for port in ports:
                s.sendall(f"CLIENT KILL ADDR 127.0.0.1:{port}\r\n".encode())
                s.recv(256)
        return len(ports)

    # -- HTTP --------------------------------------------------------------------------------
    async def admin(self, session: aiohttp.ClientSession, method: str, path: str,
                    body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with session.request(method, self.url("admin", path), json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def open_task(self, session: aiohttp.ClientSession, principal: str) -> str:
        status, body = await self.admin(session, "POST", "/tasks", {"principal": principal, "ttl": "10m"})
        assert status == 201, (self.name, body)
        return body["id"]

    async def call(self, session: aiohttp.ClientSession, task: str) -> tuple[int, str]:
        """One outbound call naming the task: (status, reason code or 'ok'), or (0, 'cut') when a
        revocation cut it mid-response (a call in flight when the revocation arrives)."""
        try:
            async with session.get(self.url("outbound", "/billing/v1/invoices"),
                                   headers={"X-Sidecar-Task": task}) as r:
                body = await r.json(content_type=None)
                return r.status, body.get("error", "ok") if isinstance(body, dict) else "ok"
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            return 0, "cut"

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(self.url("metrics", "/metrics")) as r:
            return await r.text()


class Fleet:
    """N sidecar processes sharing one Redis (or one Sentinel group) and one upstream."""

    def __init__(self, root: Path, revocation: dict[str, Any], upstream_url: str, size: int) -> None:
        self.root = root
        self.policy_file = root / "policy.yaml"
        root.mkdir(parents=True, exist_ok=True)
        self.policy_file.write_text(yaml.safe_dump(POLICY))
        self.members = [Member(i, root / f"m{i:02d}", revocation, upstream_url) for i in range(size)]
        for member in self.members:
            member.write_config(self.policy_file)

    def start(self) -> None:
        """Start every member at once, then wait (bounded) until each is ready.

        A member that exited on a port taken meanwhile (free_ports chose it free, something bound it before the
        member did) is started again on new ports, at most MAX_RESTARTS in all. If the wait runs out, the error
        carries each waiting member's /readyz answer and the first one's log. (A member whose port was taken
        used to wait forever instead of exiting: tests/fleet/test_stopping.py.)"""
        for member in self.members:
            member.start()
        waiting = list(self.members)
        restarts = 0
        for _ in range(READY_POLLS):
            for member in list(waiting):
                if member.exited() is not None:
                    if restarts >= MAX_RESTARTS or "address already in use" not in member.log_tail().lower():
                        raise RuntimeError(f"fleet: {member.name} exited with {member.exited()}:\n"
                                           f"{member.log_tail()}")
                    restarts += 1
                    member.write_config(self.policy_file)
                    member.start()
                    continue
                if member.ready():
                    waiting.remove(member)
            if not waiting:
                return
            time.sleep(READY_POLL_S)
        answers = "; ".join(f"{m.name}: {m.readiness()}" for m in waiting)
        raise RuntimeError(f"fleet: not ready after {READY_POLLS} polls: {answers}\n{waiting[0].log_tail()}")

    def stop(self) -> None:
        for member in self.members:
            member.terminate()
        for member in self.members:
            member.wait()


def client_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of the process's TCP connections to 127.0.0.1:remote_port (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, inode = cols[1], cols[2], cols[9]
        if inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            ports.append(int(local.split(":")[1], 16))
    return ports


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Samples of one metric family from a Prometheus exposition: {line-name-with-labels: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
