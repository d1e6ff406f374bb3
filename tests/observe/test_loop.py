"""The event loop is observable: a lag histogram, and a watchdog that names what held the loop (issue 12 item 5)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import aiohttp

from tests.harness import admin
from tests.scenarios.connect import billing_config, get, start_https_upstream, through_tunnel
from tests.scenarios.outbound import POLICY, config_for
from tests.scenarios.own_identity import issue

STALL_S = 1.0
SECRET = "loop-local-secret-4f1c9a"


def watched(upstream, report_interval: str = "60s") -> dict:
    config = config_for(upstream)
    config["observability"] = {"loop_sample_interval": "20ms", "stall_threshold": "300ms",
                               "stall_report_interval": report_interval}
    return config


def hold_the_loop() -> None:
    """A callback that blocks the loop thread, with a secret in a local variable."""
    token = SECRET
    time.sleep(STALL_S)
    assert token


async def stall_once() -> None:
    asyncio.get_running_loop().call_soon(hold_the_loop)
    await asyncio.sleep(0)  # the callback runs now, holding the loop for STALL_S
    await asyncio.sleep(0.05)


async def metrics_text(h) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{h.port('metrics')}/metrics") as r:
            return await r.text()


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not exposed"
    return float(match.group(1))


def reports_naming(h, function: str) -> list[dict]:
    return [line for line in h.lines() if line.get("event") == "event_loop_stalled"
            and any(function in frame for frame in line["stack"])]


async def test_a_blocked_loop_is_reported_once_with_the_function_that_blocked_it(make_sidecar, upstream):
    """A callback sleeping on the loop gives one event_loop_stalled report whose stack names it, file and line
    only (no locals), and the lag histogram observes the stall (issue 12 item 5)."""
    h = await make_sidecar(watched(upstream), POLICY)
    await stall_once()
    reports = reports_naming(h, "hold_the_loop")
    assert len(reports) == 1
    frame = next(f for f in reports[0]["stack"] if "hold_the_loop" in f)
    assert re.fullmatch(r".*/tests/observe/test_loop\.py:\d+ in hold_the_loop", frame)
    assert reports[0]["level"] == "warning" and reports[0]["late_ms"] >= 300
    assert SECRET not in h.raw_log().decode()
    text = await metrics_text(h)
    over_half_a_second = (sample(text, "sidecar_event_loop_lag_seconds_count")
                          - sample(text, 'sidecar_event_loop_lag_seconds_bucket{le="0.5"}'))
    assert over_half_a_second >= 1
    assert sample(text, "sidecar_event_loop_stalls_total") >= 1


async def test_stall_reports_are_rate_limited_and_every_stall_is_counted(make_sidecar, upstream):
    """Two stalls within stall_report_interval: one report, two counted in sidecar_event_loop_stalls_total
    (issue 12 item 5)."""
    h = await make_sidecar(watched(upstream), POLICY)
    await stall_once()
    await asyncio.sleep(0.1)  # the loop runs again between the two
    await stall_once()
    assert len(reports_naming(h, "hold_the_loop")) == 1
    assert sample(await metrics_text(h), "sidecar_event_loop_stalls_total") >= 2


# -- what used to run on the loop: reading and compiling files on reload (issue 12 item 5) ---------

class Fifo:
    """A named pipe standing in for a file on a disk that does not answer: a read of it waits for ``feed``.

    The test holds a writing end from the start, so a reader's open returns and its read waits. A
    daemon thread ends such reads after a while and until ``replace_with``: a test that fails part-way
    (or code that reads on the loop) never leaves a reader blocked for good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR)
        self._inode = os.fstat(self._fd).st_ino
        self.fed = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._safety, daemon=True).start()

    def reading(self) -> bool:
        """Someone in this process has the pipe open besides the test: a read of it has begun."""
        opened = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                opened += os.stat(f"/proc/self/fd/{fd}").st_ino == self._inode
            except OSError:
                pass
        return opened > 1

    def feed(self, data: bytes) -> None:
        """Write ``data`` and close the writing end: the waiting read gets it and then the end of the file."""
        with self._lock:
            if self._fd < 0:
                return
            os.write(self._fd, data)
            os.close(self._fd)
            self._fd = -1
        self.fed.set()

    def _safety(self) -> None:
        if self._done.wait(15.0):
            return
        self.feed(b"")
        while not self._done.wait(0.2):  # later readers: end their reads too
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    def replace_with(self, data: bytes) -> None:
        """A plain file again, for whoever looks next."""
        tmp = self.path.with_suffix(".plain")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._done.set()


