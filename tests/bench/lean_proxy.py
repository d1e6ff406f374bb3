"""A second baseline for bench_proxy: the bare pass-through proxy on the sidecar's own forwarding leg.

Identical to ``bare_proxy.py`` except that requests go upstream through ``sidecar.forward.http11``
(the sidecar's kept-alive HTTP/1.1 client) instead of ``aiohttp.ClientSession``. Against it,
sidecar/lean is what the sidecar's own work costs (routing, policy, credentials, the event,
the metrics) over an equally lean forwarder; bare/lean is what the forwarding leg saves.

Run: ``python -m tests.bench.lean_proxy --listen 127.0.0.1:18082 --upstream http://127.0.0.1:18081``
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.config_model import Timeouts
from sidecar.forward.http11 import ConnectionPool, send
from tests.bench.bare_proxy import HOP_BY_HOP, _copy, main


class LeanProxy:
    """One connection pool, kept alive; every request passed through as it is."""

    def __init__(self, upstream: str) -> None:
        url = URL(upstream)
        self.pool = ConnectionPool(url.host or "127.0.0.1", url.port or 80, None, Timeouts())

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.pool.close()

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read() if request.body_exists else None
        headers = _copy(request.headers, HOP_BY_HOP)
        headers["Host"] = self.pool.host_header
        upstream = await send(self.pool, request.method, request.raw_path, headers, body)
        try:
            payload = await upstream.read()
        finally:
            upstream.release()
        out: CIMultiDict[str] = _copy(upstream.headers, HOP_BY_HOP | {"content-length"})
        return web.Response(status=upstream.status, reason=upstream.reason, headers=out, body=payload)


if __name__ == "__main__":
    main(LeanProxy, "lean_proxy", __doc__)
