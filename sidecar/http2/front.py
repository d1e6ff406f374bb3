"""A listener's HTTP/2 side as the listener holds it, from start: :class:`H2Server` (the handler, its
limits and bounds, the connections open and the requests in flight), importing no ``h2``.

``h2`` (and ``hpack``, ``hyperframe``) load with the first HTTP/2 connection, when :class:`H2Server`
builds its :class:`~sidecar.http2.server.H2Protocol` (through ``protocol``,
:func:`~sidecar.http2.listen.h2_protocol` on the listeners): a sidecar whose callers all speak
HTTP/1.1 starts without them (issue 16, start to ready).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from sidecar.config_model import Limits
from sidecar.errors import Refusal
from sidecar.http.incoming import Answer, IncomingRequest
from sidecar.server import overloaded

WINDOW_STALL = 60.0  # seconds a response may wait on a client's closed flow-control window

Handler = Callable[[IncomingRequest], Awaitable[Answer]]
RefusalHook = Callable[[Refusal], None]
LostHook = Callable[[asyncio.BaseTransport], None]
AbuseHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Bounds:
    """Per connection, per ``window`` seconds: the most frames of each kind a client may send
    (:mod:`~sidecar.http2.guard` counts them)."""

    window: float = 10.0
    resets: int = 200
    settings: int = 100
    pings: int = 1000
    control: int = 1000


class H2Connection(asyncio.Protocol):
    """What every HTTP/2 connection of a listener is (:class:`~sidecar.http2.server.H2Protocol`), as its
    :class:`H2Server` sees it, so that a protocol can be told HTTP/2 without importing ``h2``."""

    source: str

    def go_away(self) -> None:
        raise NotImplementedError

    async def drained(self, timeout: float | None) -> None:
        raise NotImplementedError


class H2Server:
    """A listener's HTTP/2 side: the handler, its limits, its connections and requests in flight."""

    def __init__(self, handler: Handler, *, protocol: Callable[[H2Server], H2Connection], limits: Limits,
                 on_refusal: RefusalHook | None = None,
                 on_lost: LostHook | None = None, on_abuse: AbuseHook | None = None, bounds: Bounds = Bounds(),
                 stall: float = WINDOW_STALL, idle: float | None = None) -> None:
        self.handler, self.limits, self.on_refusal, self.on_lost = handler, limits, on_refusal, on_lost
        self.on_abuse, self.bounds, self.stall, self.idle = on_abuse, bounds, stall, idle
        self.protocol = protocol  # one connection's protocol: ``listen.h2_protocol`` loads h2 on its first call
        self.connections: set[H2Connection] = set()
        self.in_flight = 0

    def __call__(self) -> H2Connection:
        return self.protocol(self)

    def admit(self, source: str) -> Refusal | None:
        """A new connection's admission, HTTP/1.1's caps for HTTP/2 connections (reported here): past
        ``max_connections`` open, or ``max_connections_per_source`` from one address, ``overloaded``."""
        limits = self.limits
        refusal = None
        if len(self.connections) >= limits.max_connections:
            refusal = overloaded(f"{limits.max_connections} HTTP/2 connections are open on this listener")
        elif limits.max_connections_per_source is not None and \
                sum(c.source == source for c in self.connections) >= limits.max_connections_per_source:
            refusal = overloaded(f"{limits.max_connections_per_source} HTTP/2 connections from {source} are open")
        if refusal is not None:
            self.refused(refusal)
        return refusal

    def refused(self, refusal: Refusal) -> None:
        """A refusal made outside any exchange: reported to the listener (an event, the metrics)."""
        if self.on_refusal is not None:
            self.on_refusal(refusal)

    def abused(self, kind: str) -> None:
        """A bound of :mod:`~sidecar.http2.guard` held against a client: counted by kind."""
        if self.on_abuse is not None:
            self.on_abuse(kind)

    def pre_shutdown(self) -> None:
        """Draining: every connection is told (GOAWAY) to open no new stream; open ones finish."""
        for connection in self.connections:
            connection.go_away()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(c.drained(timeout) for c in list(self.connections)))
