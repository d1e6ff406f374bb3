"""The development CA (X.509-SVIDs for local use) and the CONNECT interception CA.

Both keep an EC P-256 key and a self-signed certificate in a directory under ``state_dir``
(``ca/`` and ``intercept/``): keys are written 0600 in a 0700 directory, atomically, and reused
while they stay valid. Nothing here is meant for production identities: those come from
cert-manager or SPIRE (``identity.svid``).

    state_dir/ca/ca.crt, ca.key          DevCA: one trust domain; it can never pass for a web host
    state_dir/svid/tls.crt, tls.key, ca.crt   ensure_dev_identity (cert-manager's secret names)
    state_dir/intercept/ca.crt, ca.key   InterceptionCA, unless outbound.intercept names files
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.errors import RequestRefused
from sidecar.http.tls import interception_context
from sidecar.identity.spiffe import InvalidSpiffeId, SpiffeId, parse_spiffe_id, parse_trust_domain
from sidecar.reload import ReloadFailed

CA_TTL = timedelta(days=365)
CA_MIN_REMAINING = timedelta(days=30)  # a CA closer to its end than this is replaced
DEV_SVID_TTL = timedelta(days=3)
DEV_SVID_MIN_REMAINING = timedelta(days=1)
BACKDATE = timedelta(minutes=5)  # notBefore slightly in the past, for peers with skewed clocks
LEAF_TTL = timedelta(hours=1)
CERT_FILE, KEY_FILE = "ca.crt", "ca.key"
SVID_FILES = {"cert": "tls.crt", "key": "tls.key", "bundle": "ca.crt"}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # an operator's CA may be RSA
Clock = Callable[[], datetime]
_utcnow: Clock = partial(datetime.now, UTC)


class CAError(ValueError):
    """A CA directory or request that cannot be used as is; the message says what was expected, ``reason``
    names the problem in one stable word (``missing``, ``unreadable``, ``invalid``, ``mismatch``, ``not_a_ca``,
    ``expired``, ``not_yet_valid``). Neither ever holds key material: paths and error types only."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """An issued X.509-SVID: PEM texts of the leaf, its private key and the CA bundle."""

    spiffe_id: SpiffeId
    cert_pem: str
    key_pem: str
    bundle_pem: str
    not_after: datetime

    def __repr__(self) -> str:
        expiry = self.not_after.isoformat()
        return f"IssuedCert(spiffe_id='{self.spiffe_id}', not_after={expiry}, key_pem=<redacted>)"


@dataclass(frozen=True, slots=True)
class SvidPaths:
    """Where the development SVID lives, and whether this call had to create anything."""

    cert: Path
    key: Path
    bundle: Path
    created: bool


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Key) -> str:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write atomically: a reader (or a file watcher) sees the old file or the new one."""
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize creation between processes sharing a state_dir (no-op without fcntl)."""
    _ensure_dir(directory)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load_pair(cert_path: Path, key_path: Path, component: str) -> tuple[x509.Certificate, Key]:
    try:
        cert_data, key_data = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
        raise CAError(f"{component}: cannot read ca {cert_path} / {key_path} ({type(exc).__name__})",
                      reason) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{component}: cannot load ca {cert_path} / {key_path}: expected a pem "
                      f"certificate and an unencrypted pem key ({type(exc).__name__})") from None
    if not isinstance(key, Key) or key.public_key() != cert.public_key():
        raise CAError(f"{component}: {key_path} must be the ec or rsa private key of {cert_path}", "mismatch")
    if not any(isinstance(e.value, x509.BasicConstraints) and e.value.ca for e in cert.extensions):
        raise CAError(f"{component}: {cert_path} must be a ca certificate (basicConstraints ca)", "not_a_ca")
    return cert, key


def _still_valid(cert: x509.Certificate, now: datetime, margin: timedelta) -> bool:
    return cert.not_valid_before_utc <= now + BACKDATE and cert.not_valid_after_utc - now > margin


def _base(subject: x509.Name, issuer: x509.Name, key: Key, start: datetime,
          end: datetime) -> x509.CertificateBuilder:
    public_key = key.public_key()
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


# A development CA vouches for SPIFFE IDs only: it can never pass for a web host or an IP.
# (URI constraints would say more, but the cryptography verifier rejects them as unsupported.)
_NO_WEB_NAMES = x509.NameConstraints(
    permitted_subtrees=[x509.DNSName("invalid"), x509.IPAddress(ipaddress.ip_network("0.0.0.0/32")),
                        x509.IPAddress(ipaddress.ip_network("::/128"))],
    excluded_subtrees=None,
)


def _self_signed_ca(name: str, now: datetime, uri: str | None) -> tuple[x509.Certificate, Key]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    builder = (
        _base(subject, subject, key, now - BACKDATE, now + CA_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
    )
    if uri is not None:  # X509-SVID 3.2: a signing certificate's ID is its trust domain ID
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        ).add_extension(_NO_WEB_NAMES, critical=True)
    return builder.sign(key, hashes.SHA256()), key


def _leaf(ca_cert: x509.Certificate, ca_key: Key, key: Key, names: list[x509.GeneralName],
          start: datetime, end: datetime, usages: list[x509.ObjectIdentifier]) -> x509.Certificate:
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    return (
        _base(x509.Name([]), ca_cert.subject, key, start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)  # empty subject: RFC 5280
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # an operator's CA without one
        key = ca_cert.public_key()  # a CA key: one of the types AKI takes (loading checked it signs)
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key)  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _load_or_create(directory: Path, component: str, now: datetime,
                    make: Callable[[], tuple[x509.Certificate, Key]],
                    ) -> tuple[x509.Certificate, Key, bool]:
    """The CA kept in ``directory`` while it stays valid, else a new one from ``make``."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    with _locked(directory):
        if cert_path.exists() or key_path.exists():
            cert, key = _load_pair(cert_path, key_path, component)
            if _still_valid(cert, now, CA_MIN_REMAINING):
                return cert, key, False
        cert, key = make()
        _write_file(key_path, _key_pem(key), 0o600)
        _write_file(cert_path, _cert_pem(cert), 0o644)
        return cert, key, True


