"""``sidecar demo``: a self-contained walk-through on loopback.

It starts a toy "billing API" and a sidecar (development identity, a generated signing key,
a JWT-assertion credential, a small policy) in a temporary directory, then plays the agent:
an allowed call with the agent's own token swapped for a short-lived one, a denied method,
an unknown upstream, a browser-made request, a task that is revoked mid-work. Each step
prints the trust decision the sidecar logged.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "read-invoices", "description": "the agent reads invoices", "direction": "outbound",
     "upstream": "billing-api", "methods": ["GET"], "paths": ["/v1/invoices/*"], "effect": "allow"},
    {"id": "never-delete", "direction": "outbound", "upstream": "billing-api", "methods": ["DELETE"],
     "effect": "deny"},
]}


async def _billing_api(request: web.Request) -> web.Response:
    auth = request.headers.get("Authorization", "")
    return web.json_response({"invoice": request.match_info.get("id"), "saw_authorization": auth[:24] + "..."})


def _write_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _config(tmp: Path, upstream_port: int) -> dict[str, Any]:
    _write_key(tmp / "signing.pem")
    (tmp / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    listen = {"listen": "127.0.0.1:0"}
    return {
        "agent": {"name": "demo-agent", "environment": "demo"}, "state_dir": str(tmp / "state"),
        "identity": {"signing_key": {"file": str(tmp / "signing.pem"), "kid": "demo-1"}},
        "outbound": {"listen": "127.0.0.1:0", "upstreams": {"billing-api": {
            "url": f"http://127.0.0.1:{upstream_port}", "credential": "billing-assertion"}}},
        "credentials": {"billing-assertion": {"type": "jwt_assertion", "audience": "https://billing.example/",
                                              "ttl": "60s"}},
        "policy": {"files": [str(tmp / "policy.yaml")]},
        "health": listen, "metrics": listen, "admin": listen, "shutdown": {"drain": "1s"},
    }


def _say(step: str, status: int, event: dict[str, Any] | None) -> None:
    print(f"\n== {step}\n   HTTP {status}")
    if event:
        cred = event.get("credential") or {}
        print(f"   decision={event['decision']} reason={event['reason']} rule={event['rule_id']}"
              f" credential={cred.get('type')}/{cred.get('source')} outcome={event['outcome']}")


async def _walk(sidecar: Any, log: io.BytesIO) -> None:
    from sidecar.observe import decision_log

    out = f"http://127.0.0.1:{sidecar.ports['outbound']}"

    def last_event() -> dict[str, Any] | None:
        decision_log.WRITER.flush()
        events = [json.loads(l) for l in log.getvalue().splitlines() if b'"trust_decision"' in l]
        return events[-1] if events else None

    async with aiohttp.ClientSession() as s:
        steps = [
            ("the agent reads an invoice, sending its own (standing) token", "GET", "/billing-api/v1/invoices/42",
             {"Authorization": "Bearer agent-long-lived-key"}),
            ("the agent tries to delete it", "DELETE", "/billing-api/v1/invoices/42", {}),
            ("the agent calls an upstream nobody configured", "GET", "/pastebin/upload", {}),
            ("a page in the agent's browser tries the same call", "GET", "/billing-api/v1/invoices/42",
             {"Origin": "https://evil.example"}),
        ]
        for step, method, path, headers in steps:
            async with s.request(method, out + path, headers=headers) as r:
                body = await r.text()
            await asyncio.sleep(0.01)
            _say(step, r.status, last_event())
            if r.status == 200:
                print(f"   the upstream saw: {json.loads(body)['saw_authorization']} (a 60 s JWT, not the agent's key)")
        task = sidecar.runtime.tasks.open(principal=("demo", "alice@example.com"), subject_token=None,
                                          delegation="asserted", actor_type="human", trigger="support", ttl=600)
        async with s.get(out + "/billing-api/v1/invoices/7", headers={"X-Sidecar-Task": task.id}) as r:
            await asyncio.sleep(0.01)
            _say("the agent works on alice's support task", r.status, last_event())
        sidecar.runtime.revocations.add("task", task.id, 3600)
        async with s.get(out + "/billing-api/v1/invoices/7", headers={"X-Sidecar-Task": task.id}) as r:
            await asyncio.sleep(0.01)
            _say("an operator revoked the task; the agent tries again", r.status, last_event())


async def _run() -> int:
    from sidecar.app import Sidecar
    from sidecar.config import parse_config
    from sidecar.observe.decision_log import configure_logging

    app = web.Application()
    app.router.add_get("/v1/invoices/{id}", _billing_api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log = io.BytesIO()
    configure_logging("info", stream=log)
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        sidecar = Sidecar(parse_config(_config(Path(tmp), port), base_dir=Path(tmp)))
        await sidecar.start()
        print(f"sidecar for {sidecar.runtime.agent.id}: outbound on 127.0.0.1:{sidecar.ports['outbound']}")
        try:
            await _walk(sidecar, log)
        finally:
            await sidecar.stop()
            await runner.cleanup()
    print("\nEvery step above was one JSON trust-decision event; `sidecar run` writes them to stdout.")
    return 0


def demo() -> int:
    return asyncio.run(_run())
