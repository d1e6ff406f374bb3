"""Connections to upstreams, kept alive: one pool per upstream and one to the agent, each with its TLS
context built at start (CA files, our SVID); a ``ClientSession`` per upstream for WebSocket handshakes.
After an SVID rotation, mTLS upstreams get new connections while the ones in use finish.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Callable

import aiohttp
from yarl import URL

from sidecar.config_model import Config
from sidecar.forward.http11 import ConnectionPool
from sidecar.forward.websocket import websocket_session
from sidecar.http.tls import client_ssl_context

if TYPE_CHECKING:
    from sidecar.forward.http2 import AlpnPool, H2Pool


class Sessions:
    """Kept-alive connections per upstream and to the agent; a ClientSession per upstream for WebSockets."""

    def __init__(self, config: Config, svid_files: Callable[[], tuple[str, str] | None]) -> None:
        self._config = config
        self._svid_files = svid_files
        self._pools: dict[str, ConnectionPool | H2Pool | AlpnPool] = {}
        self._websockets: dict[str, aiohttp.ClientSession] = {}
        self._agent: ConnectionPool | H2Pool | AlpnPool | None = None
        self.agent_base_path = ""  # forward_to's path, before the caller's
        for name in config.outbound.upstreams:  # TLS contexts (CA files, our SVID) load now, not on a request
            self.get(name)
        if config.inbound is not None:
            self.agent()

    def get(self, name: str) -> ConnectionPool | H2Pool | AlpnPool:
        """The upstream's transport: HTTP/2 (``http2: true``, every gRPC upstream), the one ALPN chooses
        (``auto``), or HTTP/1.1."""
        pool = self._pools.get(name)
        if pool is None or pool.closed:
            up = self._config.outbound.upstreams[name]
            pool = self._pools[name] = pool_kind(up.http2)(up.host, up.port, self._ssl_context(name), up.timeouts)
        return pool

    def websocket(self, name: str) -> aiohttp.ClientSession:
        session = self._websockets.get(name)
        if session is None or session.closed:
            up = self._config.outbound.upstreams[name]
            session = self._websockets[name] = websocket_session(self.get(name).ssl, up.timeouts)  # built at start
        return session

    def _ssl_context(self, name: str, svid_files: tuple[str, str] | None = None) -> ssl.SSLContext | None:
        up = self._config.outbound.upstreams[name]
        if up.scheme != "https":
            return None
        cert_key = (svid_files or self._svid_files()) if up.client_cert == "svid" else None
        return client_ssl_context(str(up.ca) if up.ca else None, *(cert_key or (None, None)))

    def client_contexts(self, svid_files: tuple[str, str]) -> dict[str, ssl.SSLContext | None]:
        """The TLS context of each upstream that is shown our SVID, from these files. Touches no loop state:
        built in a worker thread on rotation (a context with the system trust store takes ~100 ms)."""
        return {name: self._ssl_context(name, svid_files)
                for name, up in self._config.outbound.upstreams.items() if up.client_cert == "svid"}

    def agent(self) -> ConnectionPool | H2Pool | AlpnPool:
        """The leg to the agent (``inbound.forward_to``): HTTP/1.1, or HTTP/2 as ``inbound.http2`` says
        (h2c to a gRPC agent on loopback)."""
        if self._agent is None or self._agent.closed:
            inbound = self._config.inbound
            assert inbound is not None
            url = URL(inbound.forward_to)
            ctx = client_ssl_context(None) if url.scheme == "https" else None
            self._agent = pool_kind(inbound.http2)(url.host or "127.0.0.1", url.port or 80, ctx, inbound.timeouts)
            self.agent_base_path = url.raw_path.rstrip("/")
        return self._agent

    def pooled(self) -> dict[str, tuple[int, int]]:
        """Each HTTP/1.1 pool's (open, idle) connections: the upstreams' by name, the agent's as ``agent``
        (an HTTP/2 pool holds one multiplexed connection and is not counted)."""
        pools = {**self._pools, **({"agent": self._agent} if self._agent is not None else {})}
        return {name: pool.counts for name, pool in pools.items() if isinstance(pool, ConnectionPool)}

    def renew_client_certs(self, contexts: dict[str, ssl.SSLContext | None]) -> None:
        """After an SVID rotation: new connections for mTLS upstreams; the ones in use finish, then close."""
        loop = asyncio.get_running_loop()
        for name, context in contexts.items():
            pool, session = self._pools.get(name), self._websockets.pop(name, None)
            if pool is not None:
                pool.renew(context)
            if session is not None:
                loop.call_later(self._config.drain, asyncio.ensure_future, session.close())

    async def aclose(self) -> None:
        for pool in (*self._pools.values(), self._agent):
            if pool is not None:
                pool.close()
        for session in self._websockets.values():
            await session.close()


def pool_kind(http2: bool | str) -> type[ConnectionPool | H2Pool | AlpnPool]:
    """The pool for an ``http2`` setting; ``h2`` is imported only for an HTTP/2 (or ``auto``) leg."""
    if not http2:
        return ConnectionPool
    from sidecar.forward.http2 import AlpnPool, H2Pool
    return AlpnPool if http2 == "auto" else H2Pool
