"""This sidecar's own identity: its X.509-SVID and trust bundles, kept fresh from files.

cert-manager, spiffe-helper and Kubernetes secret volumes replace files by an atomic
symlink swap; the one file watcher (``sidecar.reload``) notices it. A changed set is loaded
whole; a broken one is logged, counted in ``sidecar_identity_reloads_total{outcome="error"}``
and ignored: the last good identity stays. New handshakes use the new certificate and
bundles; open connections keep theirs.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.http.tls import build_server_context
from sidecar.identity.spiffe import LeafRejected, SpiffeId, spiffe_id_from_certificate
from sidecar.identity.x509 import TrustBundles
from sidecar.reload import ReloadFailed


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


@dataclass(frozen=True)
class Candidate:
    """A loaded identity and what each listener prepared from it, ready to be put in force."""

    state: SvidState
    prepared: tuple[object, ...]


class IdentitySource:
    """The current SVID state; a :class:`~sidecar.reload.Reloadable` the file watcher keeps fresh."""

    name = "identity"

    def __init__(self, cert: Path, key: Path, bundle: Path, federated: dict[str, Path]) -> None:
        self._paths = (cert, key, bundle, *federated.values())
        self._files = (cert, key, bundle, dict(federated))
        self.state = load_state(*self._files)
        self._listeners: list[tuple[Listener, Prepare | None]] = []

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

    # -- Reloadable -----------------------------------------------------------------------------
    def files(self) -> tuple[Path, ...]:
        return self._paths

    def build(self) -> Candidate:
        """The files read whole and every listener prepared; any problem is a failed reload."""
        try:
            state = load_state(*self._files)
            return Candidate(state, tuple(prepare(state) if prepare else None for _, prepare in self._listeners))
        except OSError as exc:  # the files changed again while they were read (ssl.SSLError included)
            raise ReloadFailed([f"identity: SVID files changed while they were loaded: {type(exc).__name__}"]) from None
        except ValueError as exc:
            raise ReloadFailed([str(exc)]) from None

    def apply(self, candidate: Candidate) -> dict[str, object]:
        self.state = candidate.state
        for (listener, _), ready in zip(self._listeners, candidate.prepared):
            listener(candidate.state, ready)
        return {"spiffe_id": str(candidate.state.spiffe_id), "cert_sha256": candidate.state.cert_sha256}

    def in_force(self) -> str:
        return str(self.state.spiffe_id)
