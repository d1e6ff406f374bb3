"""The one table of credential types: what it holds, what each entry builds, and that reading a
config through it loads no provider (providers send requests; validating a file must not load them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.errors import ConfigError
from sidecar.fields import Fields

ROOT = Path(__file__).resolve().parents[2]
DEPS = ProviderDeps(agent_id="spiffe://example.org/ns/agents/sa/billing", id_key=b"k" * 32)
TOKEN_URL = "https://login.example.com/token"

# One valid entry per type, the smallest each accepts.
MINIMAL: dict[str, dict[str, Any]] = {
    "aws_sigv4": {"region": "eu-west-1", "service": "s3",  # web identity: keys from STS when first fetched
                  "source": {"type": "web_identity", "role_arn": "arn:aws:iam::123456789012:role/agent"}},
    "azure_workload_identity": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "8a2c1f0e",
                                "scopes": ["https://storage.azure.com/.default"]},
    "http_signature": {"algorithm": "hmac-sha256", "key": {"value": "YS1zaGFyZWQtc2VjcmV0LW9mLTMyLWJ5dGVzLW9yLW1vcmUh"},
                       "components": ["@method"]},
    "gcp_workload_identity": {"audience": "//iam.googleapis.com/projects/1/locations/global/"
                                          "workloadIdentityPools/agents/providers/kubernetes",
                              "token_file": "/var/run/secrets/tokens/gcp"},
    "hmac_signing": {"key": {"value": "a-shared-secret-of-32-bytes-or-more!"}, "algorithm": "sha256",
                     "canonical": ["method", "path"], "signature": {"header": "X-Signature"}},
    "jwt_assertion": {"audience": "https://search.internal/"},
    "oauth2_client_credentials": {"token_url": TOKEN_URL, "client_id": "billing-agent", "auth": "tls_client_auth"},
    "oauth2_token_exchange": {"token_url": TOKEN_URL, "client_id": "billing-agent", "auth": "tls_client_auth",
                              "audience": "crm"},
    "static": {"header": "X-API-Key", "value": {"value": "legacy-key-value"}},
}


def documented_types() -> set[str]:
    """The ``type:`` of every entry under ``credentials:`` in PRODUCT.md's example config."""
    text = (ROOT / "docs" / "PRODUCT.md").read_text()
    block = re.search(r"^credentials:\n(.*?)^\S", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "PRODUCT.md: expected a credentials: block in the example config"
    return set(re.findall(r"^    type: (\w+)", block.group(1), re.MULTILINE))


def test_the_table_holds_every_documented_type_and_nothing_else() -> None:
    """PRODUCT.md names the contract's credential types; the table is exactly those."""
    assert set(PROVIDER_TYPES) == documented_types()
    assert all(name == kind.type for name, kind in PROVIDER_TYPES.items())


@pytest.mark.parametrize("kind", sorted(PROVIDER_TYPES))  # a type added without a MINIMAL entry fails here
async def test_each_type_parses_its_spec_and_builds_its_provider(kind: str) -> None:
    """An entry parses without a problem into a spec of that type, and builds a provider of that type."""
    errors: list[ConfigError] = []
    f = Fields(MINIMAL[kind], f"credentials.{kind}", errors)
    spec = PROVIDER_TYPES[kind].parse(f)
    f.done()
    assert not errors and spec is not None and spec.type == kind, [str(e) for e in errors]
    provider = PROVIDER_TYPES[kind].build("test", spec, DEPS)
    assert (provider.name, provider.type) == ("test", kind)
    await provider.aclose()


LOADED = """
import json, sys
from pathlib import Path
import yaml
from sidecar.config import parse_config
from sidecar.errors import ConfigInvalid
raw = yaml.safe_load(Path("sidecar/schemas/config.exhaustive.yaml").read_text())
try:
    parse_config(raw, base_dir=Path("/nonexistent"))
except ConfigInvalid:
    pass  # its files do not exist here; every credential entry is still parsed
print(json.dumps(sorted(sys.modules)))
"""


def test_reading_a_config_loads_no_provider_and_no_http_client() -> None:
    """sidecar.config parses every credential type with specs only: no aiohttp, no forward, no provider."""
    out = subprocess.run([sys.executable, "-c", LOADED], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    providers = {"aws", "http_signature", "jwt_assertion", "oauth2", "static", "token_exchange", "token_endpoint"}
    assert {m for m in loaded if m.split(".")[0] == "aiohttp"} == set()
    assert {m for m in loaded if m.startswith("sidecar.forward")} == set()
    assert {m for m in loaded if m.rpartition(".")[2] in providers and m.startswith("sidecar.credentials")} == set()
