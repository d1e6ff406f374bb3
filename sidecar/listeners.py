"""The listeners that carry exchanges (outbound, CONNECT, inbound), stopped as one.

``shutdown.drain`` bounds the whole stop, not each listener's: all stop accepting at once, are
drained together, and what still runs when the drain is over is cut (aiohttp would otherwise
wait as long again for each server).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol



class Closable(Protocol):
    """A listening socket: close() stops accepting."""

    def close(self) -> None: ...


class Drainable(Protocol):
    """A server of exchanges (aiohttp's, or HTTP/2's): told to stop, then given the drain to finish."""

    def pre_shutdown(self) -> None: ...

    async def shutdown(self, timeout: float | None = None) -> None: ...


@dataclass
class ExchangeListeners:
    """The listeners that carry exchanges (outbound, CONNECT, inbound), stopped as one: stop accepting on
    all, drain them together for ``drain`` seconds, cut what outlives the drain, then close the rest."""

    drain: float
    cut: Callable[[], None]  # ends the exchanges still running when the drain is over
    accepting: list[Closable] = field(default_factory=list)
    servers: list[Drainable] = field(default_factory=list)
    after_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # the mTLS lobby

    async def aclose(self) -> None:
        for listener in self.accepting:
            listener.close()
        await self._drain()
        for close in self.after_drain:
            await close()

    async def _drain(self) -> None:
        """Idle keep-alive connections close now; busy ones get the drain, then are cut."""
        for server in self.servers:
            server.pre_shutdown()
        shutdowns = asyncio.gather(*(s.shutdown(self.drain) for s in self.servers), return_exceptions=True)
        done, _ = await asyncio.wait({shutdowns}, timeout=self.drain)
        if not done:
            self.cut()
        await shutdowns
