"""Micro-benchmark: µs per ``aws_sigv4`` ``apply`` (signing one request), small GET and 64 KiB PUT.

    python -m tests.bench.bench_aws [--n 20000]      (from the repository root)

Figures are compared within one run (PERFORMANCE.md: the machine is noisy). Each timed call
builds a fresh ``OutboundRequest`` (apply rewrites its headers), so the rows are:
- build request only: copying the pipeline's headers into a new request (subtracted below);
- sign() only: the signer for the same small GET, without the provider around it;
- sha256 of 64 KiB: the floor of hashing a 64 KiB body;
- apply, small GET / 64 KiB PUT / 64 KiB PUT unsigned payload: the provider's per-request work,
  shown with the build cost subtracted.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from datetime import datetime, timezone

from multidict import CIMultiDict

from sidecar.credentials.aws import AwsSigV4Provider
from sidecar.credentials.base import Credential, OutboundRequest, ProviderDeps
from sidecar.credentials.sigv4 import AwsCredentials, payload_sha256, sign
from sidecar.credentials.specs import AwsSigV4Spec, WebIdentitySource
from tests.bench.timing import per_call_us

CREDS = AwsCredentials("ASIAEXAMPLEEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdz" * 30,
                       time.time() + 3600)
CREDENTIAL = Credential(type="aws_sigv4", provider="bench", id="h:x", expires_at=CREDS.expires_at, material=CREDS)
HOST = "agent-bucket.s3.eu-west-1.amazonaws.com"
BODY = b"x" * 65536
# What the pipeline hands over: the agent's cleaned headers plus Host, Via and traceparent.
HEADERS = [("Host", HOST), ("User-Agent", "agent/1.0"), ("Accept", "*/*"), ("Accept-Encoding", "gzip"),
           ("Via", "1.1 sidecar"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
PUT_HEADERS = [*HEADERS, ("Content-Type", "application/octet-stream"), ("x-amz-meta-task", "t-1")]


def _provider(unsigned: bool) -> object:
    source = WebIdentitySource("arn:aws:iam::123456789012:role/agent", "https://sts.eu-west-1.amazonaws.com",
                               None, None, 3600, None, "sts.amazonaws.com")
    spec = AwsSigV4Spec("eu-west-1", "s3", unsigned, source)
    return AwsSigV4Provider("bench", spec, ProviderDeps(agent_id="spiffe://example.org/agent"))


def _request(method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes | None
             ) -> Callable[[], OutboundRequest]:
    def build() -> OutboundRequest:
        return OutboundRequest(method, "https", HOST, 443, path, query, CIMultiDict(headers), body)

    return build


def _apply(provider: object, build: Callable[[], OutboundRequest]) -> Callable[[], None]:
    apply = provider.apply  # type: ignore[attr-defined]

    def run() -> None:
        apply(build(), CREDENTIAL)

    return run


def _sign_only() -> None:
    sign("GET", HOST, "/reports/2026/a.json", "", [], payload_sha256(b""), CREDS, "eu-west-1", "s3",
         datetime.now(timezone.utc))


def _sha256_64k() -> None:
    hashlib.sha256(BODY).hexdigest()



def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per timed run")
    n = parser.parse_args().n
    get = _request("GET", "/reports/2026/a.json", "", HEADERS, None)
    put = _request("PUT", "/reports/2026/big%20file.bin", "x-id=PutObject", PUT_HEADERS, BODY)
    build = per_call_us(get, n)
    rows = {
        "build request only": (build, False),
        "sign() only, small GET": (per_call_us(_sign_only, n), False),
        "sha256 of 64 KiB": (per_call_us(_sha256_64k, max(n // 10, 100)), False),
        "apply, small GET": (per_call_us(_apply(_provider(False), get), n), True),
        "apply, 64 KiB PUT": (per_call_us(_apply(_provider(False), put), max(n // 10, 100)), True),
        "apply, 64 KiB PUT, unsigned payload": (per_call_us(_apply(_provider(True), put), n), True),
    }
    for name, (us, minus_build) in rows.items():
        net = f"  ({us - build:7.2f} µs without building the request)" if minus_build else ""
        print(f"{name:40s} {us:8.2f} µs{net}")


if __name__ == "__main__":
    main()
