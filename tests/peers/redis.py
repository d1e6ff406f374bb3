"""A real Redis for tests: ``redis-server`` on 127.0.0.1, on a free port, without persistence.

Fixture ``redis_server`` -> :class:`RedisServer` (``.url``, ``.port``, ``.stop()``, ``.start()``).
``stop()`` then ``start()`` simulates an outage and a recovery on the same port; the new
server starts empty (``--save '' --appendonly no``, a new ``--dir``), like a Redis that lost its data.
``RedisServer(..., tls=TlsFiles(...))`` serves TLS only (``--port 0 --tls-port PORT``; Debian's
build has TLS); ``args`` adds directives (``--user NAME on >PASSWORD ...`` for an ACL).

Fixture ``sentinel_group`` -> :class:`SentinelGroup`: one primary, one replica and three sentinels
(quorum 2, ``redis-server CONF --sentinel``, so no ``redis-sentinel`` package is needed), with a
short ``down-after-milliseconds`` and ``failover-timeout`` so that after ``kill_primary()``
(``kill -9``) the replica is promoted within seconds.

Skipped when ``redis-server`` is missing (a failure under ``CI=true``); install it with
``apt-get install -y redis-server``. Import a fixture into a test module with
``from tests.peers.redis import redis_server  # noqa: F401``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

INSTALL_HINT = "apt-get install -y redis-server"
STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago: held open together while chosen, so that
    no two are the same (one at a time, the kernel may hand out a port just released)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def redis_binary() -> str:
    """The redis-server path; skip (or fail under CI=true) when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = f"redis-server is not installed ({INSTALL_HINT})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and key, and the CA that signed them (what clients trust)."""

    cert: Path
    key: Path
    ca: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def tls_files(directory: Path, ca: trustme.CA, host: str = "127.0.0.1") -> TlsFiles:
    """A certificate for host signed by ca, written under directory (PEM files)."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(host)
    files = TlsFiles(directory / "redis.crt", directory / "redis.key", directory / "ca.pem")
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def _answers(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether the server answers PING (PONG, or NOAUTH when an ACL keeps the default user out)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process (or a sentinel, with ``config_file``); restartable on the same port."""

    def __init__(self, binary: str, port: int, *, tls: TlsFiles | None = None, args: Sequence[str] = (),
                 config_file: Path | None = None) -> None:
        self.binary = binary
        self.port = port
        self.tls = tls
        self.args = tuple(args)
        self.config_file = config_file
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        head = [self.binary, str(self.config_file), "--sentinel"] if self.config_file else [self.binary]
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "optional"]
        return [*head, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.directory), "--loglevel", "warning", *self.args]

    def start(self) -> RedisServer:
        """Start (again) on this port and wait until it answers PING."""
        assert not self.running, "redis: already running"
        # a directory of its own, new each start: a replica writes the primary's data there (dump.rdb),
        # and a server loads any dump.rdb it finds at start
        self.directory = Path(tempfile.mkdtemp(prefix="redis-"))
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        context = self.tls.client_context() if self.tls else None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis: redis-server exited with {self.process.returncode}: {err[-500:]}")
            if _answers(self.port, context):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis: no PONG on port {self.port} within {STARTUP_TIMEOUT_S}s")

    def stop(self) -> None:
        """Kill the server (SIGKILL, as ``kill -9``): clients see their connections drop, like an outage."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


SERVICE = "sidecar-bus"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 1500
FORM_POLLS = 300  # 0.05 s apart: the replica syncs, the sentinels see it


class SentinelGroup:
    """One primary, one replica and three sentinels watching them as ``SERVICE`` (quorum 2).

    With ``tls`` every process serves TLS only and they talk TLS to each other; with ``password`` the
    data nodes require it (the replica and the sentinels authenticate with it); with
    ``sentinel_password`` the sentinels require theirs.
    """

    def __init__(self, binary: str, directory: Path, *, tls: TlsFiles | None = None, password: str | None = None,
                 sentinel_password: str | None = None) -> None:
        self.tls = tls
        self.password = password
        self.sentinel_password = sentinel_password
        common = ("--tls-replication", "yes") if tls else ()
        self._data_args = (*common, "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
                           *(("--requirepass", password, "--masterauth", password) if password else ()))
        primary, replica, *sentinels = free_ports(5)  # a sentinel on a data node's port would never form
        self.primary = RedisServer(binary, primary, tls=tls, args=self._data_args)
        self.replica = RedisServer(binary, replica, tls=tls, args=self._replica_of(self.primary.port))
        self.sentinels = [RedisServer(binary, port, tls=tls, args=common,
                                      config_file=directory / f"sentinel-{i}.conf") for i, port in enumerate(sentinels)]
        ids = [secrets.token_hex(20) for _ in self.sentinels]
        for server, myid in zip(self.sentinels, ids):
            assert server.config_file is not None  # the sentinel rewrites it: one file each
            server.config_file.write_text("\n".join([*self._sentinel_conf(myid), *(
                # each sentinel knows its peers from the start, instead of after hellos (2 s apart)
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other.port} {other_id}"
                for other, other_id in zip(self.sentinels, ids) if other is not server), ""]))

    def _replica_of(self, port: int) -> tuple[str, ...]:
        return (*self._data_args, "--replicaof", "127.0.0.1", str(port))

    def _sentinel_conf(self, myid: str) -> list[str]:
        lines = [f"sentinel myid {myid}", f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2",
                 f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica.port}"]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        return lines

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> SentinelGroup:
        """Start every process and wait (bounded) until the group could fail over."""
        for server in (self.primary, self.replica, *self.sentinels):
            server.start()
        self.wait_formed()
        return self

    def wait_formed(self) -> None:
        for _ in range(FORM_POLLS):
            if self._formed():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis: the sentinels did not see a replica in sync and each other in time")

    def _formed(self) -> bool:
        """A replica is in sync, and every sentinel sees it and the two other sentinels."""
        primary = self.primary_port()
        replica = next(s for s in (self.primary, self.replica) if s.port != primary)
        if not replica.running or self.node(replica.port).info("replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            client = self.sentinel(sentinel.port)
            replicas = client.sentinel_slaves(SERVICE)
            if client.sentinel_master(SERVICE)["num-other-sentinels"] < 2 or not any(
                    r.get("master-link-status") == "ok" and not r["is_sdown"] for r in replicas):
                return False
        return True

    def node(self, port: int) -> redis.Redis:
        return _client(port, self.password, self.tls)

    def sentinel(self, port: int) -> redis.Redis:
        return _client(port, self.sentinel_password, self.tls)

    def primary_port(self) -> int:
        """The primary's port, as the sentinels name it now."""
        host, port = self.sentinel(self.sentinels[0].port).sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def kill_primary(self) -> int:
        """``kill -9`` the process the sentinels name as primary; its port."""
        port = self.primary_port()
        next(s for s in (self.primary, self.replica) if s.port == port).stop()
        return port

    def wait_for_failover(self, old_port: int, polls: int = FORM_POLLS) -> int:
        """The new primary's port once every sentinel names another one (bounded polling)."""
        for _ in range(polls):
            ports = {int(self.sentinel(s.port).sentinel_get_master_addr_by_name(SERVICE)[1]) for s in self.sentinels}
            if len(ports) == 1 and old_port not in ports:
                return ports.pop()
            time.sleep(0.05)
        raise RuntimeError(f"redis: no failover from port {old_port}")

    def revive(self) -> None:
        """Restart the killed data node (empty) as the new primary's replica; wait until the sentinels see it."""
        node = next(s for s in (self.primary, self.replica) if not s.running)
        node.args = self._replica_of(self.primary_port())
        node.start()
        self.wait_formed()

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.stop()


def _client(port: int, password: str | None, tls: TlsFiles | None) -> redis.Redis:
    options = {"ssl": True, "ssl_ca_certs": str(tls.ca)} if tls else {}
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2, decode_responses=True,
                       **options)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real, empty Redis on a free loopback port; killed at the end of the test."""
    server = RedisServer(redis_binary(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A real primary, replica and three sentinels on free loopback ports; killed at the end of the test."""
    group = SentinelGroup(redis_binary(), tmp_path).start()
    try:
        yield group
    finally:
        group.stop()
