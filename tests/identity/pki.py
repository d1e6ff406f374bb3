"""A small real PKI: authorities (a root, an intermediate, a partner domain, an unrelated CA) that issue
X.509-SVIDs with the extensions, lifetimes and key usages a test asks for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.x509 import TrustBundles

HOUR = timedelta(hours=1)
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str, *chain: Issued) -> tuple[Path, Path]:
        """Write ``name.crt`` (this cert, then ``chain``) and ``name.key``; return both paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.pem + b"".join(c.pem for c in chain))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


class Authority:
    """A CA (root, or intermediate when ``parent`` is given) that issues SVID-shaped leaves."""

    def __init__(self, common_name: str, parent: Authority | None = None) -> None:
        if parent is None:
            key = ec.generate_private_key(ec.SECP256R1())
            self.issued = self._sign(_name(common_name), key, ca=True, self_signed=True)
        else:
            self.issued = parent.issue(ca=True, common_name=common_name)
        self.cert, self.key = self.issued.cert, self.issued.key

    def issue(
        self,
        *uris: str,
        dns: tuple[str, ...] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ca: bool = False,
        eku: tuple[x509.ObjectIdentifier, ...] | None = (CLIENT_AUTH, SERVER_AUTH),
        aki: bool = True,
        common_name: str = "svid",
    ) -> Issued:
        """A certificate with the given URI and DNS SANs, valid an hour either side of now."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        return self._sign(
            _name(common_name), key, ca=ca, sans=sans, eku=eku, aki=aki,
            not_before=not_before, not_after=not_after,
        )  # fmt: skip

    def _sign(
        self,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        self_signed: bool = False,
        sans: list[x509.GeneralName] | None = None,
        eku: tuple[x509.ObjectIdentifier, ...] | None = None,
        aki: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        now = datetime.now(UTC)
        issuer_name, issuer_key = (subject, key) if self_signed else (self.cert.subject, self.key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - HOUR)
            .not_valid_after(not_after or now + HOUR)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(ca=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if eku and not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if aki and issuer_key is not key:
            aki_ext = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
            builder = builder.add_extension(aki_ext, critical=False)
        return Issued(builder.sign(issuer_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    """Our domain's CA (with an intermediate), a partner domain's CA and an unrelated CA."""

    ours: Authority
    intermediate: Authority
    partner: Authority
    unrelated: Authority

    def bundles(self) -> TrustBundles:
        return TrustBundles.from_pem(
            self.ours.issued.pem, "example.org", {"partner.example": self.partner.issued.pem}
        )


def make_pki() -> Pki:
    """A fresh set of authorities (a few EC keys: cheap)."""
    ours = Authority("example.org root")
    return Pki(ours, Authority("example.org intermediate", ours), Authority("partner root"), Authority("unrelated root"))
