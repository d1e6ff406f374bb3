"""Micro-benchmark: µs per SigV4 signature, against hashing the same canonical request.

    python -m tests.bench.bench_sigv4 [--n 20000]      (from the repository root)

Figures are ratios within one run (PERFORMANCE.md: the machine is noisy). Rows:
- baseline: hashlib.sha256 of the canonical request the signer builds (the floor: one hash);
- sign, cached key: sign() with the signing key already derived (the per-request path);
- sign, cold key: sign() with the key cache cleared before each call (once a day per scope);
- canonical request only: building the canonical request text, no hashing or HMAC.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from datetime import datetime, timezone

from sidecar.credentials.sigv4 import (
    AwsCredentials,
    canonical_request,
    payload_sha256,
    sign,
    signing_key,
)
from tests.bench.timing import per_call_us

CREDS = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token", None)
NOW = datetime(2015, 8, 30, 12, 36, tzinfo=timezone.utc)
HOST = "my-bucket.s3.eu-west-1.amazonaws.com"
PATH = "/reports/2026/agent%20output.json"
QUERY = "x-id=PutObject&tagging=a%3Db"
HEADERS = [("Content-Type", "application/json"), ("Content-Length", "2048")]
BODY_HASH = payload_sha256(b"x" * 2048)


def _sign() -> None:
    sign("PUT", HOST, PATH, QUERY, HEADERS, BODY_HASH, CREDS, "eu-west-1", "s3", NOW)


def _sign_cold() -> None:
    signing_key.cache_clear()
    _sign()


def _canonical() -> tuple[str, str]:
    headers = [*HEADERS, ("host", HOST), ("x-amz-date", "20150830T123600Z")]
    return canonical_request("PUT", PATH, QUERY, headers, BODY_HASH, s3=True)


def _baseline(text: bytes) -> Callable[[], None]:
    def run() -> None:
        hashlib.sha256(text).hexdigest()

    return run



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per timed run")
    n = parser.parse_args().n
    base = per_call_us(_baseline(_canonical()[0].encode()), n)
    rows = {
        "baseline: sha256 of canonical request": base,
        "canonical request only": per_call_us(_canonical, n),
        "sign, cached key": per_call_us(_sign, n),
        "sign, cold key": per_call_us(_sign_cold, max(n // 10, 100)),
    }
    for name, us in rows.items():
        print(f"{name:40s} {us:8.2f} µs  {us / base:6.1f}x baseline")


if __name__ == "__main__":
    main()
