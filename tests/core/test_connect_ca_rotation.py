"""The interception CA is watched like the SVID: a rotated pair signs the next leaves without a restart, a
broken one keeps the last good CA (logged with its reason, counted), and open tunnels never notice either.

Every check goes through a real CONNECT and a real TLS client that trusts exactly one CA.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme

from tests.harness import SidecarHarness, Upstream
from tests.scenarios.connect import billing_config, exchange, get, start_https_upstream, tunnel
from tests.scenarios.outbound import POLICY

Pair = dict[str, Path]


@pytest.fixture
async def https_upstream(upstream_ca: trustme.CA) -> Any:
    server = await start_https_upstream(upstream_ca)
    yield server
    await server.stop()


def ca_files(ca: trustme.CA, directory: Path) -> Pair:
    """A CA's certificate and key as an operator keeps them (the trusted certificate alone in ``trust``)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = {"cert": directory / "ca.crt", "key": directory / "ca.key", "trust": directory / "trust.pem"}
    ca.cert_pem.write_to_path(str(pair["cert"]))
    ca.private_key_pem.write_to_path(str(pair["key"]))
    ca.cert_pem.write_to_path(str(pair["trust"]))
    return pair


def swap_in(cert: bytes | None, key: bytes | None, live: Pair) -> None:
    """Replace the live files as a rotation does: the key first, then the certificate, one rename each
    (None: the file is deleted)."""
    for name, data in (("key", key), ("cert", cert)):
        if data is None:
            live[name].unlink()
            continue
        tmp = live[name].with_name(f".{live[name].name}.new")
        tmp.write_bytes(data)
        os.replace(tmp, live[name])


async def sidecar_with_ca(make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path,
                          live: Pair) -> SidecarHarness:
    config = billing_config(https_upstream, upstream_ca, tmp_path)
    config["outbound"]["intercept"] = {"ca_cert": str(live["cert"]), "ca_key": str(live["key"])}
    return await make_sidecar(config, POLICY)


async def served_by(h: SidecarHarness, trusted: Path) -> int:
    """A new tunnel whose client trusts only ``trusted``; the status of one request through it (raises
    ``ssl.SSLCertVerificationError`` when the leaf is not signed by that CA)."""
    reader, writer = await tunnel(h, str(trusted))
    try:
        status, _, _ = await exchange(reader, writer, get("/api/v1/invoices"))
        return status
    finally:
        writer.close()


async def refused_by(h: SidecarHarness, trusted: Path) -> bool:
    try:
        await served_by(h, trusted)
    except ssl.SSLCertVerificationError:
        return True
    return False


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):  # the watch polls once a second: a bounded number of tries, no duration asserted
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def logged(h: SidecarHarness, event: str) -> list[dict[str, Any]]:
    return [line for line in h.lines() if line.get("event") == event]


