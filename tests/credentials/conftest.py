"""Fixtures of the credential tests: providers built from raw config against the oidc peer.

``make`` builds with ``deps``; a test module that defines its own ``deps`` fixture (token exchange)
has ``make`` build with that one instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.identity.source import IdentitySource
from tests.credentials.providers import ID_KEY, Make, parse_spec, svid_copy
from tests.peers.oidc import AGENT_SPIFFE_ID, OidcProvider


@pytest.fixture
def svid(oidc_provider: OidcProvider, tmp_path: Path) -> IdentitySource:
    return svid_copy(oidc_provider, tmp_path)


@pytest.fixture
def deps(oidc_provider: OidcProvider, svid: IdentitySource) -> ProviderDeps:
    """svc-jwt's registered key signs client assertions (their iss is the client_id, not ours)."""
    key = oidc_provider.jwt_client_key
    signer = Signer(load_signing_key(key.path, key.kid), issuer="https://unused.example")
    return ProviderDeps(agent_id=AGENT_SPIFFE_ID, signer=signer, svid=svid, id_key=ID_KEY)


@pytest.fixture
async def make(deps: ProviderDeps) -> AsyncIterator[Make]:
    """Build providers from raw config; close them all afterwards."""
    built: list[Any] = []

    def build(raw: dict[str, Any], kind: str = "oauth2_client_credentials",
              provider_deps: ProviderDeps | None = None) -> Any:
        provider = PROVIDER_TYPES[kind].build("test", parse_spec(kind, raw), provider_deps or deps)
        built.append(provider)
        return provider

    yield build
    for provider in built:
        await provider.aclose()
