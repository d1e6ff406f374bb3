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
from typing import Callable, Protocol

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


class Proxy(Protocol):
    async def start(self) -> None: ...
    async def handle(self, request: web.BaseRequest) -> web.Response: ...
    async def close(self) -> None: ...


async def serve(proxy: Proxy, name: str, host: str, port: int, upstream: str) -> None:
    """Run ``proxy`` on aiohttp's low-level server until SIGTERM or SIGINT."""
    await proxy.start()
    server = web.Server(proxy.handle, access_log=None, auto_decompress=False)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=512, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name}: listening on {host}:{port} -> {upstream}", flush=True)
    await stop.wait()
    listener.close()
    await server.shutdown(1.0)
    await proxy.close()


def main(make: Callable[[str], Proxy] = BareProxy, name: str = "bare_proxy", doc: str = __doc__) -> None:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:18080")
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:18081")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run
    run(serve(make(args.upstream), name, host, int(port), args.upstream))


if __name__ == "__main__":
    main()
