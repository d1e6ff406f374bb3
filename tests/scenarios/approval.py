"""An outbound rule that holds a request for a human approver, who decides with a token of the inbound issuer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt

from tests.harness import SidecarHarness, Upstream, admin
from tests.scenarios.inbound import ISSUER, KEY, jwks_file
from tests.scenarios.outbound import config_for


def approver_token(sub: str, aud: str = "agent-approvals") -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "sub": sub, "aud": aud, "iat": now, "exp": now + 300, "client_id": "console"},
                      KEY, algorithm="ES256", headers={"kid": "k1"})


def approval_config(upstream: Upstream, tmp_path: Path, timeout: str = "20s") -> dict:
    config = config_for(upstream)
    config["inbound"] = {"forward_to": "http://127.0.0.1:9", "jwt": {"issuers": [
        {"issuer": ISSUER, "jwks_file": str(jwks_file(tmp_path)), "audiences": ["billing-agent"]}]}}
    config["admin"] = {"approvers": [{"issuer": ISSUER, "subject": "*@example.com"}]}
    config["policy"] = {"approval_timeout": timeout}
    return config


APPROVAL_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "refunds-need-a-human", "direction": "outbound", "upstream": "billing", "methods": ["POST"],
     "paths": ["/v1/refunds"], "effect": "require_approval"}]}


async def listed(h: SidecarHarness) -> list[dict]:
    """The pending approvals, as soon as there is one (a bounded number of looks)."""
    pending = []
    for _ in range(100):
        _, body = await admin(h, "GET", "/approvals")
        pending = body["approvals"]
        if pending:
            break
        await asyncio.sleep(0.05)
    return pending


async def approve(h: SidecarHarness, approval_id: str) -> None:
    status, _ = await admin(h, "POST", f"/approvals/{approval_id}", json={"approve": True},
                            headers={"X-Approver-Token": approver_token("bob@example.com")})
    assert status == 200
