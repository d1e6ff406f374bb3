"""Start-up pays only for what the config uses: a started sidecar whose only credential is ``static``
has loaded no other provider module and none of the heavy optional libraries (issue 16 item 2).

Each case starts a real sidecar (listeners on port 0) in a fresh interpreter and reads its
``sys.modules`` once it is started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Every provider module PROVIDER_TYPES' builders import, but static's, and the libraries only
# some configs need: PyJWT (jwt_issuers, signing), CEL (a rule's condition), the Redis bus, rich.
OTHER_PROVIDERS = frozenset({
    "sidecar.credentials.aws", "sidecar.credentials.http_signature", "sidecar.credentials.azure",
    "sidecar.credentials.gcp", "sidecar.credentials.hmac_signing", "sidecar.credentials.jwt_assertion",
    "sidecar.credentials.oauth2", "sidecar.credentials.token_exchange", "sidecar.credentials.token_endpoint",
})
HEAVY_OPTIONAL = frozenset({"jwt", "cel", "redis", "boto3", "botocore", "rich"})
# HTTP/2 loads with the first HTTP/2 connection or an HTTP/2 upstream, not with a listener that could take one.
HTTP2_LIBRARIES = frozenset({"h2", "hpack", "hyperframe"})
HTTP2_MODULES = frozenset({"sidecar.http2.server", "sidecar.http2.side", "sidecar.http2.guard", "sidecar.forward.http2"})
CEL_MODULES = frozenset({"sidecar.policy.cel", "sidecar.policy.cel_syntax"})  # compiled only for a rule's when.expr

STARTED = """\
import asyncio, json, sys
from pathlib import Path
from sidecar.app import Sidecar
from sidecar.config import load_config

async def main():
    sidecar = Sidecar(load_config(Path(sys.argv[1])))
    await sidecar.start()
    loaded = sorted(sys.modules)
    await sidecar.stop()
    print(json.dumps(loaded))

asyncio.run(main())
"""


def loaded_modules(tmp_path: Path, credentials: dict[str, object], upstream: dict[str, object] | None = None,
                   rules: list[dict[str, object]] | None = None) -> set[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"version": 1, "default": "deny", "rules": rules or []}))
    listen = {"listen": "127.0.0.1:0"}
    config = {"state_dir": str(tmp_path / "state"), "policy": {"files": [str(policy)]},
              "outbound": {"listen": "127.0.0.1:0",
                           "upstreams": {"api": {"url": "http://127.0.0.1:9", "credential": "key", **(upstream or {})}}},
              "credentials": credentials, "health": listen, "metrics": listen, "admin": listen}
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-c", STARTED, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def test_a_static_only_config_loads_no_other_provider_and_no_optional_library(tmp_path):
    """Only the static provider's module, and no PyJWT, CEL, Redis, boto, rich or h2 (the outbound listener
    takes h2c, but none has come), once started."""
    loaded = loaded_modules(tmp_path, {"key": {"type": "static", "header": "X-API-Key", "value": {"value": "k" * 16}}})
    assert "sidecar.credentials.static" in loaded
    assert loaded & OTHER_PROVIDERS == set()
    assert {m.split(".")[0] for m in loaded} & HEAVY_OPTIONAL == set()
    assert {m.split(".")[0] for m in loaded} & HTTP2_LIBRARIES == set()
    assert loaded & HTTP2_MODULES == set()
    assert loaded & CEL_MODULES == set()


@pytest.mark.parametrize(("spec", "module"), [
    # the check can fail: a provider in the config is loaded, and only that one
    ({"type": "aws_sigv4", "region": "eu-west-1", "service": "s3",
      "source": {"type": "static", "access_key_id": {"value": "AKIDEXAMPLE"},
                 "secret_access_key": {"value": "s" * 40}}}, "sidecar.credentials.aws"),
    ({"type": "http_signature", "algorithm": "hmac-sha256", "keyid": "partner-2026",
      "key": {"value": "c2lnbmluZy1rZXktZm9yLXRoZS1zY2hlbWEtb25seS0wMTIzNDU2Nzg5"}, "key_encoding": "base64",
      "components": ["@method", "@target-uri"]},
     "sidecar.credentials.http_signature"),
], ids=["aws_sigv4", "http_signature"])
def test_a_configured_provider_is_the_one_loaded(tmp_path, spec, module):
    """The provider a config names is imported when it is built; the others still are not."""
    loaded = loaded_modules(tmp_path, {"key": spec})
    assert module in loaded
    assert loaded & OTHER_PROVIDERS == {module}


def test_an_http2_upstream_loads_h2_at_start(tmp_path):
    """The check can fail: an upstream with ``http2: true`` builds its HTTP/2 pool (and loads ``h2``) at start."""
    loaded = loaded_modules(tmp_path, {"key": {"type": "static", "header": "X-API-Key", "value": {"value": "k" * 16}}},
                            {"http2": True})
    assert {"h2", "hpack", "sidecar.forward.http2"} <= loaded


def test_a_rule_with_an_expression_loads_cel(tmp_path):
    """The check can fail: a rule's ``when.expr`` is compiled at load, with the CEL modules and library."""
    rule = {"id": "cel", "direction": "outbound", "upstream": "api", "effect": "allow",
            "when": {"expr": 'request.method == "GET"'}}
    loaded = loaded_modules(tmp_path, {"key": {"type": "static", "header": "X-API-Key", "value": {"value": "k" * 16}}},
                            rules=[rule])
    assert CEL_MODULES <= loaded and "cel" in {m.split(".")[0] for m in loaded}
