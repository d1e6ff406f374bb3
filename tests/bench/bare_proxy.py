"""The baseline for bench_proxy: a bare aiohttp pass-through proxy, and nothing else.

aiohttp's low-level server in front of one kept-alive ``ClientSession``; each request is sent
on to the upstream with its method, path, headers (hop-by-hop removed) and body, and the
upstream's status, headers and body are copied back. No routing, policy, credentials, logging
or metrics: whatever the sidecar costs above this is the sidecar's own.

Run: ``python -m tests.bench.bare_proxy --listen 127.0.0.1:18080 --upstream http://127.0.0.1:18081``
(bench_proxy starts and stops it; uvloop is used when installed). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"})


def _copy(headers: object, drop: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)  # type: ignore[attr-defined]


class BareProxy:
    """One ClientSession, kept alive; every request passed through as it is."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60.0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                                             cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        assert self.session is not None
        body = await request.read() if request.body_exists else None
        async with self.session.request(request.method, self.upstream + request.raw_path,
                                        headers=_copy(request.headers, HOP_BY_HOP), data=body,
                                        allow_redirects=False) as upstream:
            payload = await upstream.read()
            headers = _copy(upstream.headers, HOP_BY_HOP | {"content-length"})
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=payload)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def serve(host: str, port: int, upstream: str) -> None:
    proxy = BareProxy(upstream)
    await proxy.start()
    server = web.Server(proxy.handle, access_log=None, auto_decompress=False)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=512, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare_proxy: listening on {host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    listener.close()
    await server.shutdown(1.0)
    await proxy.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:18080", help="HOST:PORT to listen on")
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