async def answered_while_waiting(h, fifo: Fifo) -> None:
    """Once a read of the pipe has begun, a request through the sidecar is still answered: the loop is free."""
    for _ in range(100):  # bounded; a loop held by the read cannot even get here until the safety ends it
        if fifo.reading():
            break
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"{h.outbound}/billing/v1/during") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{h.port('health')}/healthz") as r:
            assert r.status == 200
    assert fifo.reading() and not fifo.fed.is_set(), "the request was answered only once the file read ended"


async def test_a_policy_reload_reads_and_compiles_off_the_loop(make_sidecar, upstream, tmp_path):
    """POST /reload reads and compiles the policy files in a worker thread: a policy file that does not answer
    does not hold requests (issue 12 item 5)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    policy_file = tmp_path / "policy.yaml"
    text = policy_file.read_bytes()
    policy_file.unlink()
    fifo = Fifo(policy_file)
    reload = asyncio.ensure_future(admin(h, "POST", "/reload"))
    try:
        await answered_while_waiting(h, fifo)
        fifo.feed(text)
        status, body = await asyncio.wait_for(reload, 30)
    finally:
        fifo.replace_with(text)
    assert (status, body["status"]) == (200, "reloaded")
    assert upstream.seen[-1].path.endswith("/v1/during")


async def test_an_svid_rotation_reads_the_files_and_loads_the_key_off_the_loop(make_sidecar, upstream, tmp_path):
    """The SVID watch reads the rotated files, loads the key and builds the TLS contexts in a worker thread: a
    certificate file that does not answer does not hold requests (issue 12 item 5)."""
    live = tmp_path / "live"
    first = issue(tmp_path / "ca", live)
    second = issue(tmp_path / "ca", tmp_path / "second")
    config = config_for(upstream)
    config["identity"] = {"svid": {"cert": str(first["cert"]), "key": str(first["key"]),
                                   "bundle": str(first["bundle"])}}
    h = await make_sidecar(config, POLICY)
    before = h.sidecar.identity.state.cert_sha256
    key = second["key"].read_bytes()
    fifo = Fifo(tmp_path / "key.fifo")  # the key: read once per load (the certificate is read twice)
    os.replace(fifo.path, first["key"])  # no await in between: the watch sees the new pair at once
    os.replace(second["cert"], first["cert"])
    fifo.path = first["key"]
    try:
        await answered_while_waiting(h, fifo)
        fifo.feed(key)
        for _ in range(200):  # bounded: the watch applies the new identity on the loop
            if h.sidecar.identity.state.cert_sha256 != before:
                break
            await asyncio.sleep(0.05)
    finally:
        fifo.replace_with(key)
    assert h.sidecar.identity.state.cert_sha256 != before


async def test_a_connect_to_a_new_host_mints_its_leaf_off_the_loop(make_sidecar, tmp_path, upstream_ca):
    """The interception leaf for a host not seen before (a key, a signature, a file) is made in a worker
    thread, and the tunnel works with it (issue 12 item 5)."""
    up = await start_https_upstream(upstream_ca)
    try:
        h = await make_sidecar(billing_config(up, upstream_ca, tmp_path), POLICY)
        ca = h.sidecar.interceptor.ca
        minted_on: list[str] = []
        mint = ca._mint

        def spy(*args):
            minted_on.append(threading.current_thread().name)
            return mint(*args)

        ca._mint = spy
        [(status, _, _)] = await through_tunnel(h, get("/api/v1/invoices"))
        assert status == 200 and len(minted_on) == 1
        assert minted_on[0] != threading.main_thread().name
    finally:
        await up.stop()


async def test_the_loops_tasks_and_pooled_connections_are_gauges(make_sidecar, upstream):
    """What a soak watches for growth, read when scraped: the loop's asyncio tasks, and each pool's open
    and idle upstream connections (a kept-alive connection is idle once its exchange is over)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    before = await metrics_text(h)
    assert sample(before, 'sidecar_upstream_connections{state="open",upstream="billing"}') == 0
    async with aiohttp.ClientSession() as s:
        for n in range(3):
            async with s.get(f"{h.outbound}/billing/v1/kept-{n}") as r:
                assert r.status == 200
    after = await metrics_text(h)
    assert sample(after, 'sidecar_upstream_connections{state="open",upstream="billing"}') == 1  # reused
    assert sample(after, 'sidecar_upstream_connections{state="idle",upstream="billing"}') == 1
    assert sample(after, "sidecar_asyncio_tasks") >= 1  # at least the scrape's own handler
