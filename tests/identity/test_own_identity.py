"""Our own identity: SVID rotation from files, upstream TLS verification, our SVID as client certificate."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
import trustme

from sidecar.identity.source import IdentitySource
from sidecar.observe.metrics import Metrics
from sidecar.reload import Reloader
from tests.harness import Upstream
from tests.scenarios.own_identity import issue

POLICY = {"version": 1, "default": "allow", "rules": []}


def swap_in(src: dict[str, Path], live: Path) -> None:
    """Replace the live files the way Kubernetes does: new files, then one atomic rename each."""
    for name, file in (("bundle", "ca.crt"), ("key", "tls.key"), ("cert", "tls.crt")):
        tmp = live / f".{file}.new"
        tmp.write_bytes(src[name].read_bytes())
        os.replace(tmp, live / file)


async def peer_cert(port: int, cafile: Path, client: dict[str, Path]) -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(client["cert"]), str(client["key"]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def test_svid_rotation_keeps_old_connections_and_ignores_a_corrupt_file(make_sidecar, tmp_path):
    """New SVID files apply to new handshakes, a kept-alive connection survives, a corrupt file is ignored."""
    live = tmp_path / "live"
    first = issue(tmp_path / "ca", live)
    second = issue(tmp_path / "ca", tmp_path / "second")
    caller = issue(tmp_path / "ca", tmp_path / "caller", "spiffe://example.org/caller")
    agent = await Upstream().start()
    try:
        h = await make_sidecar({
            "identity": {"svid": {"cert": str(first["cert"]), "key": str(first["key"]), "bundle": str(first["bundle"])}},
            "inbound": {"forward_to": agent.url, "trust_domains": ["example.org"]}}, POLICY)
        port = h.port("inbound")
        ctx = ssl.create_default_context(cafile=str(first["bundle"]))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(caller["cert"]), str(caller["key"]))
        before = await peer_cert(port, first["bundle"], caller)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1)) as s:
            async with s.get(f"https://127.0.0.1:{port}/a") as r:
                assert r.status == 200
            swap_in(second, live)
            assert h.sidecar.identity_reloader.check()
            async with s.get(f"https://127.0.0.1:{port}/b") as r:  # the kept-alive connection
                assert r.status == 200
            after = await peer_cert(port, first["bundle"], caller)
            assert after != before and after == ssl.PEM_cert_to_DER_cert(second["cert"].read_text())
            (live / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
            assert not h.sidecar.identity_reloader.check()
            assert await peer_cert(port, first["bundle"], caller) == after
        metrics = h.sidecar.metrics.exposition().decode()
        assert 'sidecar_identity_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'sidecar_identity_reloads_total{outcome="error"} 1.0' in metrics
    finally:
        await agent.stop()


def test_a_rotated_certificate_without_a_spiffe_id_is_refused_and_the_watch_goes_on(tmp_path):
    """A web certificate swapped in for the SVID is a failed reload (old identity kept), not the end of the watch."""
    live = issue(tmp_path / "ca", tmp_path / "live")
    second = issue(tmp_path / "ca", tmp_path / "second")
    source = IdentitySource(live["cert"], live["key"], live["bundle"], {})
    reloader = Reloader(source, Metrics().identity_reloads)
    kept = source.state
    trustme.CA().issue_cert("example.com").cert_chain_pems[0].write_to_path(str(live["cert"]))
    assert not reloader.check()
    assert source.state is kept
    swap_in(second, tmp_path / "live")
    assert reloader.check()
    assert source.state.cert_sha256 != kept.cert_sha256


async def https_upstream(ca: trustme.CA, name: str, *, require_client_from: Path | None = None) -> Upstream:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    if require_client_from is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(require_client_from))
    return await Upstream().start(ssl_context=ctx)


def https_config(tmp: Path, ca: trustme.CA, port: int, **upstream: object) -> dict:
    ca_file = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {"outbound": {"upstreams": {"api": {"url": f"https://127.0.0.1:{port}", "ca": str(ca_file), **upstream}}}}


async def test_https_upstream_is_verified_against_its_ca(make_sidecar, tmp_path, upstream_ca):
    """An upstream whose certificate chains to its configured CA and names its host is reached."""
    up = await https_upstream(upstream_ca, "127.0.0.1")
    try:
        h = await make_sidecar(https_config(tmp_path, upstream_ca, up.port), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/api/x") as r:
                assert r.status == 200
        assert up.seen[-1].header("Host") == f"127.0.0.1:{up.port}"
    finally:
        await up.stop()


async def test_an_upstream_certificate_for_another_name_is_refused(make_sidecar, tmp_path, upstream_ca):
    """Hostname verification is always on: a certificate for another name is 502, nothing sent."""
    up = await https_upstream(upstream_ca, "other.example")
    try:
        h = await make_sidecar(https_config(tmp_path, upstream_ca, up.port), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/api/x") as r:
                assert r.status == 502 and (await r.json())["error"] == "upstream_unreachable"
        assert up.seen == []
        assert (await h.settle())[-1]["reason_detail"].startswith("ClientConnectorCertificateError")
    finally:
        await up.stop()


async def test_our_svid_is_presented_to_an_mtls_upstream(make_sidecar, tmp_path, upstream_ca):
    """With client_cert: svid the upstream's mTLS handshake succeeds with our SVID; without it, it fails."""
    svid = issue(tmp_path / "ca", tmp_path / "svid")
    up = await https_upstream(upstream_ca, "127.0.0.1", require_client_from=svid["bundle"])
    try:
        config = https_config(tmp_path, upstream_ca, up.port, client_cert="svid")
        config["outbound"]["upstreams"]["anonymous"] = {**config["outbound"]["upstreams"]["api"]}
        del config["outbound"]["upstreams"]["anonymous"]["client_cert"]
        config["identity"] = {"svid": {"cert": str(svid["cert"]), "key": str(svid["key"]),
                                       "bundle": str(svid["bundle"])}}
        h = await make_sidecar(config, POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/api/x") as r:
                assert r.status == 200
            async with s.get(f"{h.outbound}/anonymous/x") as r:
                assert r.status == 502
        assert len(up.seen) == 1
    finally:
        await up.stop()


async def test_after_an_svid_rotation_an_mtls_upstream_sees_the_new_certificate(make_sidecar, tmp_path, upstream_ca):
    """Rotation renews the upstream's connections: the next request presents the new SVID, not the old one."""
    live = tmp_path / "live"
    first = issue(tmp_path / "ca", live)
    second = issue(tmp_path / "ca", tmp_path / "second")
    first_der, second_der = (ssl.PEM_cert_to_DER_cert(svid["cert"].read_text()) for svid in (first, second))
    presented: list[bytes] = []

    async def record_peer(request: web.Request) -> web.Response:
        presented.append(request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        return web.Response(text="ok")

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(first["bundle"]))
    up = await Upstream(record_peer).start(ssl_context=ctx)
    try:
        config = https_config(tmp_path, upstream_ca, up.port, client_cert="svid")
        config["identity"] = {"svid": {"cert": str(live / "tls.crt"), "key": str(live / "tls.key"),
                                       "bundle": str(live / "ca.crt")}}
        h = await make_sidecar(config, POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/api/a") as r:
                assert r.status == 200
            swap_in(second, live)
            assert h.sidecar.identity_reloader.check()
            async with s.get(f"{h.outbound}/api/b") as r:
                assert r.status == 200
        assert presented == [first_der, second_der]
    finally:
        await up.stop()
