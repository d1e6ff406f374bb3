"""A real OAuth 2.0 authorization server for tests: panva oidc-provider on 127.0.0.1.

Fixtures (session scope; enable with ``pytest_plugins = ["tests.peers.oidc"]``):

``oidc_pki`` -> :class:`OidcPki`
    A server CA (``ca_path``: trust it to reach the provider), a server certificate for 127.0.0.1,
    a client CA (``client_ca_path``) whose certificates ``tls_client_auth`` accepts,
    ``client_cert`` (URI SAN ``AGENT_SPIFFE_ID``) and ``issue_client_cert(...)`` for more.

``oidc_provider`` -> :class:`OidcProvider`
    node ``tests/peers/oidc/server.mjs`` on a free port, with the clients in ``CLIENTS`` and the
    resources in ``RESOURCES``; see the class for attributes and the ``/_test`` helpers.
    Skipped when node or ``tests/peers/oidc/node_modules`` is missing (a failure under ``CI=true``);
    install with ``npm ci --prefix tests/peers/oidc --no-audit --no-fund``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
from base64 import urlsafe_b64encode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEER_DIR = Path(__file__).parent / "oidc"
INSTALL_HINT = "npm ci --prefix tests/peers/oidc --no-audit --no-fund"
STARTUP_TIMEOUT_S = 30.0

BILLING = "https://billing.internal/"
CRM = "https://crm.internal/"
RESOURCES: Mapping[str, str] = {BILLING: "invoices.read invoices.write", CRM: "crm.read"}
ALL_SCOPES = "invoices.read invoices.write crm.read"

AGENT_SPIFFE_ID = "spiffe://example.org/ns/agents/sa/billing"
ACTOR_ISSUERS = (AGENT_SPIFFE_ID, "https://agents.example.com/billing")
EXTERNAL_ISSUER = "https://idp.example.test"

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class OidcClient:
    """One client registered at the provider; ``secret`` only for the client_secret_* methods."""

    client_id: str
    auth_method: str
    secret: str | None = None
    grant_types: tuple[str, ...] = ("client_credentials",)
    certificate_bound: bool = False


# Secrets are long and distinctive so that leak checks can grep logs and dumps for them.
CLIENTS: Mapping[str, OidcClient] = {
    c.client_id: c
    for c in (
        OidcClient("svc-basic", "client_secret_basic", "peer-secret-basic-Zq81vLw3Kx6"),
        OidcClient("svc-post", "client_secret_post", "peer-secret-post-Hn47tYc2Rm9"),
        OidcClient("svc-jwt", "private_key_jwt"),
        OidcClient("svc-mtls", "tls_client_auth", certificate_bound=True),
        OidcClient(
            "svc-exchange",
            "client_secret_basic",
            "peer-secret-exchange-Pd63sWq8Jf2",
            (TOKEN_EXCHANGE, "client_credentials"),
        ),
        OidcClient(
            "svc-exchange-mtls",
            "tls_client_auth",
            grant_types=(TOKEN_EXCHANGE, "client_credentials"),
            certificate_bound=True,
        ),
        # the app a human signed in to: client_id of tokens minted by user_token()
        OidcClient("web-app", "client_secret_basic", "peer-secret-webapp-Bv25kNe7Tg4"),
    )
}


# ---------------------------------------------------------------- keys and certificates


@dataclass(frozen=True)
class SigningKey:
    """An EC P-256 signing key (ES256) as PEM file, PEM bytes and JWKs."""

    kid: str
    path: Path
    private_pem: bytes
    private_jwk: dict[str, Any]
    public_jwk: dict[str, Any]
    alg: str = "ES256"

    @property
    def public_jwks(self) -> dict[str, Any]:
        """The public key as a JWK Set."""
        return {"keys": [self.public_jwk]}


def new_signing_key(directory: Path, kid: str) -> SigningKey:
    """Generate an ES256 key, write its PEM to ``directory/<kid>.pem`` and describe it."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / f"{kid}.pem"
    path.write_bytes(pem)
    meta = {"kid": kid, "alg": "ES256", "use": "sig"}
    private_jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True), **meta}
    public_jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), **meta}
    return SigningKey(kid, path, pem, private_jwk, public_jwk)


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and key on disk, with its RFC 8705 ``x5t#S256`` thumbprint."""

    cert_path: Path
    key_path: Path
    thumbprint: str
    spiffe_id: str | None

    @property
    def requests_cert(self) -> tuple[str, str]:
        """The ``cert=`` argument for requests."""
        return (str(self.cert_path), str(self.key_path))


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def _new_ca(common_name: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _Issuer(_validity(builder, 30).sign(key, hashes.SHA256()), key)


def _leaf(
    issuer: _Issuer,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    return _Issuer(_validity(builder, 7).sign(issuer.key, hashes.SHA256()), key)


def _write_pem(path: Path, pair: _Issuer) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(pair.cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        pair.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path.with_suffix(".crt"), path.with_suffix(".key")


def cert_thumbprint(cert: x509.Certificate) -> str:
    """RFC 8705 ``x5t#S256``: base64url(SHA-256(DER)) without padding."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


class OidcPki:
    """Test PKI: a server CA and certificate for 127.0.0.1, and a client CA for tls_client_auth."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server_ca = _new_ca("oidc peer test server CA")
        self._client_ca = _new_ca("oidc peer test client CA")
        self._rogue_ca = _new_ca("oidc peer untrusted client CA")
        self.ca_path = _write_pem(directory / "server-ca", self._server_ca)[0]
        self.client_ca_path = _write_pem(directory / "client-ca", self._client_ca)[0]
        server = _leaf(
            self._server_ca,
            "127.0.0.1",
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )
        self.server_cert_path, self.server_key_path = _write_pem(directory / "server", server)
        self.client_cert = self.issue_client_cert("agent")

    def issue_client_cert(
        self, name: str, spiffe_id: str | None = AGENT_SPIFFE_ID, *, trusted: bool = True
    ) -> ClientCert:
        """Issue a client certificate with URI SAN ``spiffe_id``, from an untrusted CA if asked."""
        sans: list[x509.GeneralName] = (
            [x509.UniformResourceIdentifier(spiffe_id)] if spiffe_id else []
        )
        issuer = self._client_ca if trusted else self._rogue_ca
        pair = _leaf(issuer, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH)
        cert_path, key_path = _write_pem(self.directory / f"client-{name}", pair)
        return ClientCert(cert_path, key_path, cert_thumbprint(pair.cert), spiffe_id)


# ---------------------------------------------------------------- the provider


@dataclass
class OidcProvider:
    """A running oidc-provider: where it is, who may call it, and the ``/_test`` helpers."""

    issuer: str
    port: int
    ca_path: Path
    pki: OidcPki
    clients: Mapping[str, OidcClient]
    jwt_client_key: SigningKey  # svc-jwt's private_key_jwt key
    actor_key: SigningKey  # signs RFC 8693 actor tokens (stand-in for the sidecar's signing_key)
    external_idp_key: SigningKey  # signs subject tokens of the external issuer EXTERNAL_ISSUER
    actor_issuers: tuple[str, ...] = ACTOR_ISSUERS
    external_issuer: str = EXTERNAL_ISSUER
    log_path: Path | None = None  # the server's stdout and stderr: refusal reasons are logged there
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        """The provider's public signing keys."""
        return f"{self.issuer}/jwks"

    @property
    def discovery_url(self) -> str:
        """The OpenID Connect discovery document."""
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def mtls_cert(self) -> ClientCert:
        """A certificate svc-mtls and svc-exchange-mtls authenticate with (SAN AGENT_SPIFFE_ID)."""
        return self.pki.client_cert

    def secret(self, client_id: str) -> str:
        """The client secret of a client_secret_* client."""
        secret = self.clients[client_id].secret
        assert secret is not None, f"{client_id} has no secret"
        return secret

    def _test_api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(
            method, f"{self.issuer}/_test/{path}", json=body, verify=str(self.ca_path), timeout=10
        )
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """Counters: token_requests, tokens_issued, in_flight, issued_by_client/_grant_type."""
        return dict(self._test_api("GET", "stats"))

    def reset(self) -> None:
        """Zero the counters, end any outage and release held token requests."""
        self._test_api("POST", "reset")

    def outage(self, down: bool, *, status: int = 503, retry_after: int | None = None) -> None:
        """While down, the token endpoint answers ``status`` with ``temporarily_unavailable``."""
        self._test_api(
            "POST", "outage", {"down": down, "status": status, "retry_after": retry_after}
        )

    def hold(self, held: bool) -> None:
        """While held, token requests wait (counted in ``in_flight``) until ``hold(False)``."""
        self._test_api("POST", "hold", {"held": held})

    def add_resource(self, identifier: str, scope: str = "invoices.read") -> None:
        """Accept ``identifier`` as an RFC 8707 resource indicator from now on (a server on a port chosen at start)."""
        self._test_api("POST", "resource", {"identifier": identifier, "scope": scope})

    def user_token(
        self,
        sub: str,
        *,
        client_id: str = "web-app",
        resource: str = BILLING,
        scope: str | None = "invoices.read",
        claims: dict[str, Any] | None = None,
        act: dict[str, Any] | None = None,
        expires_in: int | None = None,
    ) -> str:
        """A human's JWT access token: sub = ``sub``, client_id = the app, aud = ``resource``."""
        body: dict[str, Any] = {"sub": sub, "client_id": client_id, "resource": resource}
        body.update(scope=scope, claims=claims, act=act, expires_in=expires_in)
        return str(self._test_api("POST", "user-token", body)["access_token"])


def verify_access_token(peer: OidcProvider, token: str, audience: str) -> dict[str, Any]:
    """Verify a JWT access token against the peer's published JWKS; return its claims."""
    jwks = requests.get(peer.jwks_uri, verify=str(peer.ca_path), timeout=10).json()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return dict(
        jwt.decode(token, key, algorithms=[header["alg"]], audience=audience, issuer=peer.issuer)
    )


def _client_metadata(client: OidcClient, jwt_key: SigningKey) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "client_id": client.client_id,
        "token_endpoint_auth_method": client.auth_method,
        "grant_types": list(client.grant_types),
        "response_types": [],
        "redirect_uris": [],
        "scope": ALL_SCOPES,
    }
    if client.secret:
        metadata["client_secret"] = client.secret
    if client.auth_method == "private_key_jwt":
        metadata["jwks"] = jwt_key.public_jwks
    if client.auth_method == "tls_client_auth":
        metadata["tls_client_auth_san_uri"] = AGENT_SPIFFE_ID
    if client.certificate_bound:
        metadata["tls_client_certificate_bound_access_tokens"] = True
    return metadata


def _server_config(pki: OidcPki, keys: Mapping[str, SigningKey]) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "tls": {
            "cert": str(pki.server_cert_path),
            "key": str(pki.server_key_path),
            "client_ca": str(pki.client_ca_path),
        },
        "clients": [_client_metadata(c, keys["jwt"]) for c in CLIENTS.values()],
        "resources": [{"identifier": r, "scope": s} for r, s in RESOURCES.items()],
        "subject_issuers": [{"issuer": EXTERNAL_ISSUER, "jwks": keys["external"].public_jwks}],
        "actor_signers": [{"issuers": list(ACTOR_ISSUERS), "jwks": keys["actor"].public_jwks}],
    }


def _require_node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (PEER_DIR / "node_modules" / "oidc-provider").is_dir():
        missing = f"tests/peers/oidc/node_modules is missing (run `{INSTALL_HINT}`)"
    if missing is None:
        assert node is not None
        return node
    if os.environ.get("CI") == "true":
        pytest.fail(f"oidc peer: {missing}")
    pytest.skip(f"oidc peer: {missing}")


def _wait_ready(process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return int(line.split()[1])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"oidc peer did not start:\n{log.read_text(errors='replace')[-4000:]}")


def _start(node: str, config_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [node, str(PEER_DIR / "server.mjs"), str(config_path)],
            cwd=PEER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, _wait_ready(process, log)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def oidc_pki(tmp_path_factory: pytest.TempPathFactory) -> OidcPki:
    """Certificates for the provider's HTTPS listener and for tls_client_auth clients."""
    return OidcPki(tmp_path_factory.mktemp("oidc-pki"))


@pytest.fixture(scope="session")
def oidc_provider(
    oidc_pki: OidcPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OidcProvider]:
    """A running oidc-provider on a free 127.0.0.1 port, stopped at the end of the session."""
    node = _require_node()
    directory = tmp_path_factory.mktemp("oidc-peer")
    keys = {
        "jwt": new_signing_key(directory, "svc-jwt-key"),
        "actor": new_signing_key(directory, "actor-key"),
        "external": new_signing_key(directory, "external-idp-key"),
    }
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(_server_config(oidc_pki, keys), indent=2))
    log_path = directory / "server.log"
    process, port = _start(node, config_path, log_path)
    try:
        yield OidcProvider(
            issuer=f"https://127.0.0.1:{port}",
            port=port,
            ca_path=oidc_pki.ca_path,
            pki=oidc_pki,
            clients=CLIENTS,
            jwt_client_key=keys["jwt"],
            actor_key=keys["actor"],
            external_idp_key=keys["external"],
            log_path=log_path,
            process=process,
        )
    finally:
        _stop(process)