async def test_a_rotated_ca_signs_the_next_leaves_without_a_restart(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """The watch picks up a new pair: the next tunnel to the same host gets a leaf of the new CA (the cached
    leaf of the old one is not handed out again), trusted with the new CA only."""
    live = ca_files(trustme.CA(), tmp_path / "live")
    old_trust = live["trust"]  # the first CA's certificate, kept aside: the live files are replaced
    new = ca_files(trustme.CA(), tmp_path / "new")
    h = await sidecar_with_ca(make_sidecar, https_upstream, upstream_ca, tmp_path, live)
    assert await served_by(h, old_trust) == 200  # billing.internal's leaf is minted and cached
    swap_in(new["cert"].read_bytes(), new["key"].read_bytes(), live)
    await until(lambda: bool(logged(h, "intercept_ca_reloaded")), "the watch to load the rotated ca")
    assert await served_by(h, new["trust"]) == 200
    assert await refused_by(h, old_trust)
    [line] = logged(h, "intercept_ca_reloaded")
    assert line["ca_cert"] == str(live["cert"]) and line["leaves_dropped"] == 1
    assert h.sidecar is not None and h.sidecar.interceptor.ca.cert_pem == new["cert"].read_text()
    assert 'sidecar_intercept_ca_reloads_total{outcome="ok"} 1.0' in h.sidecar.metrics.exposition().decode()


BROKEN: dict[str, tuple[str, Callable[[Pair, Pair], tuple[bytes | None, bytes | None]]]] = {
    # name: (reason logged, (live pair, another CA's pair) -> the bytes written over the live cert and key)
    "garbage": ("invalid", lambda live, other: (b"garbage", b"garbage")),
    "truncated": ("invalid", lambda live, other: (other["cert"].read_bytes()[:300],
                                                  other["key"].read_bytes()[:200])),
    "deleted": ("missing", lambda live, other: (None, None)),
    "key of another ca": ("mismatch", lambda live, other: (other["cert"].read_bytes(), live["key"].read_bytes())),
    "a web certificate": ("not_a_ca", lambda live, other: web_certificate()),
}


def web_certificate() -> tuple[bytes, bytes]:
    """A server certificate and its own key: a matching pair, but not a CA."""
    leaf = trustme.CA().issue_cert("billing.internal")
    return leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()


@pytest.mark.parametrize("broken", list(BROKEN))
async def test_a_broken_rotation_keeps_the_last_good_ca_and_says_why(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path, broken: str) -> None:
    """Garbage, truncated, deleted, mismatched or non-CA files: the reload fails with a stable reason, the old CA
    keeps signing (a new tunnel is served, trusted with the old CA), nothing of the key is logged."""
    live = ca_files(trustme.CA(), tmp_path / "live")
    trusted = live["trust"]
    other = ca_files(trustme.CA(), tmp_path / "other")
    h = await sidecar_with_ca(make_sidecar, https_upstream, upstream_ca, tmp_path, live)
    key_text = live["key"].read_text()
    reason, content = BROKEN[broken]
    swap_in(*content(live, other), live)
    assert h.sidecar is not None and not h.sidecar.intercept_ca_reloader.check()
    assert await served_by(h, trusted) == 200
    [line] = logged(h, "intercept_ca_reload_failed")
    assert line["reason"] == reason and line["kept"] == f"sha256:{h.sidecar.interceptor.ca.sha256}"
    assert line["errors"][0].startswith("intercept: ")
    assert 'sidecar_intercept_ca_reloads_total{outcome="error"} 1.0' in h.sidecar.metrics.exposition().decode()
    body = "".join(key_text.splitlines()[1:-1])
    assert body[:40] not in h.raw_log().decode() and "PRIVATE KEY" not in h.raw_log().decode()
    assert body[:40] not in repr(h.sidecar.interceptor.ca)


async def test_a_rotation_under_an_open_tunnel_does_not_break_it(
        make_sidecar: Any, https_upstream: Upstream, upstream_ca: trustme.CA, tmp_path: Path) -> None:
    """A tunnel opened under the old CA carries requests after the rotation; the next tunnel gets the new CA."""
    live = ca_files(trustme.CA(), tmp_path / "live")
    old_trust = live["trust"]
    new = ca_files(trustme.CA(), tmp_path / "new")
    h = await sidecar_with_ca(make_sidecar, https_upstream, upstream_ca, tmp_path, live)
    reader, writer = await tunnel(h, str(old_trust))
    try:
        assert (await exchange(reader, writer, get("/api/v1/a")))[0] == 200
        swap_in(new["cert"].read_bytes(), new["key"].read_bytes(), live)
        assert h.sidecar is not None and h.sidecar.intercept_ca_reloader.check()
        assert (await exchange(reader, writer, get("/api/v1/b")))[0] == 200  # the same TLS session, old leaf
        assert await served_by(h, new["trust"]) == 200
        assert (await exchange(reader, writer, get("/api/v1/c")))[0] == 200
    finally:
        writer.close()
    assert [r.path for r in https_upstream.seen] == ["/api/v1/a", "/api/v1/b", "/api/v1/invoices", "/api/v1/c"]
