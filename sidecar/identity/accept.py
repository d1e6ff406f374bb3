"""Inbound TCP before TLS: the listening sockets, and the lobby where connections wait to speak.

A connection costs the sidecar CPU only once it sends a ClientHello: until then it holds a file
descriptor and nothing else, and it waits here, not in one of the acceptor's handshake slots. A
caller that connects and stays silent (a scanner, a slowloris, or a flood of them on a listener
bound to ``0.0.0.0``) therefore never delays a real caller's handshake.

    accept ─ lobby (no byte read; readable? first byte peeked) ─┬─ 0x16: admit(sock) → TLS handshake
                                                              ├─ other bytes: plain-text refusal, close
                                                              ├─ closed without a byte: close, quietly
                                                              └─ silent past the timeout, or evicted: dismiss

The lobby is bounded per source address and in all. When either bound is reached the *oldest*
waiting connection is evicted, never the newcomer: a real caller sends its ClientHello within
a round trip of connecting, so it leaves the lobby long before a flood from its own address could
push it out, while the flood only ever evicts itself. The per-source bound spares connections
younger than ``YOUNG``: a client that opens a pool of hundreds at once connects them all before it
says a word on any, and such a burst is bounded by the lobby's total instead. A connection about to
be evicted whose bytes have in fact arrived is admitted instead.

Nothing is read from a socket here (the first byte is peeked): the TLS layer gets the whole
ClientHello on every event loop. (Reading through a protocol that paused in ``connection_made``
loses it on uvloop, which still delivers the first bytes there.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from typing import Any
from dataclasses import dataclass

import structlog

from sidecar.errors import refusal_response

log = structlog.get_logger("sidecar.identity.accept")

MAX_WAITING = 4096  # connections that have not yet sent a byte, from all sources
MAX_WAITING_PER_SOURCE = 512  # of those, from one source address, once they are no longer young
YOUNG = 1.0  # seconds: a connection this new may still be on its way to speaking (a client opening a pool)
ACCEPT_BATCH = 64  # accepts per readiness callback: a burst is taken without starving the loop
ACCEPT_PAUSE = 0.1  # seconds without accepting after EMFILE/ENFILE/ENOBUFS (as asyncio's own servers)
PLAIN_DRAIN = 64 * 1024  # what is read (and dropped) of a plain-text request before answering it
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello (RFC 8446 §5.1)

Arrive = Callable[[socket.socket, str], None]
"""``arrive(sock, address)``: a freshly accepted, non-blocking socket and its printable peer address."""


def format_address(address: object) -> str:
    """``host:port``, IPv6 hosts bracketed; ``unknown`` for what has no (host, port)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return "unknown"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def source_of(address: str) -> str:
    """The host part of a formatted address: what the per-source bound counts by."""
    return address.rpartition(":")[0] or address


class Listener:
    """Listening sockets whose accepted connections are handed to ``arrive``, unread."""

    def __init__(self, sockets: list[socket.socket], arrive: Arrive) -> None:
        self.sockets = sockets
        self._arrive = arrive
        self._loop = asyncio.get_running_loop()
        self._closed = False
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    @classmethod
    def bind(cls, host: str, port: int, arrive: Arrive, *, backlog: int = 512) -> Listener:
        """Bind every address ``host`` names (IPv6 sockets v6-only, as asyncio does), all on one port."""
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                if sockets and port == 0:  # port 0: the later sockets take the port the first was given
                    address = (address[0], sockets[0].getsockname()[1], *address[2:])
                sockets.append(_listening_socket(family, kind, proto, address, backlog))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, arrive)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _ready(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or buffers: stop a moment instead of spinning
                log.warning("accept_failed", error_type=type(exc).__name__, errno=exc.errno,
                            message=f"mtls: accept failed; not accepting for {ACCEPT_PAUSE:g}s")
                self._pause(listening)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arrive(sock, format_address(address))

    def _pause(self, listening: socket.socket) -> None:
        self._loop.remove_reader(listening.fileno())
        self._loop.call_later(ACCEPT_PAUSE, self._resume, listening)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listening.fileno(), self._ready, listening)


