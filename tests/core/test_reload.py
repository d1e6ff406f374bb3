"""The one reload contract (sidecar.reload): built off the loop, applied whole or not at all, counted,
logged, returned; and the one file watcher that drives it for the policy and the identity."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter

from sidecar.admin import reload_response
from sidecar.reload import FileWatcher, ReloadFailed, Reloaded, Reloader
from tests.harness import SidecarHarness, Upstream
from tests.scenarios.outbound import POLICY, config_for


class Versioned:
    """A Reloadable over one file: the candidate is the file's text, refused when it says ``broken``."""

    name = "versioned"

    def __init__(self, path: Path, gate: threading.Event | None = None) -> None:
        self.path = path
        self.gate = gate  # when given, build() waits for it after reading: a read that does not return
        self.current = path.read_text()
        self.built_on: list[str] = []
        self.applied_on: list[str] = []

    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    def build(self) -> str:
        self.built_on.append(threading.current_thread().name)
        text = self.path.read_text()
        if self.gate is not None:
            assert self.gate.wait(10)
        if "broken" in text:
            raise ReloadFailed([f"versioned: {self.path.name} is broken", "versioned: and says so"])
        return text

    def apply(self, candidate: str) -> dict[str, object]:
        self.applied_on.append(threading.current_thread().name)
        self.current = candidate
        return {"version": candidate}

    def in_force(self) -> str:
        return self.current


def counter() -> Counter:
    return Counter("reloads", "Reloads, by outcome.", ["outcome"], registry=CollectorRegistry())


def count(c: Counter, outcome: str) -> float:
    return c.labels(outcome)._value.get()


def target(tmp_path: Path, text: str = "v1", gate: threading.Event | None = None) -> Versioned:
    path = tmp_path / f"state-{len(list(tmp_path.iterdir()))}.txt"
    path.write_text(text)
    return Versioned(path, gate)


async def test_a_good_candidate_is_built_in_a_worker_thread_and_applied_on_the_loop(tmp_path):
    """build() reads and parses off the loop; apply() runs on it; the outcome names what is in force."""
    state, c = target(tmp_path), counter()
    state.path.write_text("v2")
    result = await Reloader(state, c).reload()
    assert result == Reloaded("versioned", True, "v2")
    assert state.built_on != [threading.current_thread().name]
    assert state.applied_on == [threading.current_thread().name]
    assert (count(c, "ok"), count(c, "error")) == (1, 0)


async def test_a_failed_candidate_keeps_the_last_good_state_counted_and_said(tmp_path):
    """ReloadFailed from build(): nothing is applied, the error is counted and every message returned."""
    state, c = target(tmp_path), counter()
    state.path.write_text("broken")
    result = await Reloader(state, c).reload()
    assert result == Reloaded("versioned", False, "v1", ("versioned: state-0.txt is broken", "versioned: and says so"))
    assert state.current == "v1" and state.applied_on == []
    assert (count(c, "ok"), count(c, "error")) == (0, 1)


async def test_reload_if_changed_reads_only_files_that_changed(tmp_path):
    """An unchanged stamp is no reload at all (None, nothing counted); a change is reloaded once."""
    state, c = target(tmp_path), counter()
    reloader = Reloader(state, c)
    assert await reloader.reload_if_changed() is None
    state.path.write_text("v2-longer")
    assert (await reloader.reload_if_changed()) == Reloaded("versioned", True, "v2-longer")
    assert await reloader.reload_if_changed() is None
    assert len(state.built_on) == 1 and count(c, "ok") == 1


def test_check_reloads_on_this_thread_once_per_change(tmp_path):
    """check(): the synchronous form, True only when a new state is in force."""
    state = target(tmp_path)
    reloader = Reloader(state, counter())
    assert not reloader.check()
    state.path.write_text("broken")
    assert not reloader.check() and state.current == "v1"
    state.path.write_text("v3")
    assert reloader.check() and state.current == "v3"
    assert state.built_on == [threading.current_thread().name] * 2


async def until(condition, what: str) -> None:
    for _ in range(200):  # bounded: 10 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_watcher_never_starts_a_reload_twice_while_one_is_in_flight(tmp_path):
    """A change seen while its reload is still reading is not a second reload; it is read after the first."""
    gate = threading.Event()
    state = target(tmp_path, gate=gate)
    reloader, watcher = Reloader(state, counter()), FileWatcher()
    watcher.watch(reloader)
    try:
        state.path.write_text("v2")
        watcher.tick()
        await until(lambda: reloader.busy, "the first reload")
        state.path.write_text("v3-later")
        watcher.tick()
        watcher.tick()
        assert len(state.built_on) == 1
        gate.set()
        await until(lambda: not reloader.busy and state.current == "v2", "the first reload to apply")
        watcher.tick()  # the change made while it read is still a change
        await until(lambda: state.current == "v3-later", "the later change")
        assert len(state.built_on) == 2
    finally:
        gate.set()
        await watcher.aclose()


async def test_a_reload_that_does_not_return_holds_no_other_watch(tmp_path):
    """One watch loop for every file: a stuck policy read does not stop an SVID rotation, and the reverse."""
    stuck_gate = threading.Event()
    stuck, other = target(tmp_path, gate=stuck_gate), target(tmp_path)
    watcher = FileWatcher()
    for state in (stuck, other):
        watcher.watch(Reloader(state, counter()))
    try:
        stuck.path.write_text("v2")
        other.path.write_text("v2")
        watcher.tick()
        await until(lambda: other.current == "v2", "the other watch")
        assert stuck.current == "v1"
    finally:
        stuck_gate.set()
        await watcher.aclose()


async def test_sidecar_run_watches_the_policy_files(tmp_path, upstream: Upstream):
    """Under ``sidecar run`` a policy edit applies without POST /reload; a bad edit keeps the last good set."""
    h = await SidecarHarness(tmp_path, config_for(upstream), POLICY, watch_policy=True).start()
    try:
        policy_file = h.sidecar.config.policy.files[0]
        first = h.sidecar.runtime.policy.version
        policy_file.write_text(yaml.safe_dump({**POLICY, "rules": []}))
        await until(lambda: h.sidecar.runtime.policy.version != first, "the watch to apply the edit")
        edited = h.sidecar.runtime.policy.version
        policy_file.write_text("version: 1\nrules: [")
        await until(lambda: any(line["event"] == "policy_reload_failed" for line in h.lines()), "the bad edit")
        assert h.sidecar.runtime.policy.version == edited
        assert 'sidecar_policy_reloads_total{outcome="error"} 1.0' in h.sidecar.metrics.exposition().decode()
    finally:
        await h.stop()


def test_post_reload_answers_with_every_failure_and_the_policy_in_force():
    """One failed reload (the identity's here) is a 422 naming it; the policy version is the one in force."""
    policy_ok = Reloaded("policy", True, "v7")
    identity_failed = Reloaded("identity", False, "spiffe://example.org/agent", ("identity: SVID certificate x",))
    answered = reload_response((policy_ok,), "v7")
    assert (answered.status, json.loads(answered.text)) == (200, {"status": "reloaded", "policy_version": "v7"})
    refused = reload_response((policy_ok, identity_failed), "v7")
    assert (refused.status, json.loads(refused.text)) == (422, {
        "error": "reload_failed", "message": "identity: SVID certificate x", "policy_version": "v7"})
