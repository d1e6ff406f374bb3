"""Which protocol a new connection speaks: HTTP/1.1 as ever, HTTP/2 when it says so.

- Plaintext (the loopback outbound listener): h2c with prior knowledge. :class:`H2cSniffer` is the
  HTTP/1.1 protocol (admitted, counted and limited exactly as before) that looks at the first bytes:
  a connection opening with HTTP/2's preface (``PRI * HTTP/2.0``, RFC 9113 §3.4) is handed, preface
  and all, to the listener's :class:`~sidecar.http2.server.H2Server`; anything else is parsed as
  HTTP/1.1 from its first byte. No ``Upgrade: h2c`` (RFC 9113 removed it).
- TLS (the inbound mTLS listener): the server context offers ALPN ``h2`` and ``http/1.1``;
  :class:`AlpnChoice` gives a verified TLS transport to the protocol its handshake chose.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable

from aiohttp.web_protocol import RequestHandler

from sidecar.http2.front import H2Connection, H2Server
from sidecar.server import SafeRequestHandler, SidecarServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_protocol(server: H2Server) -> H2Connection:
    """One HTTP/2 connection's protocol for ``server`` (its ``protocol``): ``h2`` is imported here, with the
    first HTTP/2 connection, not when a listener that could take one starts."""
    from sidecar.http2.server import H2Protocol
    return H2Protocol(server)


def sniff(seen: bytes) -> bool | None:
    """True: HTTP/2's preface; False: anything else; None: too few bytes yet to tell."""
    if not PREFACE.startswith(seen[: len(PREFACE)]):
        return False
    return True if len(seen) >= len(PREFACE) else None


class H2cSniffer(SafeRequestHandler):
    """aiohttp's HTTP/1.1 protocol until the first bytes say HTTP/2; then ``h2`` takes the connection."""

    _seen = b""
    _decided = False

    def data_received(self, data: bytes) -> None:
        if self._decided or self._refused:
            super().data_received(data)
            return
        seen = self._seen + data
        verdict = sniff(seen)
        if verdict is None:
            self._seen = seen
            return
        self._decided, self._seen = True, b""
        if verdict:
            self._hand_over(seen)
        else:
            super().data_received(seen)

    def _hand_over(self, seen: bytes) -> None:
        """Leave the connection to HTTP/2: aiohttp forgets it without closing it."""
        transport, server = self.transport, self._manager
        assert transport is not None and isinstance(server, H2cServer)
        self.transport = None  # aiohttp's connection_lost would close it otherwise
        protocol = server.http2()
        transport.set_protocol(protocol)  # first: the server told of this protocol's end sees the transport go on
        super().connection_lost(None)
        protocol.connection_made(transport)
        protocol.data_received(seen)


class H2cServer(SidecarServer):
    """A :class:`~sidecar.server.SidecarServer` whose connections may also speak h2c (prior knowledge)."""

    def __init__(self, handler: Any, *, http2: H2Server, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.http2 = http2

    def __call__(self) -> RequestHandler:
        return H2cSniffer(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        self.http2.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(super().shutdown(timeout), self.http2.shutdown(timeout))


class AlpnChoice(asyncio.Protocol):
    """Hands a TLS transport to the protocol its ALPN chose (``h2``, else HTTP/1.1); relays what it
    was fed before that (the acceptor replays bytes that arrived during peer verification)."""

    def __init__(self, http1: Callable[[], asyncio.Protocol], http2: Callable[[], asyncio.Protocol]) -> None:
        self._http1, self._http2 = http1, http2
        self._chosen: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        chosen = self._chosen = self._http2() if alpn == "h2" else self._http1()
        transport.set_protocol(chosen)
        chosen.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self._chosen is not None
        self._chosen.data_received(data)

    def eof_received(self) -> bool | None:
        return self._chosen.eof_received() if self._chosen is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._chosen is not None:
            self._chosen.connection_lost(exc)


def offering_h2(context: Callable[[], ssl.SSLContext]) -> Callable[[], ssl.SSLContext]:
    """The inbound listener's current TLS context, offering ``h2`` and ``http/1.1`` by ALPN: set once per
    context (a reload builds a new one), not on every handshake."""
    offered: list[ssl.SSLContext] = []  # the last context set (a strong reference: it is the current one)

    def current() -> ssl.SSLContext:
        tls = context()
        if not offered or offered[0] is not tls:
            tls.set_alpn_protocols(["h2", "http/1.1"])
            offered[:] = [tls]
        return tls

    return current
