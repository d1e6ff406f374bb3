"""SigV4 through the whole pipeline against moto: signed after every header rewrite, accepted with IAM auth on."""

from __future__ import annotations

import aiohttp
import pytest

from tests.credentials.test_aws_provider import BUCKET, REGION, iam_auth, moto  # noqa: F401  (fixtures)

pytestmark = pytest.mark.peer("moto")
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "reports", "direction": "outbound", "upstream": "s3", "methods": ["GET", "PUT"],
     "paths": [f"/{BUCKET}/reports/*"], "effect": "allow"}]}


def s3_config(moto, **source: object) -> dict:
    return {
        "outbound": {"upstreams": {"s3": {"url": moto.base, "credential": "aws"}}},
        "credentials": {"aws": {"type": "aws_sigv4", "region": REGION, "service": "s3", "source": source or {
            "type": "static", "access_key_id": {"value": moto.user.access_key_id},
            "secret_access_key": {"value": moto.user.secret_access_key}}}},
    }


async def test_the_agent_writes_and_reads_s3_through_the_sidecar(make_sidecar, moto, iam_auth):  # noqa: F811
    """An unsigned agent request is signed by the sidecar and accepted by moto with IAM auth on."""
    h = await make_sidecar(s3_config(moto), POLICY)
    iam_auth()
    body = b'{"total": 42}' * 100
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{h.outbound}/s3/{BUCKET}/reports/q3.json", data=body,
                         headers={"Authorization": "AWS4-HMAC-SHA256 agent-forged", "Content-Type": "application/json",
                                  "x-amz-meta-owner": "billing"}) as r:
            assert r.status == 200, await r.text()
        async with s.get(f"{h.outbound}/s3/{BUCKET}/reports/q3.json") as r:
            assert r.status == 200 and await r.read() == body
            assert r.headers.get("x-amz-meta-owner") == "billing"
        async with s.get(f"{h.outbound}/s3/{BUCKET}/private/x") as r:  # policy first: never signed
            assert (r.status, (await r.json())["error"]) == (403, "no_matching_rule")
    events = await h.settle()
    assert [e["credential"]["type"] for e in events[:2]] == ["aws_sigv4", "aws_sigv4"]
    assert events[0]["credential"]["standing"] is True
    assert moto.user.secret_access_key.encode() not in h.raw_log()


async def test_a_wrong_secret_is_refused_by_the_service(make_sidecar, moto, iam_auth):  # noqa: F811
    """A signature made with the wrong secret is refused by moto (403), proving the check is real."""
    h = await make_sidecar(s3_config(moto, type="static", access_key_id={"value": moto.user.access_key_id},
                                     secret_access_key={"value": "wrong-secret-canary"}), POLICY)
    iam_auth()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/s3/{BUCKET}/reports/q3.json") as r:
            assert r.status == 403 and "SignatureDoesNotMatch" in await r.text()
    assert b"wrong-secret-canary" not in h.raw_log()
