"""An mTLS caller reaching the agent through the inbound listener, optionally with a human's token."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.ca import ca_issue
from tests.harness import SidecarHarness, Upstream

ISSUER = "https://login.example.test"
KEY = ec.generate_private_key(ec.SECP256R1())
ORCHESTRATOR = "spiffe://sidecar.local/orchestrator"


def jwks_file(tmp: Path) -> Path:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key()))
    jwk.update({"kid": "k1", "alg": "ES256", "use": "sig"})
    path = tmp / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


def human_token(sub: str = "alice@example.com", **claims: object) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": sub, "aud": "billing-agent", "iat": now, "exp": now + 300,
               "client_id": "web-app", **claims}
    return jwt.encode(payload, KEY, algorithm="ES256", headers={"kid": "k1"})


def inbound_config(tmp: Path, agent: Upstream | SimpleNamespace, **jwt_extra: object) -> dict:
    return {
        "agent": {"name": "billing-agent"},
        "inbound": {"forward_to": agent.url, "trust_domains": ["sidecar.local"],
                    "jwt": {"required": False, "issuers": [{"issuer": ISSUER, "jwks_file": str(jwks_file(tmp)),
                                                           "audiences": ["billing-agent"], **jwt_extra}]}},
        "outbound": {"upstreams": {}},
    }


def inbound_to(tmp: Path, port: int, **timeouts: str) -> dict[str, Any]:
    """A sidecar whose agent (inbound.forward_to) is the raw server on ``port``."""
    config = inbound_config(tmp, SimpleNamespace(url=f"http://127.0.0.1:{port}"))
    if timeouts:
        config["inbound"]["timeouts"] = timeouts
    return config


POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "orchestrator", "direction": "inbound", "callers": [ORCHESTRATOR],
     "paths": ["/tasks/**"], "effect": "allow"},
]}


def client_context(h: SidecarHarness, spiffe_id: str, out: Path) -> ssl.SSLContext:
    assert h.sidecar is not None
    state = h.sidecar.config.state_dir
    paths = ca_issue(state, spiffe_id, out)
    ctx = ssl.create_default_context(cafile=str(paths["bundle"]))
    ctx.check_hostname = False  # SVIDs name SPIFFE IDs, not hosts
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    return ctx


async def call(h: SidecarHarness, ctx: ssl.SSLContext, path: str, headers: dict | None = None) -> tuple[int, Any]:
    url = f"https://127.0.0.1:{h.port('inbound')}{path}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None)
