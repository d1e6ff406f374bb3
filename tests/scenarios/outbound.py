"""An agent calling the ``billing`` upstream through the outbound listener, with a static credential."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tests.harness import Upstream

SECRET = "canary-static-secret-9f3a7c"


def config_for(upstream: Upstream | SimpleNamespace, **extra: object) -> dict:
    return {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"billing": {"url": upstream.url + "/api", "hosts": ["billing.internal"],
                                                "credential": "legacy", **extra}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }


def outbound_to(port: int, **upstream: Any) -> dict[str, Any]:
    """A sidecar whose upstream ``billing`` is the raw server on ``port`` (base path /api)."""
    return config_for(SimpleNamespace(url=f"http://127.0.0.1:{port}"), **upstream)


POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "read-invoices", "direction": "outbound", "upstream": "billing", "methods": ["GET", "POST"],
     "paths": ["/v1/**"], "effect": "allow"},
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"], "effect": "deny"},
]}

ALLOW_ALL = {"version": 1, "default": "deny", "rules": [
    {"id": "all", "direction": "outbound", "upstream": "billing", "effect": "allow"},
]}