def _listening_socket(family: int, kind: int, proto: int, address: tuple[Any, ...],
                      backlog: int) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Waiting:
    address: str
    source: str
    timer: asyncio.TimerHandle
    since: float  # loop time of arrival


class Lobby:
    """Accepted connections waiting for their first byte; each is admitted, refused or dismissed once."""

    def __init__(self, admit: Arrive, dismiss: Callable[[str, str], None], *, timeout: float,
                 limit: int = MAX_WAITING, per_source: int = MAX_WAITING_PER_SOURCE, young: float = YOUNG) -> None:
        self._admit = admit
        self._dismiss = dismiss  # (address, message): a connection closed before its handshake
        self._timeout = timeout
        self._limit = max(1, limit)
        self._per_source = max(1, per_source)
        self._young = young
        self._waiting: dict[socket.socket, _Waiting] = {}  # insertion order: the oldest first
        self._by_source: dict[str, dict[socket.socket, None]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def arrive(self, sock: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        source = source_of(address)
        crowd = self._by_source.setdefault(source, {})
        if len(crowd) >= self._per_source and loop.time() - self._waiting[next(iter(crowd))].since >= self._young:
            self._make_room(crowd, f"mtls: more than {self._per_source} connections from {source} were "
                                   "waiting for a tls clienthello; the oldest was closed")
        if len(self._waiting) >= self._limit:
            self._make_room(self._waiting, f"mtls: more than {self._limit} connections were waiting for a "
                                           "tls clienthello; the oldest was closed")
        timer = loop.call_later(self._timeout, self._expire, sock)
        self._waiting[sock] = _Waiting(address, source, timer, loop.time())
        self._by_source.setdefault(source, {})[sock] = None
        loop.add_reader(sock.fileno(), self._stirred, sock)

    def close(self) -> None:
        for sock in list(self._waiting):
            self._leave(sock)
            sock.close()

    def _leave(self, sock: socket.socket) -> _Waiting:
        waiting = self._waiting.pop(sock)
        crowd = self._by_source[waiting.source]
        del crowd[sock]
        if not crowd:
            del self._by_source[waiting.source]
        waiting.timer.cancel()
        asyncio.get_running_loop().remove_reader(sock.fileno())
        return waiting

    def _stirred(self, sock: socket.socket) -> None:
        """Readable: peek at the first byte (nothing is consumed) and decide."""
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # a spurious wake-up: keep waiting
        except OSError:
            first = b""  # reset before a word was said
        waiting = self._leave(sock)
        if not first:
            sock.close()  # connected and closed without a byte (a TCP probe): nothing to refuse
        elif first[0] != TLS_HANDSHAKE_RECORD:
            self._refuse_plain(sock, waiting.address)
        else:
            self._admit(sock, waiting.address)

    def _refuse_plain(self, sock: socket.socket, address: str) -> None:
        """Plain text on the mTLS port (HTTP most likely): one JSON answer that says so, then close."""
        message = ("mtls: tls handshake failed (expected a tls clienthello; got plain text: this listener "
                   "speaks https with client certificates)")
        try:
            sock.recv(PLAIN_DRAIN)  # unread bytes at close would reset the connection before our answer
            sock.send(refusal_response("bad_request", message))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone or not reading: closing is the answer then
        sock.close()
        self._dismiss(address, message)

    def _expire(self, sock: socket.socket) -> None:
        waiting = self._leave(sock)
        sock.close()
        self._dismiss(waiting.address, f"mtls: no tls clienthello arrived within {self._timeout:g}s")

    def _make_room(self, waiting: Mapping[socket.socket, object], message: str) -> None:
        """Take the oldest out of ``waiting``: admitted if its bytes are already there (a burst can arrive
        faster than readiness is reported), else evicted."""
        oldest = next(iter(waiting))
        self._stirred(oldest)
        if oldest in self._waiting:  # still silent
            self._evict(oldest, message)

    def _evict(self, sock: socket.socket, message: str) -> None:
        waiting = self._leave(sock)
        sock.close()
        self._dismiss(waiting.address, message)
