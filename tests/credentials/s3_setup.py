"""The S3 upstream configurations the S3 tests share: moto behind a static key, a recording upstream, and the
policy boto3's calls are decided by."""

from __future__ import annotations

from typing import Any

from tests.harness import Upstream
from tests.peers.moto import BUCKET, REGION


def s3_config(moto, **source: object) -> dict:
    return {
        "outbound": {"upstreams": {"s3": {"url": moto.base, "credential": "aws"}}},
        "credentials": {"aws": {"type": "aws_sigv4", "region": REGION, "service": "s3", "source": source or {
            "type": "static", "access_key_id": {"value": moto.user.access_key_id},
            "secret_access_key": {"value": moto.user.secret_access_key}}}},
    }


def recording_config(upstream: Upstream, **extra: Any) -> dict:
    """The S3 upstream is a recording server: it shows what the sidecar forwards, and that a refusal sends nothing."""
    return {"outbound": {"upstreams": {"s3": {"url": upstream.url, "credential": "aws", **extra}}},
            "credentials": {"aws": {"type": "aws_sigv4", "region": REGION, "service": "s3", "source": {
                "type": "static", "access_key_id": {"value": "AKIDSIDECAR"},
                "secret_access_key": {"value": "sidecar-secret-canary"}}}}}


BOTO3_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "reports", "direction": "outbound", "upstream": "s3", "methods": ["GET", "HEAD", "PUT", "POST", "DELETE"],
     "paths": [f"/{BUCKET}/reports/**"], "effect": "allow"},
    {"id": "inbox-write-only", "direction": "outbound", "upstream": "s3", "methods": ["PUT", "POST"],
     "paths": [f"/{BUCKET}/inbox/**"], "effect": "allow"},
    {"id": "list", "direction": "outbound", "upstream": "s3", "methods": ["GET", "POST"], "paths": [f"/{BUCKET}"],
     "effect": "allow"},
    {"id": "no-secret-reads", "direction": "outbound", "upstream": "s3", "methods": ["GET"],
     "paths": [f"/{BUCKET}/reports/secret/**"], "effect": "deny"},
    {"id": "held-reads", "direction": "outbound", "upstream": "s3", "methods": ["GET"],
     "paths": [f"/{BUCKET}/reports/held/**"], "effect": "require_approval"}]}
