"""A second baseline for bench_proxy: the bare pass-through proxy on the sidecar's own forwarding leg.

Identical to ``bare_proxy.py`` except that requests go upstream through ``sidecar.upstream``
(the sidecar's kept-alive HTTP/1.1 client) instead of ``aiohttp.ClientSession``. Against it,
sidecar/lean is what the sidecar's own work costs (routing, policy, credentials, the event,
the metrics) over an equally lean forwarder; bare/lean is what the forwarding leg saves.

Run: ``python -m tests.bench.lean_proxy --listen 127.0.0.1:18082 --upstream http://127.0.0.1:18081``
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.config_model import Timeouts
from sidecar.upstream import ConnectionPool, send
from tests.bench.bare_proxy import HOP_BY_HOP, _copy


class LeanProxy:
    """One connection pool, kept alive; every request passed through as it is."""

    def __init__(self, upstream: str) -> None:
        url = URL(upstream)
        self.pool = ConnectionPool(url.host or "127.0.0.1", url.port or 80, None, Timeouts())

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


async def serve(host: str, port: int, upstream: str) -> None:
    proxy = LeanProxy(upstream)
    server = web.Server(proxy.handle, access_log=None, auto_decompress=False)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=512, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"lean_proxy: listening on {host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    listener.close()
    await server.shutdown(1.0)
    proxy.pool.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:18082", help="HOST:PORT to listen on")
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:18081")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run
    run(serve(host, int(port), args.upstream))


if __name__ == "__main__":
    main()
