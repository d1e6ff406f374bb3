"""The development CA, the dev identity of ``sidecar run``, ``sidecar ca``, the interception CA."""

from __future__ import annotations

import asyncio
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from sidecar.errors import RequestRefused
from sidecar.identity.ca import (
    CAError,
    DevCA,
    InterceptionCA,
    ca_init,
    ca_issue,
    ensure_dev_identity,
    write_svid,
)
from sidecar.identity.spiffe import InvalidSpiffeId, parse_spiffe_id, spiffe_id_from_certificate

AGENT = parse_spiffe_id("spiffe://sidecar.local/agent/billing")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _uri(spiffe_id: object) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(str(spiffe_id))


def _verify(ca: x509.Certificate, leaf: x509.Certificate) -> list[x509.GeneralName]:
    verifier = PolicyBuilder().store(Store([ca])).build_client_verifier()
    return list(verifier.verify(leaf, []).subjects or [])


# --- DevCA ---------------------------------------------------------------------------------


def test_an_issued_svid_chains_to_the_dev_ca(tmp_path: Path) -> None:
    """A verifier trusting only the dev CA accepts the SVID and reads its one URI SAN."""
    ca = DevCA.load_or_create(tmp_path / "ca")
    issued = ca.issue_svid(AGENT, timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert _verify(ca.cert, leaf) == [_uri(AGENT)]
    assert spiffe_id_from_certificate(leaf) == AGENT
    assert issued.bundle_pem == ca.cert_pem


def test_an_svid_has_the_x509_svid_leaf_shape(tmp_path: Path) -> None:
    """An SVID is an end entity with digitalSignature, server+client auth, backdated a little."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    ca = DevCA.load_or_create(tmp_path / "ca", now=now)
    issued = ca.issue_svid(AGENT, timedelta(hours=1), now=now)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    }
    assert leaf.not_valid_before_utc < now
    assert leaf.not_valid_after_utc == now + timedelta(hours=1)


def test_the_key_never_shows_in_a_repr(tmp_path: Path) -> None:
    """Neither an issued certificate's repr nor the CA's shows private key material."""
    ca = DevCA.load_or_create(tmp_path / "ca")
    issued = ca.issue_svid(AGENT, timedelta(hours=1))
    body = issued.key_pem.splitlines()[1]
    for text in (repr(issued), str(issued), repr(ca)):
        assert "PRIVATE KEY" not in text and body not in text
    assert "<redacted>" in repr(issued)


def test_ca_keys_are_private_and_the_ca_is_reused(tmp_path: Path) -> None:
    """The CA key is 0600 in a 0700 directory, and a second load reuses the same CA."""
    first = DevCA.load_or_create(tmp_path / "ca")
    second = DevCA.load_or_create(tmp_path / "ca")
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    assert (first.created, second.created) == (True, False)
    assert second.cert == first.cert


def test_a_ca_near_its_end_is_replaced(tmp_path: Path) -> None:
    """A CA with less than its minimum remaining lifetime is replaced by a new one."""
    first = DevCA.load_or_create(tmp_path / "ca")
    later = DevCA.load_or_create(tmp_path / "ca", now=datetime.now(UTC) + timedelta(days=340))
    assert later.created and later.cert.serial_number != first.cert.serial_number


def test_a_ca_of_another_trust_domain_is_refused_not_replaced(tmp_path: Path) -> None:
    """Asking for another trust domain's CA in the same directory fails and leaves the CA alone."""
    first = DevCA.load_or_create(tmp_path / "ca", "example.org")
    with pytest.raises(CAError, match="trust domain 'example.org', not 'other.example'"):
        DevCA.load_or_create(tmp_path / "ca", "other.example")
    assert _cert(tmp_path / "ca" / "ca.crt") == first.cert


def test_a_damaged_ca_is_reported_not_overwritten(tmp_path: Path) -> None:
    """An unreadable CA key is an error naming the files, and the files are left as they were."""
    DevCA.load_or_create(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_text("not a key")
    with pytest.raises(CAError, match="ca: cannot load ca"):
        DevCA.load_or_create(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca.key").read_text() == "not a key"


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "error"),
    [
        # X509-SVID section 3.1: a leaf's ID has a path
        ("spiffe://sidecar.local", timedelta(hours=1), InvalidSpiffeId),
        # X509-SVID section 3.2: a signing authority issues in its own trust domain only
        ("spiffe://other.example/x", timedelta(hours=1), CAError),
        # a ttl must be positive
        ("spiffe://sidecar.local/x", timedelta(0), CAError),
        # an SVID must not outlive its CA
        ("spiffe://sidecar.local/x", timedelta(days=400), CAError),
    ],
)
def test_requests_the_ca_cannot_honour_are_refused(
    tmp_path: Path, spiffe_id: str, ttl: timedelta, error: type[Exception]
) -> None:
    """An SVID the dev CA must not issue is refused with a message starting 'ca:'."""
    ca = DevCA.load_or_create(tmp_path / "ca")
    with pytest.raises(error, match="^ca: "):
        ca.issue_svid(parse_spiffe_id(spiffe_id), ttl)


def test_write_svid_uses_cert_manager_names_and_private_keys(tmp_path: Path) -> None:
    """write_svid writes tls.crt, tls.key (0600) and ca.crt, keyed like identity.svid."""
    issued = DevCA.load_or_create(tmp_path / "ca").issue_svid(AGENT, timedelta(hours=1))
    paths = write_svid(issued, tmp_path / "out")
    names = {key: path.name for key, path in paths.items()}
    assert names == {"cert": "tls.crt", "key": "tls.key", "bundle": "ca.crt"}
    assert _mode(paths["key"]) == 0o600
    assert paths["cert"].read_text() == issued.cert_pem
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


# --- ensure_dev_identity -----------------------------------------------------------------


def test_dev_identity_is_created_once_then_reused(tmp_path: Path) -> None:
    """The first call creates a CA and SVID and says so; the second reuses both and says so."""
    first = ensure_dev_identity(tmp_path, AGENT)
    cert_pem = first.cert.read_text()
    second = ensure_dev_identity(tmp_path, AGENT)
    assert (first.created, second.created) == (True, False)
    assert second.cert.read_text() == cert_pem
    assert first.cert == tmp_path / "svid" / "tls.crt" and _mode(first.key) == 0o600
    assert _verify(_cert(second.bundle), _cert(second.cert)) == [_uri(AGENT)]


def test_dev_identity_is_renewed_before_it_expires(tmp_path: Path) -> None:
    """An SVID with less than a day left is replaced with a fresh one from the same CA."""
    first = ensure_dev_identity(tmp_path, AGENT)
    old = _cert(first.cert)
    later = datetime.now(UTC) + timedelta(days=2, hours=12)
    renewed = ensure_dev_identity(tmp_path, AGENT, now=later)
    assert renewed.created
    assert _cert(renewed.cert).not_valid_after_utc > old.not_valid_after_utc
    assert _cert(renewed.bundle) == _cert(first.bundle)


def test_dev_identity_for_another_id_is_reissued(tmp_path: Path) -> None:
    """A stored SVID for a different SPIFFE ID is not reused."""
    ensure_dev_identity(tmp_path, AGENT)
    other = parse_spiffe_id("spiffe://sidecar.local/agent/other")
    paths = ensure_dev_identity(tmp_path, other)
    assert paths.created and spiffe_id_from_certificate(_cert(paths.cert)) == other


def test_damaged_dev_svid_files_are_reissued(tmp_path: Path) -> None:
    """A missing or corrupt SVID file (never the CA) is replaced by a fresh SVID."""
    ensure_dev_identity(tmp_path, AGENT)
    (tmp_path / "svid" / "tls.key").write_text("garbage")
    paths = ensure_dev_identity(tmp_path, AGENT)
    assert paths.created and "PRIVATE KEY" in paths.key.read_text()


# --- sidecar ca init / issue ---------------------------------------------------------------


def test_ca_issue_uses_the_ca_from_ca_init(tmp_path: Path) -> None:
    """`ca issue` after `ca init` issues from the initialised CA into the chosen directory."""
    ca_path = ca_init(tmp_path)
    spiffe_id = "spiffe://sidecar.local/ns/demo/sa/agent"
    paths = ca_issue(tmp_path, spiffe_id, tmp_path / "out", timedelta(minutes=30))
    assert ca_path == tmp_path / "ca" / "ca.crt"
    assert paths["bundle"].read_text() == ca_path.read_text()
    assert _verify(_cert(ca_path), _cert(paths["cert"]))


def test_ca_issue_creates_a_ca_for_the_ids_trust_domain(tmp_path: Path) -> None:
    """Without `ca init`, `ca issue` creates a CA for the ID's own trust domain."""
    paths = ca_issue(tmp_path, "spiffe://example.org/agent", tmp_path / "out")
    assert DevCA.load_or_create(tmp_path / "ca", "example.org").created is False
    assert str(spiffe_id_from_certificate(_cert(paths["cert"]))) == "spiffe://example.org/agent"


@pytest.mark.parametrize(
    "text",
    [
        "SPIFFE://sidecar.local/x",  # SPIFFE-ID section 2: lowercase scheme
        "spiffe://sidecar.local/x/",  # SPIFFE-ID section 2.2: no trailing slash
        "not a spiffe id",  # SPIFFE-ID section 2: no scheme at all
    ],
)
def test_ca_issue_refuses_an_invalid_id_and_writes_nothing(tmp_path: Path, text: str) -> None:
    """`ca issue` with an invalid ID raises InvalidSpiffeId (exit 1) before touching any file."""
    with pytest.raises(InvalidSpiffeId):
        ca_issue(tmp_path, text, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ca").exists()


# --- real TLS with dev SVIDs --------------------------------------------------------------


async def test_dev_svids_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    """Two dev SVIDs from one CA authenticate each other over real mTLS on loopback."""
    server_paths = ensure_dev_identity(tmp_path, AGENT)
    client_paths = ca_issue(tmp_path, "spiffe://sidecar.local/caller", tmp_path / "client")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=server_paths.bundle)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(server_paths.cert, server_paths.key)
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(str(spiffe_id_from_certificate(x509.load_der_x509_certificate(der))))
        writer.close()

    client_ctx = ssl.create_default_context(cafile=client_paths["bundle"])
    client_ctx.check_hostname = False  # SPIFFE peers are checked by ID, not host name
    client_ctx.load_cert_chain(client_paths["cert"], client_paths["key"])
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        await reader.read()
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    assert seen == ["spiffe://sidecar.local/caller"]
    assert spiffe_id_from_certificate(x509.load_der_x509_certificate(peer)) == AGENT


# --- InterceptionCA -----------------------------------------------------------------------


async def _handshake(context: ssl.SSLContext, ca_pem: str, server_hostname: str) -> str | None:
    """Serve one TLS connection with ``context``; connect trusting ``ca_pem``; return ALPN."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cadata=ca_pem)
        client.set_alpn_protocols(["h2", "http/1.1"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=server_hostname
        )
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.close()
        return alpn


async def test_intercepted_host_passes_hostname_verification(tmp_path: Path) -> None:
    """A client trusting the interception CA accepts the minted certificate for that host."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    alpn = await _handshake(ica.context_for("api.example.test"), ica.cert_pem, "api.example.test")
    assert alpn == "h2"  # offered h2 and http/1.1, the leaf's context chooses HTTP/2 (issue 17)


async def test_a_different_host_name_fails_verification(tmp_path: Path) -> None:
    """The certificate minted for one host does not pass for another."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(ica.context_for("api.example.test"), ica.cert_pem, "other.example.test")


async def test_ip_hosts_get_an_ip_san(tmp_path: Path) -> None:
    """A CONNECT to an IP literal gets a certificate valid for that IP."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    assert await _handshake(ica.context_for("127.0.0.1"), ica.cert_pem, "127.0.0.1") == "h2"


async def test_an_operator_supplied_ca_signs_the_leaves(tmp_path: Path) -> None:
    """With outbound.intercept files given, leaves chain to that CA (here an RSA trustme CA)."""
    authority = trustme.CA(key_type=trustme.KeyType.RSA)
    authority.cert_pem.write_to_path(str(tmp_path / "ica.crt"))
    authority.private_key_pem.write_to_path(str(tmp_path / "ica.key"))
    ica = InterceptionCA.load_or_create(tmp_path / "ica.crt", tmp_path / "ica.key", tmp_path)
    trusted = authority.cert_pem.bytes().decode()
    assert ica.cert_pem == trusted
    await _handshake(ica.context_for("api.example.test"), trusted, "api.example.test")


def test_the_generated_interception_ca_is_kept(tmp_path: Path) -> None:
    """The generated interception CA is stored (key 0600) and reused, so agents trust it once."""
    first = InterceptionCA.load_or_create(None, None, tmp_path)
    second = InterceptionCA.load_or_create(None, None, tmp_path)
    assert first.cert_pem == second.cert_pem
    assert _mode(tmp_path / "intercept" / "ca.key") == 0o600


def test_contexts_are_cached_per_normalized_host_and_no_key_stays_on_disk(tmp_path: Path) -> None:
    """Case, brackets and a trailing dot do not mint again; no leaf file is left behind."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    context = ica.context_for("API.Example.Test.")
    assert ica.context_for("api.example.test") is context
    assert ica.context_for("[::1]") is ica.context_for("::1")
    left = sorted(path.name for path in (tmp_path / "intercept").iterdir())
    assert left == [".lock", "ca.crt", "ca.key"]


async def test_a_leaf_is_minted_without_writing_to_state_dir(tmp_path: Path) -> None:
    """Minting needs no disk: with the interception work dir gone (as a full or read-only state_dir, issue 12's
    chaos faults, which refused CONNECTs internal_error), a leaf is still minted and serves a handshake."""
    import shutil

    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    shutil.rmtree(tmp_path / "intercept")
    assert await _handshake(await ica.context("new.example.test"), ica.cert_pem, "new.example.test") == "h2"
    assert not (tmp_path / "intercept").exists()


def test_the_cache_is_bounded_and_least_recently_used_goes_first(tmp_path: Path) -> None:
    """With room for two hosts, using a third evicts the one used least recently."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path, max_hosts=2)
    a, b = ica.context_for("a.test"), ica.context_for("b.test")
    assert ica.context_for("a.test") is a
    ica.context_for("c.test")
    assert ica.context_for("a.test") is a
    assert ica.context_for("b.test") is not b


def test_a_leaf_is_minted_again_shortly_before_it_expires(tmp_path: Path) -> None:
    """A cached context is reused early in the leaf's life and replaced near its end."""
    now = [datetime.now(UTC)]
    ica = InterceptionCA.load_or_create(
        None, None, tmp_path, leaf_ttl=timedelta(hours=1), clock=lambda: now[0]
    )
    context = ica.context_for("api.example.test")
    now[0] += timedelta(minutes=40)
    assert ica.context_for("api.example.test") is context
    now[0] += timedelta(minutes=15)
    assert ica.context_for("api.example.test") is not context


def test_a_leaf_minted_while_the_clock_ran_ahead_is_minted_again_once_it_is_back(tmp_path: Path) -> None:
    """A leaf minted with the wall clock an hour ahead starts in the agent's future; once the clock is back it is
    not served from the cache for the rest of its life but minted again, valid now (issue 12: the chaos
    harness's clock-forward fault left such hosts refused by the agent's TLS after the clock was corrected)."""
    real = datetime.now(UTC)
    now = [real + timedelta(hours=1)]
    ica = InterceptionCA.load_or_create(None, None, tmp_path, leaf_ttl=timedelta(hours=24), clock=lambda: now[0])
    ahead = ica.context_for("api.example.test")
    now[0] = real
    again = ica.context_for("api.example.test")
    assert again is not ahead
    assert ica.context_for("api.example.test") is again  # and cached from then on


@pytest.mark.parametrize(
    "host",
    [
        "",  # nothing to mint for
        "api example.test",  # spaces are not in host names
        "-api.example.test",  # RFC 1123: a label does not start with '-'
        "*.example.test",  # a CONNECT names one host, never a wildcard
        "api..example.test",  # RFC 1034: no empty labels
        "a" * 64 + ".test",  # RFC 1034: labels of at most 63 octets
    ],
)
def test_malformed_connect_hosts_are_bad_requests(tmp_path: Path, host: str) -> None:
    """A host that is neither a DNS name nor an IP is refused as bad_request, minting nothing."""
    ica = InterceptionCA.load_or_create(None, None, tmp_path)
    with pytest.raises(RequestRefused) as caught:
        ica.context_for(host)
    assert caught.value.reason == "bad_request"


def test_operator_ca_files_must_come_together_and_match(tmp_path: Path) -> None:
    """A certificate without its key, a mismatched key, or a non-CA certificate is refused."""
    authority, other = trustme.CA(), trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    leaf = authority.issue_cert("leaf.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "leaf.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "leaf.key"))
    with pytest.raises(CAError, match="must be given together"):
        InterceptionCA.load_or_create(tmp_path / "ca.crt", None, tmp_path)
    with pytest.raises(CAError, match="private key of"):
        InterceptionCA.load_or_create(tmp_path / "ca.crt", tmp_path / "other.key", tmp_path)
    with pytest.raises(CAError, match="must be a ca certificate"):
        InterceptionCA.load_or_create(tmp_path / "leaf.crt", tmp_path / "leaf.key", tmp_path)


