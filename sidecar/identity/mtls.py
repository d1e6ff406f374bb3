"""The inbound mTLS acceptor: TLS on accepted TCP, one peer verification, then the HTTP protocol.

Why not ``create_server(ssl=...)``: a listening ``SSLContext`` is fixed when the server is
created, and asyncio reports server-side handshake failures only in debug mode. Instead the
listener accepts plain TCP, waits (in the lobby) until the connection has sent its first bytes, and
then runs TLS on the accepted socket with ``loop.connect_accepted_socket`` and the context current
at that moment, so SVID and bundle rotation applies to every new handshake while established
connections keep the context they were made with. Nothing is read before TLS takes the socket, so
the ClientHello cannot be lost on the way (it was, under uvloop, when the first bytes reached a
protocol that had asked to pause).

Python's ``ssl`` has no verification callback, so the client certificate is requested with
``CERT_OPTIONAL`` (a missing certificate is reported as ``no_client_cert`` rather than as an
opaque alert) and OpenSSL verifies a presented chain against the union of all bundles, but not its
dates (``X509_V_FLAG_NO_CHECK_TIME``, ``sidecar.http.tls``): those are judged below, so an expired or not
yet valid caller is answered 401 after a completed handshake rather than closed on (a TLS 1.3 client has
sent its request by then). A chain OpenSSL cannot verify aborts the handshake; its verify code is mapped to
``expired``, ``not_yet_valid`` or ``peer_unverified``. A chain it accepts is then verified again
by :func:`sidecar.identity.x509.verify_peer` against the bundle of the leaf's own trust domain
only, which is the check that binds bundles to domains.

A caller may resume its TLS session (tickets, ``sidecar.http.tls``): it is verified all the same,
its leaf coming from the session and its intermediates from those it presented at its last full
handshake (``VerifiedPeers``, which also spares a caller that comes back the
verification while nothing it depends on has changed).

    accept TCP ─ lobby (sidecar.identity.accept: until the ClientHello, no slot held)
      ─ (slot, timeout) TLS on the accepted socket (current context) ─ verify_peer
      ├─ refused: on_reject(reason, message, peer); a 401/403 JSON response; close (nothing parsed)
      └─ accepted: peer recorded for peer_of(transport); handler protocol attached to the TLS transport

Refusal reasons passed to ``on_reject`` are :data:`REJECT_REASONS`: those of ``PeerRejected`` plus
``handshake_failed`` (wrong protocol, TLS alert, timeout, slot wait exceeded).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from _ssl import ENCODING_DER  # CPython's; ssl.SSLObject of 3.11 has no public chain accessor
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from sidecar.errors import Refusal, refusal_response
from sidecar.identity.accept import MAX_WAITING, MAX_WAITING_PER_SOURCE, YOUNG, Listener, Lobby
from sidecar.identity.x509 import (
    PEER_REJECT_REASONS,
    PeerIdentity,
    PeerRejected,
    TrustBundles,
    verify_peer,
)

REJECT_REASONS = PEER_REJECT_REASONS | {"handshake_failed"}

# Handshakes in progress at once. A handshake is CPU-bound (about 1-2 ms of one core each, PERFORMANCE.md):
# more at once buys no throughput, only a longer loop iteration in a burst, which every request and the
# health endpoint then wait out. 16 kept /readyz near 100 ms under a burst of 200 new mTLS callers.
MAX_HANDSHAKES = 16

RejectHook = Callable[[str, str, str], None]
"""``on_reject(reason, message, peer_address)``; must not raise."""

# OpenSSL X509_V_ERR_* codes that have their own reason; every other verify code is peer_unverified.
_VERIFY_CODE_REASON = {9: "not_yet_valid", 10: "expired"}


class MtlsAcceptor:
    """Accepts TCP, waits for a ClientHello, upgrades to TLS, verifies the peer, hands over."""

    def __init__(
        self,
        *,
        context: Callable[[], ssl.SSLContext],
        bundles: Callable[[], TrustBundles],
        allowed_domains: frozenset[str],
        handler_factory: Callable[[], asyncio.BaseProtocol],
        on_reject: RejectHook,
        handshake_timeout: float = 10.0,
        max_handshakes: int = MAX_HANDSHAKES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        respond_on_reject: bool = True,
        refusal_grace: float = 1.0,
        hello_timeout: float | None = None,
        max_waiting: int = MAX_WAITING,
        max_waiting_per_source: int = MAX_WAITING_PER_SOURCE,
        waiting_young: float = YOUNG,
    ) -> None:
        self._context = context
        self._bundles = bundles
        self._allowed = frozenset(allowed_domains)
        self._handler_factory = handler_factory
        self._on_reject = on_reject
        self._handshake_timeout = handshake_timeout
        self._slots = asyncio.Semaphore(max_handshakes)
        self._clock = clock
        self._respond = respond_on_reject
        self._refusal_grace = refusal_grace
        self._peers = _PeerTable()
        self._verified = VerifiedPeers()
        self._pending: set[asyncio.Task[None]] = set()
        self._lobby = Lobby(self._admitted, self._dismissed, timeout=hello_timeout or handshake_timeout,
                            limit=max_waiting, per_source=max_waiting_per_source, young=waiting_young)
        self._listener: Listener | None = None

    async def start(self, host: str, port: int) -> Listener:
        """Listen on ``host:port`` (port 0 picks one; read it from the returned listener's sockets)."""
        self._listener = Listener.bind(host, port, self._lobby.arrive)
        return self._listener

    async def close(self) -> None:
        """Stop accepting and drop waiting connections and handshakes in progress.

        Established connections belong to the handler (aiohttp: ``web.Server.shutdown()``).
        """
        if self._listener is not None:
            self._listener.close()
        self._lobby.close()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def peer_of(self, connection: object) -> PeerIdentity | None:
        """The verified peer of an accepted TLS transport (``IncomingRequest.connection``)."""
        return self._peers.get(connection)

    def _dismissed(self, address: str, message: str) -> None:
        self._on_reject("handshake_failed", message, address)

    def _admitted(self, sock: socket.socket, address: str) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(sock, address))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _accept(self, sock: socket.socket, address: str) -> None:
        holding = Holding()
        try:
            tls = await self._handshake(sock, holding)
        except _HandshakeFailed as failed:
            sock.close()
            self._on_reject(failed.reason, failed.message, address)
            return
        except BaseException:  # cancelled by close(), or a broken context callable: fail closed
            sock.close()
            raise
        try:
            peer = self._verify(tls)
            protocol = self._handler_factory()
        except PeerRejected as rejected:
            await self._refuse(tls, holding, rejected, address)
            return
        except BaseException:
            tls.abort()
            raise
        self._peers.add(tls, peer)
        hand_over(tls, holding, protocol)

    async def _handshake(self, sock: socket.socket, holding: Holding) -> asyncio.Transport:
        """TLS over the accepted socket, with at most ``max_handshakes`` running at once.

        Nothing was read from the socket before (the lobby only waited for it to be readable), so
        the ClientHello is all there for the TLS layer, on every event loop.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._handshake_timeout):
                async with self._slots:
                    tls, _ = await loop.connect_accepted_socket(
                        lambda: holding,
                        sock,
                        ssl=self._context(),
                        ssl_handshake_timeout=self._handshake_timeout,
                        ssl_shutdown_timeout=self._handshake_timeout,  # bounds a refused peer's close
                    )
        except TimeoutError:
            raise _HandshakeFailed(
                "handshake_failed",
                f"mtls: tls handshake did not complete within {self._handshake_timeout:g}s",
            ) from None
        except (OSError, EOFError) as exc:
            raise _handshake_error(exc) from None
        if tls is None or tls.is_closing():  # the peer closed the connection during the handshake
            raise _HandshakeFailed("handshake_failed", "mtls: peer closed during the tls handshake")
        return tls

    def _verify(self, tls: asyncio.Transport) -> PeerIdentity:
        """The peer of every connection, resumed or not (a ticket proves nothing: see ``VerifiedPeers``)."""
        ssl_object = tls.get_extra_info("ssl_object")
        leaf = ssl_object.getpeercert(binary_form=True)
        chain = _intermediates(ssl_object, leaf)
        return self._verified.verify(leaf, chain, ssl_object.session_reused, self._bundles(), self._allowed,
                                     self._clock())

    async def _refuse(
        self, tls: asyncio.Transport, holding: Holding, rejected: PeerRejected, address: str
    ) -> None:
        """Report, answer with the refusal and close; the peer's bytes are dropped unparsed.

        A TLS 1.2 client sends its request only after the handshake: the answer waits for its
        first bytes (at most ``refusal_grace``) so that the client is reading when it arrives.
        """
        handed = False
        try:
            self._on_reject(rejected.reason, rejected.message, address)
        finally:
            try:
                if self._respond and await holding.wait_for_bytes(self._refusal_grace):
                    handed = answer_refusal(tls, holding, rejected)
            finally:
                if not handed:
                    tls.close()


class _HandshakeFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _handshake_error(exc: BaseException) -> _HandshakeFailed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_CODE_REASON.get(exc.verify_code, "peer_unverified")
        return _HandshakeFailed(
            reason, f"mtls: peer certificate chain refused by tls: {exc.verify_message}"
        )
    detail = getattr(exc, "reason", None) or type(exc).__name__
    return _HandshakeFailed("handshake_failed", f"mtls: tls handshake failed ({detail})")


def _intermediates(ssl_object: ssl.SSLObject, leaf: bytes | None) -> list[bytes]:
    """The peer's intermediates as DER, through CPython 3.11's private chain accessor if present."""
    if leaf is None:
        return []
    sslobj = getattr(ssl_object, "_sslobj", None)
    get_chain = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        sslobj, "get_unverified_chain", None
    )
    if get_chain is None:
        return []
    chain = [_der(cert) for cert in get_chain() or ()]
    return [der for der in chain if der != leaf]


def _der(cert: object) -> bytes:
    if isinstance(cert, bytes):
        return cert
    der: bytes = cert.public_bytes(ENCODING_DER)  # type: ignore[attr-defined]  # ssl's private certificate type
    return der


def answer_refusal(tls: asyncio.Transport, holding: Holding, rejected: PeerRejected) -> bool:
    """Write the refusal; over ``h2`` (ALPN) an HTTP/2 protocol answers it and closes (True: handed over)."""
    ssl_object = tls.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
        tls.write(refusal_response(rejected.request_reason, rejected.message))
        return False
    from sidecar.http2.server import refusing  # h2 loads with the first HTTP/2 connection
    hand_over(tls, holding, refusing(Refusal(rejected.request_reason, rejected.message)))
    return True


def hand_over(tls: asyncio.Transport, holding: Holding, protocol: asyncio.BaseProtocol) -> None:
    """Attach ``protocol`` to the TLS transport and replay what arrived while we verified."""
    tls.set_protocol(protocol)
    protocol.connection_made(tls)
    for chunk in holding.received:
        _feed(protocol, chunk)
    if holding.eof:
        protocol.eof_received()  # type: ignore[attr-defined]
    if holding.lost:
        protocol.connection_lost(holding.error)  # type: ignore[arg-type]  # asyncio's own typeshed is narrower


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


class Holding(asyncio.Protocol):
    """The TLS transport's protocol until the peer is verified: keeps, never parses, what arrives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self._stirred = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self._stirred.set()

    def eof_received(self) -> None:
        self.eof = True  # over TLS the transport closes after this whatever we return
        self._stirred.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.error = exc
        self._stirred.set()

    async def wait_for_bytes(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for the peer to send or close; True if it is still open."""
        try:
            async with asyncio.timeout(grace):
                await self._stirred.wait()
        except TimeoutError:
            pass  # a silent peer is answered anyway
        return not (self.lost or self.eof)


@dataclass(frozen=True, slots=True)
class _Verdict:
    """A leaf that verified against ``bundles``, with the intermediates it presented, while all are valid."""

    peer: PeerIdentity
    chain: list[bytes]
    bundles: TrustBundles
    valid_from: datetime
    valid_until: datetime


class VerifiedPeers:
    """``verify_peer`` for each connection, remembered per leaf (DER) for callers that come back.

    A caller that reconnects presents the same leaf: while the bundles in force are the very object
    it verified against, and the clock is within the validity of its leaf and intermediates and at
    most ``ttl`` after that verification, the same verdict holds (the checks depend on nothing else;
    the allowed trust domains are the acceptor's own). Verification is a few hundred µs of Python per
    connection, about a sixth of a resumed connection's whole cost (issue 16 item 3).

    A resumed TLS session (a ticket of the current context) restores the caller's leaf but not the
    intermediates it sent: the leaf is verified with the intermediates it presented before, only hints
    for that verification. A leaf that needs them and was forgotten (more than ``limit`` callers since)
    is refused ``peer_unverified`` and verifies on its next, full, handshake."""

    def __init__(self, limit: int = 1024, ttl: timedelta = timedelta(seconds=60)) -> None:
        self._known: dict[bytes, _Verdict] = {}
        self._limit, self._ttl = limit, ttl

    def verify(self, leaf: bytes | None, chain: list[bytes], resumed: bool, bundles: TrustBundles,
               allowed: frozenset[str], now: datetime) -> PeerIdentity:
        known = self._known.get(leaf) if leaf is not None else None
        if known is not None and known.bundles is bundles and known.valid_from <= now < known.valid_until:
            return known.peer
        if resumed and not chain and known is not None:
            chain = known.chain
        peer = verify_peer(leaf, chain, bundles, allowed, now)
        if leaf is not None:
            self._remember(leaf, _Verdict(peer, chain, bundles, *_validity(leaf, chain, now, self._ttl)))
        return peer

    def _remember(self, leaf: bytes, verdict: _Verdict) -> None:
        self._known.pop(leaf, None)
        if len(self._known) >= self._limit:
            del self._known[next(iter(self._known))]  # the oldest
        self._known[leaf] = verdict


def _validity(leaf: bytes, chain: list[bytes], now: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
    """When a verdict on ``leaf`` (and ``chain``) holds: every certificate valid, and at most ``ttl`` on."""
    certs = [x509.load_der_x509_certificate(der) for der in (leaf, *chain)]
    return max(c.not_valid_before_utc for c in certs), min([now + ttl, *(c.not_valid_after_utc for c in certs)])


class _PeerTable:
    """Verified peers by TLS transport. Some transports (uvloop's) take no weak references, so
    entries of closed transports are pruned on insertion, amortized O(1)."""

    def __init__(self) -> None:
        self._peers: dict[asyncio.BaseTransport, PeerIdentity] = {}
        self._prune_at = 64

    def add(self, transport: asyncio.BaseTransport, peer: PeerIdentity) -> None:
        if len(self._peers) >= self._prune_at:
            self._peers = {t: p for t, p in self._peers.items() if not t.is_closing()}
            self._prune_at = max(64, 2 * len(self._peers))
        self._peers[transport] = peer

    def get(self, connection: object) -> PeerIdentity | None:
        """The peer of a transport (anything else, e.g. a connection that is not TLS: None)."""
        peer: PeerIdentity | None = self._peers.get(connection)  # type: ignore[call-overload]  # a miss for any other key
        return peer
