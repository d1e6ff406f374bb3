"""Every TLS context the sidecar builds: verification is never off, TLS 1.2 at least.

- client: an upstream's (its CA or the system store; our SVID when it asks for one);
- server: the inbound listener's (our SVID; asks for, and then verifies, the caller's certificate);
- interception: a CONNECT tunnel's leaf, minted for the host the agent named (ALPN ``h2`` and ``http/1.1``).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's; Python's ssl.VerifyFlags does not name it

def client_ssl_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verification always on: the upstream's CA or the system store; our SVID when asked."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def build_server_context(cert_path: str, key_path: str, ca_pems: list[bytes]) -> ssl.SSLContext:
    """A TLS >= 1.2 server context presenting our SVID and asking for (not demanding) a client cert.

    ``ca_pems`` is the union of all trust bundles: OpenSSL's first, coarse chain check.

    Session resumption is on (TLS 1.3 tickets, two per handshake; TLS 1.2 tickets too): a caller that
    reconnects skips the full handshake, about 2 ms of CPU with a client certificate. The ticket keys
    belong to this context, which is built once per SVID and bundle set and replaced on rotation, so a
    ticket never outlives the identity that issued it. A resumed session carries the caller's leaf but
    not its intermediates; ``sidecar.identity.mtls`` verifies the leaf again on every connection, with
    the intermediates its full handshake presented.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.load_verify_locations(cadata=b"".join(ca_pems).decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    # The dates are verify_peer's to judge (the leaf's, then the whole chain's at the same instant), as they are
    # for a resumed session: an expired or not yet valid caller is answered 401 with its reason instead of a
    # handshake aborted under it, which reached the client as a bare close (no alert, no reason), and which an
    # HTTP client may take for a connection lost and send its request again on a new one.
    context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    context.num_tickets = 2
    return context


def interception_context(chain_and_key_pem: str, work_dir: Path) -> ssl.SSLContext:
    """``ssl`` loads keys from files only: an anonymous memory file (Linux ``memfd``), so that minting a leaf
    needs no disk (a full or read-only state_dir does not refuse CONNECTs, issue 12); elsewhere a 0600
    temporary file in ``work_dir``, removed once read."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2", "http/1.1"])  # the handshake's choice picks the tunnel's server
    data = chain_and_key_pem.encode()
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("sidecar-leaf", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as handle:
                handle.write(data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".leaf-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        context.load_cert_chain(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return context