def _trust_domain_of(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return parse_spiffe_id(uris[0]).trust_domain if len(uris) == 1 else None


class DevCA:
    """A development CA for one trust domain, kept in a directory (``state_dir/ca``)."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: Key, *, created: bool) -> None:
        trust_domain = _trust_domain_of(cert)
        if trust_domain is None:
            raise CAError(f"ca: {directory / CERT_FILE} must have one spiffe://<trust domain> uri")
        self.directory, self.cert_path = directory, directory / CERT_FILE
        self.trust_domain, self.created = trust_domain, created
        self.cert, self.cert_pem, self._key = cert, _cert_pem(cert), key

    def __repr__(self) -> str:
        return f"DevCA(trust_domain={self.trust_domain!r}, directory='{self.directory}')"

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str = "sidecar.local", *,
                       now: datetime | None = None) -> DevCA:
        """The CA in ``directory`` if it is still valid, else a new one (``created`` says which).

        A CA of another trust domain is refused (:class:`CAError`), never replaced.
        """
        trust_domain = parse_trust_domain(trust_domain)
        now = now or _utcnow()
        uri = f"spiffe://{trust_domain}"
        make = lambda: _self_signed_ca("sidecar development ca", now, uri)  # noqa: E731
        cert, key, created = _load_or_create(directory, "ca", now, make)
        ca = cls(directory, cert, key, created=created)
        if ca.trust_domain != trust_domain:
            raise CAError(f"ca: the development ca in {directory} is for trust domain "
                          f"{ca.trust_domain!r}, not {trust_domain!r}; use another state_dir")
        return ca

    def issue_svid(self, spiffe_id: SpiffeId, ttl: timedelta, *,
                   now: datetime | None = None) -> IssuedCert:
        """An X.509-SVID for ``spiffe_id``: end-entity, one URI SAN, server and client auth."""
        self._check_request(spiffe_id, ttl)
        now = now or _utcnow()
        if now + ttl > self.cert.not_valid_after_utc:
            raise CAError(f"ca: ttl must end before the development ca expires "
                          f"({self.cert.not_valid_after_utc.isoformat()})")
        key = _new_key()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = _leaf(self.cert, self._key, key, names, now - BACKDATE, now + ttl, usages)
        return IssuedCert(spiffe_id, _cert_pem(cert), _key_pem(key), self.cert_pem,
                          cert.not_valid_after_utc)

    def _check_request(self, spiffe_id: SpiffeId, ttl: timedelta) -> None:
        if spiffe_id.is_trust_domain_id:  # X509-SVID 3.1
            raise InvalidSpiffeId("leaf_without_path", "ca: an svid's spiffe id must have a path")
        if spiffe_id.trust_domain != self.trust_domain:
            raise CAError(f"ca: the development ca issues ids in trust domain "
                          f"{self.trust_domain!r}, not {spiffe_id.trust_domain!r}")
        if ttl <= timedelta(0):
            raise CAError("ca: ttl must be positive")


def write_svid(issued: IssuedCert, out_dir: Path) -> dict[str, Path]:
    """Write ``tls.crt``, ``tls.key`` (0600) and ``ca.crt``; keys as in ``identity.svid``.

    The certificate is written last, so a watcher that reloads on its change sees the new key.
    """
    paths = {name: out_dir / file for name, file in SVID_FILES.items()}
    _write_file(paths["bundle"], issued.bundle_pem, 0o644)
    _write_file(paths["key"], issued.key_pem, 0o600)
    _write_file(paths["cert"], issued.cert_pem, 0o644)
    return paths


def ensure_dev_identity(state_dir: Path, spiffe_id: SpiffeId, *,
                        now: datetime | None = None) -> SvidPaths:
    """A development CA in ``state_dir/ca`` and an SVID for ``spiffe_id`` in ``state_dir/svid``.

    Both are reused while valid (the SVID for at least another day, same ID, issued by this CA);
    ``created`` tells the caller whether anything new was made, so it can say so.
    """
    now = now or _utcnow()
    ca = DevCA.load_or_create(state_dir / "ca", spiffe_id.trust_domain, now=now)
    svid_dir = state_dir / "svid"
    paths = {name: svid_dir / file for name, file in SVID_FILES.items()}
    created = ca.created
    with _locked(svid_dir):
        if created or not _svid_reusable(paths, ca, spiffe_id, now):
            paths = write_svid(ca.issue_svid(spiffe_id, DEV_SVID_TTL, now=now), svid_dir)
            created = True
    return SvidPaths(paths["cert"], paths["key"], paths["bundle"], created)


def _svid_reusable(paths: dict[str, Path], ca: DevCA, spiffe_id: SpiffeId, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
        key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
        bundle = paths["bundle"].read_text()
        cert.verify_directly_issued_by(ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False  # missing, unreadable or foreign: issue a fresh one
    return (bundle == ca.cert_pem and key.public_key() == cert.public_key()
            and san.get_values_for_type(x509.UniformResourceIdentifier) == [str(spiffe_id)]
            and _still_valid(cert, now, DEV_SVID_MIN_REMAINING))


def ca_init(state_dir: Path, trust_domain: str = "sidecar.local") -> Path:
    """``sidecar ca init``: create (or keep) the development CA; returns its certificate's path."""
    return DevCA.load_or_create(state_dir / "ca", trust_domain).cert_path


def ca_issue(state_dir: Path, spiffe_id_text: str, out_dir: Path,
             ttl: timedelta = timedelta(hours=1)) -> dict[str, Path]:
    """``sidecar ca issue``: an SVID for the ID, written to ``out_dir``; bad IDs raise
    :class:`InvalidSpiffeId`, CA problems :class:`CAError` (both ``ValueError``)."""
    spiffe_id = parse_spiffe_id(spiffe_id_text)
    ca = DevCA.load_or_create(state_dir / "ca", spiffe_id.trust_domain)
    return write_svid(ca.issue_svid(spiffe_id, ttl), out_dir)


@dataclass(frozen=True, slots=True)
class SigningCA:
    """One interception CA in force: its certificate, its key (never in a repr) and the certificate's digest."""

    cert: x509.Certificate
    key: Key = field(repr=False)
    cert_pem: str
    sha256: str

    @classmethod
    def of(cls, cert: x509.Certificate, key: Key) -> SigningCA:
        return cls(cert, key, _cert_pem(cert), cert.fingerprint(hashes.SHA256()).hex())


class InterceptionCA:
    """Mints per-host server certificates for CONNECT interception (what agents must trust).

    Each host gets its own key and a leaf valid for ``leaf_ttl``; its server ``SSLContext`` is
    cached (LRU, ``max_hosts``) and minted again once less than a sixth of the lifetime remains.

    It is also the :class:`~sidecar.reload.Reloadable` of its two files (``intercept_ca``): the file
    watcher reloads a rotated pair; a complete, matching, valid one replaces the CA and empties the leaf
    cache, so that no leaf of the old CA is handed out again (tunnels already open keep theirs). Any other
    pair (missing, truncated, garbage, a key of another certificate, not a CA, expired) is a failed
    reload with its reason, and the last good CA stays.
    """

    name = "intercept_ca"

    def __init__(self, cert: x509.Certificate, key: Key, *, work_dir: Path,
                 files: tuple[Path, Path] | None = None, leaf_ttl: timedelta = LEAF_TTL,
                 max_hosts: int = 1024, clock: Clock = _utcnow) -> None:
        self._signer = SigningCA.of(cert, key)
        self._work_dir = work_dir
        self._files = files or (work_dir / CERT_FILE, work_dir / KEY_FILE)
        self._leaf_ttl, self._max_hosts, self._clock = leaf_ttl, max_hosts, clock
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, datetime, datetime]] = OrderedDict()  # ctx, minted, end

    def __repr__(self) -> str:
        return f"InterceptionCA(subject={self._signer.cert.subject.rfc4514_string()!r}, sha256={self.sha256!r})"

    @property
    def cert_pem(self) -> str:
        """The certificate in force (what agents must trust), PEM."""
        return self._signer.cert_pem

    @property
    def sha256(self) -> str:
        """The SHA-256 of the certificate in force (DER), hex: what the reload log lines name."""
        return self._signer.sha256

    @classmethod
    def load_or_create(cls, cert_path: Path | None, key_path: Path | None, state_dir: Path, *,
                       leaf_ttl: timedelta = LEAF_TTL, max_hosts: int = 1024,
                       clock: Clock = _utcnow) -> InterceptionCA:
        """The operator's CA (``outbound.intercept``), else one kept in ``state_dir/intercept``."""
        work_dir = state_dir / "intercept"
        if (cert_path is None) != (key_path is None):
            raise CAError("intercept: ca_cert and ca_key must be given together")
        if cert_path is not None and key_path is not None:
            cert, key = _load_pair(cert_path, key_path, "intercept")
            files = (cert_path, key_path)
        else:
            make = lambda: _self_signed_ca("sidecar interception ca", clock(), None)  # noqa: E731
            cert, key, _ = _load_or_create(work_dir, "intercept", clock(), make)
            files = (work_dir / CERT_FILE, work_dir / KEY_FILE)
        _ensure_dir(work_dir)
        return cls(cert, key, work_dir=work_dir, files=files, leaf_ttl=leaf_ttl, max_hosts=max_hosts,
                   clock=clock)

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting a certificate for ``host`` (a DNS name or an IP)."""
        name = _normalize_host(host)
        now = self._clock()
        return self._fresh(name, now) or self._store(name, self._mint(self._signer, name, now))

    async def context(self, host: str) -> ssl.SSLContext:
        """:meth:`context_for`, with a leaf to mint made in a worker thread: a key, a signature and a file
        (~10 ms) that the event loop must not spend on a CONNECT (issue 12 item 5). A leaf whose CA was
        replaced while it was minted is neither cached nor handed out: it is minted again by the new one."""
        name = _normalize_host(host)
        now = self._clock()
        while (context := self._fresh(name, now)) is None:
            signer = self._signer
            entry = await asyncio.to_thread(self._mint, signer, name, now)
            if signer is self._signer:
                return self._store(name, entry)
        return context

    def _fresh(self, name: str, now: datetime) -> ssl.SSLContext | None:
        cached = self._cache.get(name)
        # a leaf minted "after" now was minted while the wall clock ran ahead: its notBefore is in the agent's
        # future, so it is minted again rather than served until it expires (issue 12: the clock faults)
        if cached is None or cached[2] - now <= self._leaf_ttl / 6 or cached[1] > now:
            return None
        self._cache.move_to_end(name)
        return cached[0]

    def _store(self, name: str, entry: tuple[ssl.SSLContext, datetime, datetime]) -> ssl.SSLContext:
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self._max_hosts:
            self._cache.popitem(last=False)
        return entry[0]

    def _mint(self, signer: SigningCA, name: str, now: datetime) -> tuple[ssl.SSLContext, datetime, datetime]:
        key = _new_key()
        end = min(now + self._leaf_ttl, signer.cert.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        cert = _leaf(signer.cert, signer.key, key, [_general_name(name)], now - BACKDATE, end, usages)
        return interception_context(_cert_pem(cert) + _key_pem(key), self._work_dir), now, end

    # -- Reloadable: the CA's two files, watched like the SVID's ------------------------------------
    def files(self) -> tuple[Path, Path]:
        return self._files

    def build(self) -> SigningCA:
        """Both files read whole and checked (worker thread): a pem certificate of a ca, valid now, and its key."""
        try:
            cert, key = _load_pair(*self._files, "intercept")
            check_validity(cert, self._files[0], self._clock())
        except CAError as exc:
            raise ReloadFailed([str(exc)], exc.reason) from None
        return SigningCA.of(cert, key)

    def apply(self, candidate: SigningCA) -> dict[str, object]:
        """The new CA signs every leaf from here on: the cached leaves of the old one are dropped. The same
        certificate written again (files restored) changes nothing: its key is the same, so are its leaves."""
        changed = candidate.sha256 != self._signer.sha256
        dropped = len(self._cache) if changed else 0
        if changed:
            self._signer = candidate
            self._cache.clear()
        return {"ca_cert": str(self._files[0]), "ca_sha256": candidate.sha256, "changed": changed,
                "not_after": candidate.cert.not_valid_after_utc.isoformat(), "leaves_dropped": dropped}

    def in_force(self) -> str:
        return f"sha256:{self._signer.sha256}"


def check_interception_ca(cert_path: Path, key_path: Path, now: datetime) -> None:
    """``sidecar validate``: the configured pair as ``sidecar run`` loads it (:class:`CAError` otherwise), then
    its validity now (a :class:`CAError` too, with reason ``expired`` or ``not_yet_valid``)."""
    cert, _ = _load_pair(cert_path, key_path, "intercept")
    check_validity(cert, cert_path, now)


def check_validity(cert: x509.Certificate, path: Path, now: datetime) -> None:
    """A CA that signs leaves now: not expired, not valid only in the future (beyond the backdating)."""
    if cert.not_valid_after_utc <= now:
        raise CAError(f"intercept: {path} expired at {cert.not_valid_after_utc.isoformat()}", "expired")
    if cert.not_valid_before_utc > now + BACKDATE:
        raise CAError(f"intercept: {path} is not valid before {cert.not_valid_before_utc.isoformat()}",
                      "not_yet_valid")


def _normalize_host(host: str) -> str:
    """Lowercase, without brackets or a trailing dot; refuses anything not a name or an IP."""
    name = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    with suppress(ValueError):
        return str(ipaddress.ip_address(name))
    labels = name.split(".")
    if 0 < len(name) <= 253 and all(_is_label(label) for label in labels):
        return name
    raise RequestRefused("bad_request", "intercept: connect host must be a dns name or an ip")


def _is_label(label: str) -> bool:
    return 0 < len(label) <= 63 and _HOST_CHARS.issuperset(label) and not label.startswith("-")


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