def _write_pair(authority: trustme.CA, cert: Path, key: Path) -> None:
    authority.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(cert))


async def test_a_leaf_minted_while_the_ca_was_replaced_is_minted_again_by_the_new_one(tmp_path: Path) -> None:
    """A mint in flight (its worker thread) when a rotated CA is put in force is neither cached nor handed out:
    the CONNECT that asked gets a leaf of the new CA, and so does the next one (no leaf of the old CA again)."""
    first, second = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    _write_pair(first, cert, key)
    ica = InterceptionCA.load_or_create(cert, key, tmp_path)
    asking = asyncio.ensure_future(ica.context("api.example.test"))
    await asyncio.sleep(0)  # the mint is in its worker thread: its result can only reach the task after this step
    _write_pair(second, cert, key)
    ica.apply(ica.build())  # what the reloader does on the loop, in this same step
    context = await asking
    new_pem = second.cert_pem.bytes().decode()
    assert await _handshake(context, new_pem, "api.example.test") == "h2"
    assert await ica.context("api.example.test") is context
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(context, first.cert_pem.bytes().decode(), "api.example.test")


def test_an_expired_or_not_yet_valid_rotation_is_refused_and_the_ca_in_force_stays(tmp_path: Path) -> None:
    """A rotated CA outside its validity by the sidecar's clock is a failed reload (``expired``,
    ``not_yet_valid``); the CA in force is kept."""
    import shutil

    from sidecar.reload import ReloadFailed

    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    _write_pair(trustme.CA(), cert, key)
    ica = InterceptionCA.load_or_create(cert, key, tmp_path)
    kept = ica.cert_pem
    for shift, reason in ((-timedelta(days=400), "expired"), (timedelta(days=2), "not_yet_valid")):
        made = tmp_path / reason  # a generated CA is valid from its clock's now for 365 days
        InterceptionCA.load_or_create(None, None, made, clock=lambda: datetime.now(UTC) + shift)
        shutil.copy(made / "intercept" / "ca.key", key)
        shutil.copy(made / "intercept" / "ca.crt", cert)
        with pytest.raises(ReloadFailed) as failed:
            ica.build()
        assert failed.value.reason == reason and ica.cert_pem == kept


def test_the_same_ca_written_again_keeps_its_cached_leaves(tmp_path: Path) -> None:
    """Files restored to the CA in force (after a broken write) are a reload that changes nothing: the leaves
    cached stay, and are still the ones handed out."""
    authority = trustme.CA()
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    _write_pair(authority, cert, key)
    ica = InterceptionCA.load_or_create(cert, key, tmp_path)
    context = ica.context_for("api.example.test")
    _write_pair(authority, cert, key)
    assert ica.apply(ica.build())["changed"] is False
    assert ica.context_for("api.example.test") is context
