"""Building credential providers the way config load does, and the requests they answer: parse a
provider's raw config, a config entry for one of the oidc peer's clients, a credential request and an
outbound request. The fixtures that build providers against the peer are in ``conftest.py``."""

from __future__ import annotations

import base64
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from multidict import CIMultiDict

from sidecar.credentials.base import CredentialRequest, OutboundRequest
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.errors import ConfigError
from sidecar.fields import Fields
from sidecar.identity.source import IdentitySource
from tests.peers.oidc import AGENT_SPIFFE_ID, OidcProvider

ID_KEY = b"test-id-key-0123456789abcdef0123"
WRONG_SECRET = "wrong-secret-Tq93mXv2Lp8"


def config_errors(kind: str, raw: dict[str, Any]) -> list[str]:
    """Parse ``raw`` as credentials.test of type ``kind``; every problem, with its path."""
    errors: list[ConfigError] = []
    f = Fields(raw, "credentials.test", errors)
    PROVIDER_TYPES[kind].parse(f)
    f.done()
    return [str(e) for e in errors]


def parse_spec(kind: str, raw: dict[str, Any]) -> Any:
    """Parse ``raw`` as type ``kind`` and insist it is valid."""
    errors: list[ConfigError] = []
    f = Fields(raw, "credentials.test", errors)
    spec = PROVIDER_TYPES[kind].parse(f)
    f.done()
    assert not errors, [str(e) for e in errors]
    return spec


def client_config(peer: OidcProvider, client_id: str, **extra: Any) -> dict[str, Any]:
    """The config entry for one of the peer's clients, with its registered auth method."""
    client = peer.clients[client_id]
    raw: dict[str, Any] = {"token_url": peer.token_url, "issuer": peer.issuer, "ca": str(peer.ca_path),
                           "client_id": client_id, "auth": client.auth_method}
    if client.secret:
        raw["client_secret"] = {"value": client.secret}
    return {**raw, **extra}


def request(scopes: tuple[str, ...] = (), **kwargs: Any) -> CredentialRequest:
    return CredentialRequest(upstream="billing-api", scopes=scopes, agent_id=AGENT_SPIFFE_ID, **kwargs)


def outbound(client_cert_sha256: str | None = None) -> OutboundRequest:
    return OutboundRequest("GET", "https", "billing.internal", 443, "/v1/invoices", "", CIMultiDict(),
                           client_cert_sha256=client_cert_sha256)


def b64url_to_hex(value: str) -> str:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def svid_copy(peer: OidcProvider, directory: Path) -> IdentitySource:
    """A real IdentitySource over a copy of the peer's tls_client_auth certificate."""
    cert, key = directory / "svid.crt", directory / "svid.key"
    shutil.copy(peer.mtls_cert.cert_path, cert)
    shutil.copy(peer.mtls_cert.key_path, key)
    return IdentitySource(cert, key, peer.pki.client_ca_path, {})


Make = Callable[..., Any]  # the ``make`` fixture: build(raw, kind="oauth2_client_credentials", provider_deps=None)


class ThreadSpy:
    """Wraps a function and records the thread of each call: a call that blocks (a TLS context built from
    the system trust store, a file read) must be made off the event loop's thread."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.threads: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self.function(*args, **kwargs)

    def on_loop(self) -> bool:
        """Whether any call ran on this (the test's, the loop's) thread."""
        return threading.get_ident() in self.threads
