"""Each sidecar redacts its own secrets: two sidecars in one process, and a secret configured by one never
masks words in the other's events, while every other log line masks the secrets of every sidecar running.
And what an event records of a request's headers: bounded, never a credential or a value the redactor masks."""

from __future__ import annotations

import aiohttp
import pytest
import structlog

from sidecar.http.headers import recordable
from sidecar.observe.decision_log import REDACTOR, Redactor
from tests.harness import SidecarHarness
from tests.scenarios.outbound import ALLOW_ALL, config_for

SECRET_A = "alpha-static-secret-5e6f7a"
SECRET_B = "bravo-static-secret-8c9d0e"


def sidecar_config(upstream, name: str, secret: str) -> dict:
    config = config_for(upstream)
    config["agent"] = {"name": name, "environment": "test"}
    config["credentials"]["legacy"]["value"] = {"value": secret}
    return config


async def get(h: SidecarHarness, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing{path}") as r:
            await r.read()


async def test_two_sidecars_in_one_process_redact_only_their_own_secrets(upstream, tmp_path):
    """A's secret in A's request is masked in A's event; in B's request it is B's agent's text, not B's secret,
    and stays as sent; each secret reaches its own upstream only; log lines mask both while both run, and a
    stopped sidecar's secret no longer (issue 18 item 4)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = await SidecarHarness(tmp_path / "a", sidecar_config(upstream, "agent-a", SECRET_A), ALLOW_ALL).start()
    b = await SidecarHarness(tmp_path / "b", sidecar_config(upstream, "agent-b", SECRET_B), ALLOW_ALL).start()
    stopped = False
    try:
        for h in (a, b):
            await get(h, f"/v1/{SECRET_A}/{SECRET_B}")
        events = {e["agent"]["name"]: e for e in await b.settle()}  # the log since b started holds both
        assert events["agent-a"]["target"]["path"] == f"/v1/<redacted>/{SECRET_B}"
        assert events["agent-b"]["target"]["path"] == f"/v1/{SECRET_A}/<redacted>"
        structlog.get_logger("test").warning("stray", text=f"{SECRET_A} {SECRET_B}")
        stray = [line for line in b.lines() if line.get("event") == "stray"]
        assert stray[-1]["text"] == "<redacted> <redacted>"
        await a.stop()
        stopped = True
        structlog.get_logger("test").warning("stray", text=f"{SECRET_A} {SECRET_B}")
        stray = [line for line in b.lines() if line.get("event") == "stray"]
        assert stray[-1]["text"] == f"{SECRET_A} <redacted>"
    finally:
        if not stopped:
            await a.stop()
        await b.stop()
    assert SECRET_B not in REDACTOR.secrets and SECRET_A not in REDACTOR.secrets  # both stopped: nothing left
    assert upstream.seen[0].header("X-API-Key") == SECRET_A and upstream.seen[1].header("X-API-Key") == SECRET_B


def test_a_redactor_masks_its_own_values_and_credential_shapes() -> None:
    """The per-sidecar redactor masks its configured values (six characters or more) and what reads like a
    credential, and nothing registered elsewhere."""
    mine, other = Redactor(["mine-secret-1", "short"]), Redactor(["other-secret-2"])
    assert mine.text("mine-secret-1 other-secret-2 short") == "<redacted> other-secret-2 short"
    assert other.text("Bearer abcdefghijkl") == "Bearer <redacted>"
    assert mine.masks("x mine-secret-1") and not mine.masks("other-secret-2")


@pytest.mark.parametrize("name, recorded", [
    ("x-env", True), ("x-tenant", True), ("x-request-class", True),  # plain headers rules read
    ("authorization", False), ("proxy-authorization", False), ("cookie", False),  # credentials by definition
    ("x-upstream-key", False), ("x-csrf-token", False), ("x-session-id", False),  # named like a secret
    ("x-client-jwt", False), ("x-db-pwd", False), ("x-hub-signature-256", False),
])
def test_which_header_values_an_event_may_record(name, recorded):
    """A header that may carry a credential is never recorded in an event, whatever a rule or the config names."""
    assert recordable(name) is recorded
    assert recordable("x-env", frozenset({"x-env"})) is False  # a configured credential's header


def capture(headers: dict[str, tuple[str, ...]], *, configured: tuple[str, ...] = ("x-env",),
            credential_headers: tuple[str, ...] = ()) -> tuple[dict, list | None]:
    from sidecar.observe.headers import HeaderCapture

    redactor = Redactor(["configured-secret-77"])
    return HeaderCapture(configured, credential_headers, lambda: frozenset({"x-tenant"}), redactor).capture(headers)


@pytest.mark.parametrize("headers, values, names", [
    # the named headers present are recorded with every value; every name is listed, sorted
    ({"x-tenant": ("acme",), "x-env": ("a", "b"), "accept": ("*/*",)}, {"x-env": ["a", "b"], "x-tenant": ["acme"]},
     ["accept", "x-env", "x-tenant"]),
    # a value the redactor masks, or too long to record whole, is not recorded (its name still is listed)
    ({"x-env": ("the configured-secret-77",)}, {}, ["x-env"]),
    ({"x-env": ("Bearer abcdefghijklmnop",)}, {}, ["x-env"]),
    ({"x-env": ("x" * 1025,)}, {}, ["x-env"]),
    ({"x-env": tuple("abcdefghi")}, {}, ["x-env"]),  # more than 8 values
    # 4096 characters of values in all: x-env (first by name) fills them, x-tenant is left out
    ({"x-env": ("e" * 1000,) * 4, "x-tenant": ("t" * 200,)}, {"x-env": ["e" * 1000] * 4}, ["x-env", "x-tenant"]),
    # more than 64 names, or a name over 128 characters: the names are not known
    ({f"x-{i}": ("v",) for i in range(65)}, {}, None),
    ({"x-" + "n" * 127: ("v",), "x-env": ("a",)}, {"x-env": ["a"]}, None),
])
def test_what_an_event_records_of_the_headers(headers, values, names):
    """Bounded, and never a value the sidecar's redactor would mask: a value cut short would decide differently."""
    assert capture(headers) == (values, names)


def test_a_configured_credentials_header_is_never_recorded():
    assert capture({"x-env": ("a",)}, credential_headers=("X-Env",)) == ({}, ["x-env"])
