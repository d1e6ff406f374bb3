"""This sidecar's own identity: its X.509-SVID and trust bundles, kept fresh from files.

cert-manager, spiffe-helper and Kubernetes secret volumes replace files by an atomic
symlink swap, so the watch resolves every path and compares the target's inode, mtime and
size once a second. A changed set is loaded whole; a broken one is logged, counted in
``sidecar_identity_reloads_total{outcome="error"}`` and ignored: the last good identity
stays. New handshakes use the new certificate and bundles; open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.http.tls import build_server_context
from sidecar.identity.spiffe import LeafRejected, SpiffeId, spiffe_id_from_certificate
from sidecar.identity.x509 import TrustBundles
from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.identity")
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class SvidState:
    spiffe_id: SpiffeId
    cert_path: Path
    key_path: Path
    bundles: TrustBundles
    server_context: ssl.SSLContext = field(repr=False)
    cert_sha256: str
    not_after: float


Listener = Callable[["SvidState", Any], None]
Prepare = Callable[["SvidState"], Any]


def load_state(cert: Path, key: Path, bundle: Path, federated: dict[str, Path]) -> SvidState:
    """Read and check one complete identity; raises ValueError with a message on any problem."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"identity: cannot read SVID certificate {cert}: {type(exc).__name__}") from None
    try:
        spiffe_id = spiffe_id_from_certificate(leaf)
    except LeafRejected as exc:  # not a ValueError: it would escape the watch and end it
        expected = exc.message.removeprefix("identity: peer certificate ")
        raise ValueError(f"identity: SVID certificate {cert} {expected}") from None
    bundles = TrustBundles.load(bundle, spiffe_id.trust_domain, federated)
    try:
        context = build_server_context(str(cert), str(key), bundles.ca_pems())
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"identity: SVID certificate and key do not load together: {type(exc).__name__}") from None
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    return SvidState(spiffe_id, cert, key, bundles, context, digest, leaf.not_valid_after_utc.timestamp())


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = os.stat(os.path.realpath(path))
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((0, 0, 0))
    return tuple(stamps)


class IdentitySource:
    """The current SVID state, and a watch that reloads it when its files change."""

    def __init__(self, cert: Path, key: Path, bundle: Path, federated: dict[str, Path], metrics: Metrics) -> None:
        self._paths = [cert, key, bundle, *federated.values()]
        self._files = (cert, key, bundle, dict(federated))
        self._metrics = metrics
        self.state = load_state(*self._files)
        self._stamp = _stamp(self._paths)
        self._listeners: list[tuple[Listener, Prepare | None]] = []
        self._task: asyncio.Task[None] | None = None

    def on_change(self, listener: Listener, prepare: Prepare | None = None) -> None:
        """``listener(state, prepared)`` runs on the loop once a new identity is in force. ``prepare(state)``,
        if given, runs first where the files are read (a worker thread for the watch): costly work such
        as building TLS contexts from the new files."""
        self._listeners.append((listener, prepare))

    def server_context(self) -> ssl.SSLContext:
        return self.state.server_context

    def bundles(self) -> TrustBundles:
        return self.state.bundles

    def client_files(self) -> tuple[str, str]:
        return str(self.state.cert_path), str(self.state.key_path)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            await self.refresh()

    def check(self) -> bool:
        """Reload on this thread if the files changed; True when a new identity is in force."""
        return self._changed() and self._apply(self._load())

    async def refresh(self) -> bool:
        """:meth:`check` with the files read, the key loaded and the listeners prepared in a worker thread:
        the event loop never waits for a disk or a key (issue 12 item 5)."""
        return self._changed() and self._apply(await asyncio.to_thread(self._load))

    def _changed(self) -> bool:
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _load(self) -> tuple[SvidState, list[object]] | ValueError:
        try:
            state = load_state(*self._files)
            return state, [prepare(state) if prepare else None for _, prepare in self._listeners]
        except OSError as exc:  # the files changed again while they were read (ssl.SSLError included)
            return ValueError(f"identity: SVID files changed while they were loaded: {type(exc).__name__}")
        except ValueError as exc:
            return exc

    def _apply(self, loaded: tuple[SvidState, list[object]] | ValueError) -> bool:
        if isinstance(loaded, ValueError):
            self._metrics.identity_reloads.labels("error").inc()
            log.error("identity_reload_failed", error=str(loaded), kept=str(self.state.spiffe_id))
            return False
        state, prepared = loaded
        self.state = state
        self._metrics.identity_reloads.labels("ok").inc()
        log.info("identity_reloaded", spiffe_id=str(state.spiffe_id), cert_sha256=state.cert_sha256)
        for (listener, _), ready in zip(self._listeners, prepared):
            listener(state, ready)
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
