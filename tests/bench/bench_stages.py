"""What each outbound pipeline stage costs in-process, in µs per call (not part of the test run).

Complements ``bench_proxy`` (whole-proxy CPU per request, noisy on shared machines): here each stage
runs N times on one mocked request against a real, started sidecar, so a change to one stage shows
in its own line. Run: ``python -m tests.bench.bench_stages [N] [--gc THRESHOLD]``.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.credentials.base import CredentialRequest
from sidecar.exchange import Exchange
from sidecar.forward.body import RequestBody
from sidecar.http.headers import clean_request_headers, clean_response_headers
from sidecar.observe.decision_log import configure_logging, emit_event
from sidecar.pipeline import Outbound, check_headers
from sidecar.policy.readings import NONE
from sidecar.server import AiohttpIncoming
from sidecar.tracing import traceparent_for


def config(tmp: Path) -> dict[str, Any]:
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
        {"id": "all", "direction": "outbound", "upstream": "bench", "effect": "allow"}]}))
    listen = {"listen": "127.0.0.1:0"}
    return {"state_dir": str(tmp / "state"), "policy": {"files": [str(policy)]},
            "outbound": {"listen": "127.0.0.1:0", "upstreams": {"bench": {"url": "http://127.0.0.1:9",
                                                                          "credential": "key"}}},
            "credentials": {"key": {"type": "static", "header": "X-API-Key", "value": {"value": "bench-secret"}}},
            "health": listen, "metrics": listen, "admin": listen}


def timed(name: str, fn: Callable[[], Any], n: int) -> None:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    print(f"{name:26s} {(time.perf_counter() - start) / n * 1e6:8.2f} µs")


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    configure_logging("info", stream=open("/dev/null", "wb"))
    sidecar = Sidecar(parse_config(config(tmp), base_dir=tmp))
    await sidecar.start()
    rt, out = sidecar.runtime, None
    out = Outbound(rt)
    request = AiohttpIncoming(make_mocked_request("GET", "/bench/v1/items", headers=CIMultiDict({
        "Host": f"127.0.0.1:{sidecar.ports['outbound']}", "User-Agent": "bench", "Accept": "*/*"})))
    route = out._route(request)
    ex = Exchange("outbound", method="GET")
    ex.upstream, ex.host, ex.path = "bench", "127.0.0.1", route.path
    forwarded = clean_request_headers(request.headers, rt.drop_sets["bench"])
    facts = out._facts(request, ex, route, RequestBody(request, rt.config.outbound.limits, 1.0), forwarded)
    provider = rt.providers["key"]
    creq = CredentialRequest("bench", (), rt.agent.id)
    credential, _ = await rt.credentials.get(provider, creq)
    outgoing = out._outbound_request(request, route, "00-" + "1" * 32 + "-" + "2" * 16 + "-01", forwarded)
    ex.allow()
    ex.status, ex.outcome, ex.credential, ex.credential_source = 200, "completed", credential, "static"
    response_headers = CIMultiDictProxy(CIMultiDict({"Server": "nginx", "Content-Type": "application/json",
                                                     "Content-Length": "67", "Connection": "keep-alive"}))
    for name, fn in (
        ("Exchange()", lambda: Exchange("outbound", method="GET")),
        ("route (limits, boundary)", lambda: out._route(request)),
        ("  check_headers", lambda: check_headers(request, 100, 32768)),
        ("traceparent", lambda: traceparent_for(request.headers)),
        ("policy facts", lambda: out._facts(request, ex, route, RequestBody(request, rt.config.outbound.limits, 1.0), forwarded)),
        ("policy decide", lambda: rt.policy.decide(facts)),
        ("  override readings", lambda: NONE.alternatives(facts)),
        ("  decide, as the pipeline", lambda: rt.policy.decide(facts, *NONE.alternatives(facts))),
        ("credential cache hit", lambda: rt.credentials.cached(provider, creq)),
        ("outgoing headers", lambda: out._outbound_request(request, route, "00-x", forwarded)),
        ("credential apply", lambda: provider.apply(outgoing, credential)),
        ("response headers", lambda: clean_response_headers(response_headers)),
        ("event + emit", lambda: emit_event(ex.event(rt.agent))),
        ("record (metrics + event)", lambda: rt.recorder.record(ex)),
    ):
        timed(name, fn, n)
    await sidecar.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--gc" in args:
        i = args.index("--gc")
        gc.freeze()
        gc.set_threshold(int(args[i + 1]), 20, 20)
        del args[i:i + 2]
    asyncio.run(main(int(args[0]) if args else 20_000))
