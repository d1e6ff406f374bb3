"""Micro-benchmark: steady-state cost per request of each credential provider (a cache hit plus
``apply``), against the static provider measured in the same run.

    python -m tests.bench.bench_providers [--n 20000]      (from the repository root)

Figures are ratios within one run (PERFORMANCE.md: the machine is noisy). Each provider's cache
entry is primed once; the oauth2 ones from a token response built here (a JWT access token
signed locally, shaped like oidc-provider's), so no token endpoint is needed: in the steady
state none is called; the workload identity rows (Azure, GCP) are primed the same way. Rows: ``get+apply`` is ``await cache.get(...)`` then ``apply``; ``key``
is ``cache_key`` alone; ``apply`` is ``apply`` alone. Most of ``get+apply`` is the cache's own
work (a dict lookup, a freshness check and a labelled counter increment), the same for every row.

``http_signature`` rows sign a POST of the size named (``@method``, ``@target-uri``,
``content-type``, ``content-length`` and, with a digest, a ``Content-Digest`` over the body);
rows with 1 MiB bodies or RSA keys run ``n / 20`` times. ``hmac_signing`` rows sign the same POSTs with
three declared schemes (``HMAC_SCHEMES``: two shaped like the vendors of ``config/hmac_signing.example.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from types import SimpleNamespace
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from multidict import CIMultiDict

from sidecar.credentials.gcp import GcpWorkloadIdentityProvider
from sidecar.credentials.oauth2 import ClientCredentialsProvider
from sidecar.credentials.token_endpoint import parse_token_response
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.credentials.token_exchange import TokenExchangeProvider
from sidecar.credentials.base import CredentialRequest, OutboundRequest, ProviderDeps, TaskRef
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import ConfigError
from sidecar.fields import Fields, Secret
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.observe.metrics import Metrics

AGENT = "spiffe://example.org/ns/agents/sa/billing"
RESOURCE = "https://billing.internal/"
CERT_SHA256 = "ab" * 32
TASK = TaskRef("task-1", "https://login.example", "alice", Secret("eyJ.subject.token"), "delegated")
OAUTH = {"token_url": "https://login.example/token", "client_id": "billing-agent", "resource": RESOURCE,
         "scopes": ["invoices.read"]}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (credential type, config entry)
    "static": ("static", {"header": "Authorization", "scheme": "Bearer ", "value": {"value": "s" * 40}}),
    "oauth2 client_secret_basic": ("oauth2_client_credentials", {**OAUTH, "client_secret": {"value": "s" * 40}}),
    "oauth2 tls_client_auth (bound)": ("oauth2_client_credentials", {**OAUTH, "auth": "tls_client_auth"}),
    "oauth2_token_exchange (task)": ("oauth2_token_exchange", {**OAUTH, "auth": "tls_client_auth"}),
    "jwt_assertion": ("jwt_assertion", {"audience": RESOURCE}),
    "azure_workload_identity": ("azure_workload_identity", {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                                            "scopes": ["https://storage.azure.com/.default"]}),
    "gcp_workload_identity": ("gcp_workload_identity", {
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/agents/providers/kubernetes",
        "token_file": "/var/run/secrets/tokens/gcp"}),
    "jwt_assertion (task)": ("jwt_assertion", {"audience": RESOURCE}),
}
KIB, MIB = 1024, 1024 * 1024
SIGNED = ["@method", "@target-uri", "content-type", "content-length"]
BODIES: dict[str, int] = {}  # label -> body size, for the http_signature rows


def _pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _signature_rows() -> None:
    keys = {"hmac-sha256": "c" * 44, "ed25519": _pem(ed25519.Ed25519PrivateKey.generate()),
            "ecdsa-p256-sha256": _pem(ec.generate_private_key(ec.SECP256R1())),
            "rsa-pss-sha512": _pem(rsa.generate_private_key(65537, 2048))}
    keys["rsa-v1_5-sha256"] = keys["rsa-pss-sha512"]
    rows = [(alg, 4 * KIB, "sha-256") for alg in keys] + [
        ("ed25519", 4 * KIB, None), ("ed25519", MIB, "sha-256"), ("ed25519", MIB, "sha-512"), ("hmac-sha256", MIB, "sha-256")]
    for alg, size, digest in rows:
        raw = {"algorithm": alg, "key": {"value": keys[alg]}, "keyid": "bench", "nonce": True, "expires": "5m",
               "components": SIGNED + (["content-digest"] if digest else [])}
        label = f"http_signature {alg} {'1 MiB' if size == MIB else '4 KiB'} {digest or 'no digest'}"
        CONFIGS[label] = ("http_signature", {**raw, **({"content_digest": digest} if digest else {})})
        BODIES[label] = size


HMAC_SCHEMES = {  # shaped like config/hmac_signing.example.yaml's vendors, and one over a body hash
    "query+body sha256 hex": {"algorithm": "sha256", "canonical": ["query", "body"],
                              "signature": {"query": "signature"},
                              "timestamp": {"query": "timestamp", "format": "unix_ms"}},
    "path+sha256(body) sha512 b64": {"algorithm": "sha512", "encoding": "base64", "signature": {"header": "API-Sign"},
                                     "canonical": ["path", "sha256(form:nonce, body)"]},
    "method,target,ts,body_hash": {"algorithm": "sha256", "separator": "\n", "signature": {"header": "X-Signature"},
                                   "canonical": ["method", "target", "timestamp", "body_hash"],
                                   "timestamp": {"header": "X-Timestamp"}, "nonce": {"header": "X-Nonce"}},
}


def _hmac_rows() -> None:
    for scheme, raw in HMAC_SCHEMES.items():
        for size in (4 * KIB, MIB):
            label = f"hmac_signing {scheme} {'1 MiB' if size == MIB else '4 KiB'}"
            CONFIGS[label] = ("hmac_signing", {"key": {"value": "k" * 64},
                                               "key_id": {"header": "X-Api-Key", "value": {"value": "key-1"}}, **raw})
            BODIES[label] = size


_signature_rows()
_hmac_rows()


def _signer(directory: Path) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / "signing.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return Signer(load_signing_key(path, "bench"), AGENT)


def _token_response(signer: Signer, bound: bool, act: bool) -> bytes:
    claims: dict[str, Any] = {"sub": "alice", "aud": RESOURCE, "scope": "invoices.read", "jti": uuid.uuid4().hex}
    if bound:
        claims["cnf"] = {"x5t#S256": jwt.utils.base64url_encode(bytes.fromhex(CERT_SHA256)).decode()}
    if act:
        claims["act"] = {"sub": AGENT}
    token, _, _ = signer.sign(claims, ttl=300, typ="at+jwt")
    return json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": 300}).encode()


def _build(label: str, deps: ProviderDeps) -> Any:
    kind, raw = CONFIGS[label]
    errors: list[ConfigError] = []
    f = Fields(raw, f"credentials.{label}", errors)
    spec = PROVIDER_TYPES[kind].parse(f)
    f.done()
    assert not errors and spec is not None, errors
    return PROVIDER_TYPES[kind].build("bench", spec, deps)


async def _prime(provider: Any, req: CredentialRequest, cache: CredentialCache, signer: Signer) -> None:
    if isinstance(provider, (ClientCredentialsProvider, TokenExchangeProvider, GcpWorkloadIdentityProvider)):
        body = _token_response(signer, bound=provider.endpoint.cert_thumbprint() is not None,
                               act=isinstance(provider, TokenExchangeProvider))
        resp = parse_token_response("bench", body)
        credential = provider.endpoint.credential(provider.type, resp, scopes=("invoices.read",), audience=RESOURCE)

        async def canned(_: CredentialRequest) -> Any:
            return credential

        provider.fetch = canned  # the steady state never fetches; priming must not need a token endpoint
    await cache.get(provider, req)


async def _per_call_us(fn: Callable[[], Awaitable[None]], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def _sync_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


async def _measure(label: str, deps: ProviderDeps, signer: Signer, n: int) -> tuple[float, float, float]:
    provider = _build(label, deps)
    req = CredentialRequest("billing-api", (), AGENT, TASK if "(task)" in label else None)
    cache = CredentialCache(Metrics())
    await _prime(provider, req, cache, signer)
    out = OutboundRequest("GET", "https", "billing.internal", 443, "/v1/invoices", "", CIMultiDict(),
                          client_cert_sha256=CERT_SHA256)
    if label in BODIES:
        out.method, out.body = "POST", bytes(BODIES[label])
        out.headers["Content-Type"] = "application/json"
        n = n // 20 if BODIES[label] >= MIB or "rsa" in label else n
    credential, source = await cache.get(provider, req)
    assert source in ("cache", "static"), source

    async def get_and_apply() -> None:
        got, _ = await cache.get(provider, req)
        provider.apply(out, got)

    try:
        return (await _per_call_us(get_and_apply, n), _sync_us(lambda: provider.cache_key(req), n),
                _sync_us(lambda: provider.apply(out, credential), n))
    finally:
        await cache.aclose()
        await provider.aclose()


async def main(n: int) -> None:
    with TemporaryDirectory() as tmp:
        signer = _signer(Path(tmp))
        svid = SimpleNamespace(state=SimpleNamespace(cert_sha256=CERT_SHA256))
        deps = ProviderDeps(agent_id=AGENT, signer=signer, svid=svid, id_key=b"k" * 32)
        for label in CONFIGS:  # warm-up: the first rows measured otherwise pay for it
            await _measure(label, deps, signer, max(n // 10, 1))
        rows = {label: await _measure(label, deps, signer, n) for label in CONFIGS}
    base = rows["static"][0]
    print(f"{'provider':52} {'get+apply µs':>13} {'ratio':>8} {'key µs':>8} {'apply µs':>9}")
    for label, (total, key, apply) in rows.items():
        print(f"{label:52} {total:13.2f} {total / base:8.2f} {key:8.2f} {apply:9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    asyncio.run(main(parser.parse_args().n))
