"""The inbound mTLS acceptor: real handshakes on 127.0.0.1 with real certificates and clients.

Clients are Python's ssl (through aiohttp's client), ``curl`` and ``openssl s_client``; the
server side is a plain ``aiohttp.web.Server`` behind :class:`MtlsAcceptor`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.http.tls import build_server_context
from sidecar.identity.mtls import MtlsAcceptor, _PeerTable, refusal_response
from sidecar.identity.x509 import PeerIdentity, PeerRejected, TrustBundles, verify_peer
from tests.identity.pki import HOUR, Authority, Issued, Pki, make_pki

OUR_ID = "spiffe://example.org/ns/agents/sa/billing"
CALLER_ID = "spiffe://example.org/ns/orchestrator/sa/main"
SAFETY = 20.0  # a bound on waits so a broken build fails instead of hanging; never asserted on


@dataclass
class Current:
    """What the acceptor's callables return; tests swap these to rotate."""

    context: ssl.SSLContext
    bundles: TrustBundles


@dataclass
class Harness:
    """A running acceptor in front of an aiohttp web.Server that records who it served."""

    acceptor: MtlsAcceptor
    port: int
    current: Current
    ca_file: Path
    served: list[tuple[PeerIdentity | None, asyncio.BaseTransport | None]] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    rejected: asyncio.Event = field(default_factory=asyncio.Event)

    def on_reject(self, reason: str, message: str, address: str) -> None:
        self.rejects.append((reason, message, address))
        self.rejected.set()

    async def next_reject(self) -> tuple[str, str, str]:
        await asyncio.wait_for(self.rejected.wait(), SAFETY)
        return self.rejects[-1]


def _server_context(pki_root: Authority, tmp_path: Path, bundles: TrustBundles, name: str) -> ssl.SSLContext:
    svid = pki_root.issue(OUR_ID, dns=("localhost",))
    cert, key = svid.write(tmp_path, name)
    return build_server_context(str(cert), str(key), bundles.ca_pems())


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


async def _start(
    pki: Pki,
    tmp_path: Path,
    *,
    allowed: frozenset[str] = frozenset({"example.org"}),
    handler_factory: Callable[[], asyncio.BaseProtocol] | None = None,
    handshake_timeout: float = SAFETY,
    max_handshakes: int = 16,
    **lobby: float,
) -> tuple[Harness, web.Server]:
    bundles = pki.bundles()
    current = Current(_server_context(pki.ours, tmp_path, bundles, "server"), bundles)
    (tmp_path / "ca.pem").write_bytes(pki.ours.issued.pem)
    harness: Harness

    async def handler(request: web.Request) -> web.Response:
        peer = harness.acceptor.peer_of(request.transport)
        harness.served.append((peer, request.transport))
        return web.Response(text=str(peer.spiffe_id) if peer else "no peer")

    server = web.Server(handler)
    acceptor = MtlsAcceptor(
        context=lambda: current.context,
        bundles=lambda: current.bundles,
        allowed_domains=allowed,
        handler_factory=handler_factory or server,
        on_reject=lambda *args: harness.on_reject(*args),
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
        **lobby,  # type: ignore[arg-type]
    )
    listening = await acceptor.start("127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    harness = Harness(acceptor, port, current, tmp_path / "ca.pem")
    return harness, server


@pytest.fixture
async def harness(pki: Pki, tmp_path: Path) -> AsyncIterator[Harness]:
    running, server = await _start(pki, tmp_path)
    yield running
    await running.acceptor.close()
    await server.shutdown(1.0)


def _client_context(ca_file: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


async def _get_many(port: int, context: ssl.SSLContext, count: int) -> list[tuple[int, str]]:
    """``count`` GETs over one kept-alive connection; (status, body) for each."""
    connector = aiohttp.TCPConnector(ssl=context, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = []
        for _ in range(count):
            async with session.get(f"https://localhost:{port}/hello") as response:
                results.append((response.status, await response.text()))
        return results


async def _attempt(port: int, context: ssl.SSLContext) -> tuple[int, str] | str:
    """One GET; its (status, body), or the client-side error's class name."""
    try:
        return (await _get_many(port, context, 1))[0]
    except (aiohttp.ClientError, OSError) as exc:
        return type(exc).__name__


async def _run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), SAFETY)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --- accepted peers --------------------------------------------------------------------------


async def test_valid_svid_is_served_over_keep_alive(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """A caller with a valid SVID is served, twice on one connection, and the handler sees its ID."""
    cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
    results = await _get_many(harness.port, _client_context(harness.ca_file, cert), 3)
    assert results == [(200, CALLER_ID)] * 3
    transports = {id(transport) for _, transport in harness.served}
    assert len(transports) == 1
    peer = harness.served[0][0]
    assert peer is not None and peer.trust_domain == "example.org"
    assert harness.rejects == []


async def test_caller_sending_its_intermediate_is_served(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """A leaf from our intermediate verifies when the caller sends the intermediate along."""
    cert = pki.intermediate.issue(CALLER_ID).write(tmp_path, "caller", pki.intermediate.issued)
    assert await _attempt(harness.port, _client_context(harness.ca_file, cert)) == (200, CALLER_ID)


@pytest.mark.parametrize(
    ("version", "with_cert", "expected"),
    [
        # TLS 1.2: the certificate arrives inside the handshake
        (ssl.TLSVersion.TLSv1_2, True, 200),
        (ssl.TLSVersion.TLSv1_2, False, 401),
        # TLS 1.3: the certificate arrives after the server's Finished
        (ssl.TLSVersion.TLSv1_3, True, 200),
        (ssl.TLSVersion.TLSv1_3, False, 401),
    ],
)
async def test_both_tls_versions(
    harness: Harness, pki: Pki, tmp_path: Path, version: ssl.TLSVersion, with_cert: bool, expected: int
) -> None:
    """TLS 1.2 and 1.3 callers are served or refused alike."""
    cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller") if with_cert else None
    context = _client_context(harness.ca_file, cert)
    context.minimum_version = context.maximum_version = version
    outcome = await _attempt(harness.port, context)
    assert isinstance(outcome, tuple) and outcome[0] == expected


async def test_peer_of_an_unknown_transport_is_none(harness: Harness) -> None:
    """Only transports this acceptor verified have a peer."""
    assert harness.acceptor.peer_of(None) is None
    assert harness.acceptor.peer_of(asyncio.Transport()) is None


# --- refused peers ---------------------------------------------------------------------------

# (leaf maker, allowed domains, reason, what the client sees: a status, or None for a TLS alert)
REFUSALS: dict[str, tuple[Callable[[Pki], Issued | None], frozenset[str], str, int | None]] = {
    # no client certificate: the handshake completes, then a 401 and close
    "no_cert": (lambda p: None, frozenset({"example.org"}), "no_client_cert", 401),
    # a CA in no bundle: OpenSSL's own chain check aborts the handshake
    "unrelated_ca": (lambda p: p.unrelated.issue(CALLER_ID), frozenset({"example.org"}), "peer_unverified", None),
    # the partner's CA cannot vouch for an ID in our domain (passes OpenSSL's union check)
    "partner_claims_ours": (
        lambda p: p.partner.issue(CALLER_ID),
        frozenset({"example.org", "partner.example"}),
        "peer_unverified",
        401,
    ),
    # a genuine partner ID on a listener that accepts only our domain
    "partner_not_allowed": (
        lambda p: p.partner.issue("spiffe://partner.example/caller"),
        frozenset({"example.org"}),
        "foreign_trust_domain",
        403,
    ),
    # dates: verify_peer's (OpenSSL is told not to check them), so the handshake completes and a 401 answers
    "expired": (lambda p: _dated(p, -3, -1), frozenset({"example.org"}), "expired", 401),
    "not_yet_valid": (lambda p: _dated(p, 1, 2), frozenset({"example.org"}), "not_yet_valid", 401),
    # a CA certificate used as a leaf
    "ca_as_leaf": (lambda p: p.ours.issue(CALLER_ID, ca=True), frozenset({"example.org"}), "ca_as_leaf", 401),
    # exactly one URI SAN
    "two_uris": (
        lambda p: p.ours.issue(CALLER_ID, "spiffe://example.org/other"),
        frozenset({"example.org"}),
        "not_spiffe",
        401,
    ),
    # a DNS-only SAN is not an SVID
    "dns_only": (lambda p: p.ours.issue(dns=("caller.example.org",)), frozenset({"example.org"}), "not_spiffe", 401),
    # an uppercase trust domain is not a valid SPIFFE ID
    "uppercase_td": (
        lambda p: p.ours.issue("spiffe://Example.org/caller"),
        frozenset({"example.org"}),
        "not_spiffe",
        401,
    ),
}


def _expired_intermediate(pki: Pki) -> Authority:
    """An intermediate of our root whose validity ended an hour ago (the leaves it issues are valid now)."""
    now = datetime.now(UTC)
    issued = pki.ours.issue(ca=True, common_name="expired intermediate", not_before=now - 3 * HOUR,
                            not_after=now - HOUR)
    authority = Authority.__new__(Authority)
    authority.issued, authority.cert, authority.key = issued, issued.cert, issued.key
    return authority


@pytest.mark.parametrize("case", ["expired", "not_yet_valid", "expired_intermediate"])
async def test_a_dated_caller_is_answered_on_a_fresh_connection_once(harness: Harness, pki: Pki, tmp_path: Path,
                                                                     case: str) -> None:
    """A caller whose certificate (or an intermediate it sends) is out of its dates makes a full handshake and
    is answered 401 peer_unverified, one refusal for its one request. When OpenSSL judged the dates it aborted
    the handshake under a TLS 1.3 client that had already sent its request: the client saw the connection close
    with no answer and no alert, and aiohttp, taking it for a lost keep-alive, sent the GET again on a new
    connection, so one call was two refusals and no answer (the chaos harness's clock rows)."""
    if case == "expired_intermediate":
        intermediate = _expired_intermediate(pki)
        cert = intermediate.issue(CALLER_ID).write(tmp_path, "caller", intermediate.issued)
    else:
        cert = _dated(pki, -3, -1).write(tmp_path, "caller") if case == "expired" else \
            _dated(pki, 1, 2).write(tmp_path, "caller")
    outcome = await _attempt(harness.port, _client_context(harness.ca_file, cert))
    assert isinstance(outcome, tuple) and outcome[0] == 401, outcome
    assert json.loads(outcome[1])["error"] == "peer_unverified"
    reason, _, _ = await harness.next_reject()
    assert reason == ("peer_unverified" if case == "expired_intermediate" else case)
    assert len(harness.rejects) == 1 and harness.served == []


def _dated(pki: Pki, start_hours: int, end_hours: int) -> Issued:
    now = datetime.now(UTC)
    return pki.ours.issue(CALLER_ID, not_before=now + start_hours * HOUR, not_after=now + end_hours * HOUR)


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_peer_gets_its_reason_and_never_reaches_the_handler(
    pki: Pki, tmp_path: Path, case: str
) -> None:
    """Each bad client certificate is refused with its reason; the handler is never called."""
    make_leaf, allowed, reason, status = REFUSALS[case]
    running, server = await _start(pki, tmp_path, allowed=allowed)
    try:
        leaf = make_leaf(pki)
        cert = leaf.write(tmp_path, "caller") if leaf else None
        outcome = await _attempt(running.port, _client_context(running.ca_file, cert))
        got_reason, message, address = await running.next_reject()
        assert (got_reason, address.split(":")[0]) == (reason, "127.0.0.1")
        assert message.startswith(("identity: ", "mtls: "))
        if status is None:
            assert isinstance(outcome, str)  # a TLS alert: no HTTP response at all
        else:
            assert isinstance(outcome, tuple) and outcome[0] == status
            assert json.loads(outcome[1])["error"] == PeerRejected(reason, "x").request_reason
        assert running.served == []
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


async def test_plain_http_on_the_tls_port_is_a_handshake_failure(harness: Harness) -> None:
    """Speaking plain HTTP to the mTLS listener is counted as handshake_failed and answered in plain text
    with a 400 that says the port speaks TLS (nothing of the request is parsed or served)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reason, message, _ = await harness.next_reject()
    assert reason == "handshake_failed" and message.startswith("mtls: tls handshake failed")
    answer = await asyncio.wait_for(reader.read(), SAFETY)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"] == "bad_request"
    assert b"client certificates" in body
    writer.close()
    assert harness.served == []


async def test_silent_peer_is_dropped_at_the_handshake_timeout(pki: Pki, tmp_path: Path) -> None:
    """A peer that never sends a ClientHello is dropped when the handshake timeout passes."""
    running, server = await _start(pki, tmp_path, handshake_timeout=0.2)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        reason, message, _ = await running.next_reject()
        assert (reason, message) == ("handshake_failed", "mtls: no tls clienthello arrived within 0.2s")
        assert await asyncio.wait_for(reader.read(), SAFETY) == b""
        writer.close()
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


async def test_handshakes_beyond_the_bound_wait_for_a_slot(pki: Pki, tmp_path: Path) -> None:
    """With one handshake slot, a caller waits while a stalled handshake holds it, then is served."""
    running, server = await _start(pki, tmp_path, max_handshakes=1)
    try:
        _, silent = await asyncio.open_connection("127.0.0.1", running.port)
        silent.write(b"\x16\x03\x01")  # the start of a TLS record, then nothing more
        while not running.acceptor._slots.locked():  # the stalled handshake takes the one slot
            await asyncio.sleep(0.01)
        cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
        caller = asyncio.ensure_future(_attempt(running.port, _client_context(running.ca_file, cert)))
        await asyncio.sleep(0.2)  # time in which an unbounded acceptor would have served it
        assert not caller.done() and running.served == []
        silent.close()
        assert await asyncio.wait_for(caller, SAFETY) == (200, CALLER_ID)
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


# --- many new callers, and connections that never speak (issue 11 items 1, 2) ---------------------


def _blocking_get(port: int, context: ssl.SSLContext) -> tuple[int, str]:
    """One GET over a new connection from a blocking Python ``ssl`` socket (Nagle on, as by default)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_every_new_python_ssl_caller_is_served(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """100 new connections from Python's ssl, 50 one after another and 50 sixteen at a time, are all served
    on the loop under test (under uvloop a ClientHello that arrived early was lost: issue 11 item 1)."""
    cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
    context = _client_context(harness.ca_file, cert)
    sequential = [await asyncio.to_thread(_blocking_get, harness.port, context) for _ in range(50)]
    gate = asyncio.Semaphore(16)

    async def one() -> tuple[int, str]:
        async with gate:
            return await asyncio.to_thread(_blocking_get, harness.port, context)

    concurrent = await asyncio.gather(*(one() for _ in range(50)))
    assert sequential + list(concurrent) == [(200, CALLER_ID)] * 100
    assert harness.rejects == []


async def _idle(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` TCP connections that connect and say nothing."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def _still_open(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.05)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("lobby", [
    # two handshake slots, eight silent connections: none of them holds a slot (issue 11 item 2)
    {"max_handshakes": 2},
    # a client opening a pool connects many sockets before it speaks on any: young connections are
    # spared the per-source bound
    {"max_waiting_per_source": 2, "waiting_young": SAFETY},
])
async def test_silent_connections_wait_while_a_caller_is_served(pki: Pki, tmp_path: Path,
                                                                lobby: dict[str, float]) -> None:
    """Connections that have not sent a byte wait in the lobby, holding no handshake slot: a caller is
    served at once and every silent one is still open (issue 11 item 2)."""
    running, server = await _start(pki, tmp_path, **lobby)
    try:
        silent = await _idle(running.port, 8)
        cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
        assert await _attempt(running.port, _client_context(running.ca_file, cert)) == (200, CALLER_ID)
        assert [await _still_open(reader) for reader, _ in silent] == [True] * 8
        assert running.rejects == []
        for _, writer in silent:
            writer.close()
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


@pytest.mark.parametrize(
    ("bound", "expected"),
    [
        # six silent connections from one address, four allowed per address: the two oldest go
        ({"max_waiting_per_source": 4, "waiting_young": 0.0}, "more than 4 connections from 127.0.0.1 were waiting"),
        # the same with the bound on all waiting connections
        ({"max_waiting": 4}, "more than 4 connections were waiting"),
    ],
)
async def test_a_flood_of_silent_connections_evicts_its_own_oldest(
    pki: Pki, tmp_path: Path, bound: dict[str, int], expected: str
) -> None:
    """Past the lobby's bound the oldest silent connection is closed, never the newcomer, so a real caller
    from the same address is still served (issue 11 item 2)."""
    running, server = await _start(pki, tmp_path, **bound)
    try:
        silent = await _idle(running.port, 6)
        assert [await _still_open(reader) for reader, _ in silent] == [False, False] + [True] * 4
        assert len(running.rejects) == 2
        assert all(r[0] == "handshake_failed" and expected in r[1] for r in running.rejects)
        cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
        assert await _attempt(running.port, _client_context(running.ca_file, cert)) == (200, CALLER_ID)
        for _, writer in silent:
            writer.close()
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


async def test_a_connection_closed_without_a_byte_is_not_a_refusal(harness: Harness, pki: Pki,
                                                                   tmp_path: Path) -> None:
    """A TCP probe (connect, then close) is closed quietly: no handshake_failed event for it."""
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.close()
        await writer.wait_closed()
    cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
    assert await _attempt(harness.port, _client_context(harness.ca_file, cert)) == (200, CALLER_ID)
    assert harness.rejects == []


# --- curl and openssl s_client ----------------------------------------------------------------


def _curl(harness: Harness, *extra: str, urls: int = 1) -> list[str]:
    url = f"https://localhost:{harness.port}/hello"
    return [
        "curl", "-sS", "--cacert", str(harness.ca_file),
        "--resolve", f"localhost:{harness.port}:127.0.0.1", *extra, *([url] * urls),
    ]  # fmt: skip


async def test_curl_with_valid_svid_reuses_one_connection(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """curl with --cert/--key is served twice over one connection."""
    cert, key = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
    code, out, err = await _run(*_curl(harness, "--cert", str(cert), "--key", str(key), urls=2))
    assert (code, out) == (0, CALLER_ID * 2), err
    assert len({id(t) for _, t in harness.served}) == 1


async def test_curl_without_certificate_gets_401_no_client_cert(harness: Harness) -> None:
    """curl without a client certificate gets the 401 refusal body and on_reject says why."""
    code, out, _ = await _run(*_curl(harness, "-w", "\n%{http_code}"))
    body, status = out.rsplit("\n", 1)
    assert (code, status, json.loads(body)["error"]) == (0, "401", "no_client_cert")
    assert (await harness.next_reject())[0] == "no_client_cert"
    assert harness.served == []


async def test_curl_with_certificate_from_unrelated_ca_fails_the_handshake(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """curl presenting a certificate from an unknown CA gets a TLS alert; reason peer_unverified."""
    cert, key = pki.unrelated.issue(CALLER_ID).write(tmp_path, "caller")
    code, out, _ = await _run(*_curl(harness, "--cert", str(cert), "--key", str(key)))
    assert code != 0 and out == ""
    assert (await harness.next_reject())[0] == "peer_unverified"
    assert harness.served == []


def _s_client(harness: Harness, *extra: str) -> list[str]:
    return [
        "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{harness.port}",
        "-servername", "localhost", "-CAfile", str(harness.ca_file), "-verify_return_error", *extra,
    ]  # fmt: skip


REQUEST = b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("case", "expected_status", "reason"),
    [
        # a valid SVID: served
        ("valid", "200", None),
        # no certificate: the handshake completes, then 401 no_client_cert
        ("no_cert", "401", "no_client_cert"),
        # an unrelated CA: a TLS alert, no HTTP response
        ("unrelated", None, "peer_unverified"),
    ],
)
async def test_openssl_s_client(
    harness: Harness, pki: Pki, tmp_path: Path, case: str, expected_status: str | None, reason: str | None
) -> None:
    """openssl s_client sees the same outcomes as the other clients."""
    authority = {"valid": pki.ours, "unrelated": pki.unrelated}.get(case)
    extra: tuple[str, ...] = ()
    if authority is not None:
        cert, key = authority.issue(CALLER_ID).write(tmp_path, "caller")
        extra = ("-cert", str(cert), "-key", str(key))
    _, out, _ = await _run(*_s_client(harness, *extra), stdin=REQUEST)
    if expected_status is None:
        assert "HTTP/1.1" not in out
    else:
        assert out.startswith(f"HTTP/1.1 {expected_status} ")
    if reason is None:
        assert out.endswith(CALLER_ID) and harness.rejects == []
    else:
        assert (await harness.next_reject())[0] == reason and harness.served == []


# --- session resumption (issue 16 item 3) ------------------------------------------------------


def _get_resuming(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[str, ssl.SSLSession, bool]:
    """One GET over a new connection offering ``session``: (body, the session to offer next, resumed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert tls.session is not None
            return answer.partition(b"\r\n\r\n")[2].decode(), tls.session, tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("via_intermediate", [False, True], ids=["from-root", "via-intermediate"])
async def test_a_reconnecting_caller_resumes_and_is_still_identified(
    harness: Harness, pki: Pki, tmp_path: Path, version: ssl.TLSVersion, via_intermediate: bool
) -> None:
    """A caller offering its session skips the full handshake and is served as the same verified peer,
    also when its leaf needs the intermediate it sent only at the full handshake."""
    issuer = pki.intermediate if via_intermediate else pki.ours
    extra = (pki.intermediate.issued,) if via_intermediate else ()
    context = _client_context(harness.ca_file, issuer.issue(CALLER_ID).write(tmp_path, "caller", *extra))
    context.minimum_version = context.maximum_version = version
    body, session, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, None)
    assert (body, resumed) == (CALLER_ID, False)
    for _ in range(3):
        body, session, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, session)
        assert (body, resumed) == (CALLER_ID, True)
    peers = [peer for peer, _ in harness.served]
    assert len(peers) == 4 and len({(p.spiffe_id, p.cert_sha256) for p in peers if p}) == 1
    assert harness.rejects == []


async def test_a_resumed_session_is_verified_again_and_refused_once_its_leaf_expired(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """A ticket is no pass: the resumed caller's leaf is checked against the clock (and bundles) again."""
    context = _client_context(harness.ca_file, _dated(pki, -1, 1).write(tmp_path, "caller"))
    _, session, _ = await asyncio.to_thread(_get_resuming, harness.port, context, None)
    harness.acceptor._clock = lambda: datetime.now(UTC) + 2 * HOUR  # past the leaf's not_after
    body, _, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, session)
    assert resumed and json.loads(body)["error"] == "peer_unverified"
    assert (await harness.next_reject())[0] == "expired"
    assert len(harness.served) == 1  # the refused connection reached no handler


async def test_a_caller_that_comes_back_is_verified_once_per_bundles(
    harness: Harness, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict on a leaf is remembered while the bundles in force are the ones it was reached with:
    new bundles (the same CA) mean one new verification, then it is remembered again."""
    import sidecar.identity.mtls as mtls

    calls: list[bytes | None] = []

    def counted(leaf: bytes | None, *args: object) -> PeerIdentity:
        calls.append(leaf)
        return verify_peer(leaf, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mtls, "verify_peer", counted)
    context = _client_context(harness.ca_file, pki.intermediate.issue(CALLER_ID).write(tmp_path, "caller",
                                                                                          pki.intermediate.issued))
    session = None
    for _ in range(3):
        body, session, _ = await asyncio.to_thread(_get_resuming, harness.port, context, session)
        assert body == CALLER_ID
    assert len(calls) == 1
    harness.current.bundles = pki.bundles()  # an equal but new set: a reload
    for _ in range(2):
        body, session, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, session)
        assert (body, resumed) == (CALLER_ID, True)
    assert len(calls) == 2 and harness.rejects == []


async def test_a_resumed_caller_no_longer_in_the_bundles_is_refused(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """Bundles that no longer trust the caller's CA refuse its resumed session (same TLS context, its ticket
    still valid): nothing remembered from before holds against other bundles."""
    context = _client_context(harness.ca_file, pki.ours.issue(CALLER_ID).write(tmp_path, "caller"))
    _, session, _ = await asyncio.to_thread(_get_resuming, harness.port, context, None)
    harness.current.bundles = TrustBundles.from_pem(make_pki().ours.issued.pem, "example.org", {})
    body, _, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, session)
    assert resumed and json.loads(body)["error"] == "peer_unverified"
    assert (await harness.next_reject())[0] == "peer_unverified"
    assert len(harness.served) == 1


async def test_a_session_does_not_survive_a_rotation(harness: Harness, pki: Pki, tmp_path: Path) -> None:
    """Tickets belong to the context that issued them: after the context is replaced the caller
    makes a full handshake, against the bundles then in force."""
    context = _client_context(harness.ca_file, pki.ours.issue(CALLER_ID).write(tmp_path, "caller"))
    _, session, _ = await asyncio.to_thread(_get_resuming, harness.port, context, None)
    harness.current.context = _server_context(pki.ours, tmp_path, harness.current.bundles, "rotated")
    body, _, resumed = await asyncio.to_thread(_get_resuming, harness.port, context, session)
    assert (body, resumed) == (CALLER_ID, False)


# --- rotation --------------------------------------------------------------------------------


async def test_rotation_applies_to_new_handshakes_and_spares_open_connections(
    harness: Harness, tmp_path: Path
) -> None:
    """After swapping context and bundles, a kept-alive connection still works; new handshakes use the new ones."""
    old_ca = make_pki().ours  # stands in for the CA before rotation
    new_ca = Authority("example.org root, rotated")
    old_bundles = TrustBundles.from_pem(old_ca.issued.pem, "example.org", {})
    harness.current.bundles = old_bundles
    harness.current.context = _server_context(old_ca, tmp_path, old_bundles, "old-server")
    (tmp_path / "old-ca.pem").write_bytes(old_ca.issued.pem)
    (tmp_path / "new-ca.pem").write_bytes(new_ca.issued.pem)
    old_svid = old_ca.issue(CALLER_ID).write(tmp_path, "old")
    old_client = _client_context(tmp_path / "old-ca.pem", old_svid)
    new_client = _client_context(tmp_path / "new-ca.pem", new_ca.issue(CALLER_ID).write(tmp_path, "new"))
    stale_client = _client_context(tmp_path / "new-ca.pem", old_svid)  # trusts the new server, old SVID

    connector = aiohttp.TCPConnector(ssl=old_client, limit=1)
    async with aiohttp.ClientSession(connector=connector) as kept:
        url = f"https://localhost:{harness.port}/hello"
        assert (await (await kept.get(url)).text()) == CALLER_ID

        new_bundles = TrustBundles.from_pem(new_ca.issued.pem, "example.org", {})
        harness.current.context = _server_context(new_ca, tmp_path, new_bundles, "new-server")
        harness.current.bundles = new_bundles

        assert (await (await kept.get(url)).text()) == CALLER_ID  # same connection, old keys
        assert len({id(t) for _, t in harness.served}) == 1
        assert await _attempt(harness.port, new_client) == (200, CALLER_ID)  # new server cert
        assert isinstance(await _attempt(harness.port, stale_client), str)  # old CA: not in the bundle
        assert (await harness.next_reject())[0] == "peer_unverified"
        assert (await (await kept.get(url)).text()) == CALLER_ID  # the old connection still works
    assert len(harness.served) == 4


# --- handler protocols and the refusal response ------------------------------------------------


class _BufferedEcho(asyncio.BufferedProtocol):
    """A BufferedProtocol handler answering one request: proves replay through get_buffer."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.buffer = bytearray(4)  # tiny, so the replay must loop
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]
        if self.data.endswith(b"\r\n\r\n") and self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.close()


async def test_buffered_protocol_handlers_receive_every_byte(pki: Pki, tmp_path: Path) -> None:
    """A BufferedProtocol handler gets the request bytes, including any that arrived during verification."""
    running, server = await _start(pki, tmp_path, handler_factory=_BufferedEcho)
    try:
        cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
        assert await _attempt(running.port, _client_context(running.ca_file, cert)) == (200, "ok")
    finally:
        await running.acceptor.close()
        await server.shutdown(1.0)


def test_refusal_response_is_a_complete_http_response() -> None:
    """The refusal carries the status, a JSON body with the reason and a Proxy-Status header."""
    raw = refusal_response("foreign_trust_domain", "identity: peer from partner.example")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b'Proxy-Status: sidecar; error=http_request_denied; details="foreign_trust_domain"' in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"error": "foreign_trust_domain", "message": "identity: peer from partner.example"}


def test_server_context_requests_but_does_not_demand_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    """The server context asks for client certificates (CERT_OPTIONAL), TLS >= 1.2, issues session tickets."""
    context = _server_context(pki.ours, tmp_path, pki.bundles(), "server")
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.num_tickets == 2 and not context.options & ssl.OP_NO_TICKET
    assert len(context.get_ca_certs()) == 2


def test_works_on_uvloop(pki: Pki, tmp_path: Path) -> None:
    """On uvloop (whose TLS transports take no weak references) peers are served and looked up."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[tuple[int, str]]:
        running, server = await _start(pki, tmp_path)
        try:
            cert = pki.ours.issue(CALLER_ID).write(tmp_path, "caller")
            return await _get_many(running.port, _client_context(running.ca_file, cert), 2)
        finally:
            await running.acceptor.close()
            await server.shutdown(1.0)

    assert uvloop.run(scenario()) == [(200, CALLER_ID)] * 2


def test_peer_table_prunes_closed_transports() -> None:
    """Entries of closed transports are dropped once the table doubles, so it cannot grow unbounded."""
    table = _PeerTable()
    peer = PeerIdentity(CALLER_ID, "example.org", "00", datetime.now(UTC))
    closed = [_FakeTransport(closing=True) for _ in range(64)]
    live = _FakeTransport(closing=False)
    for transport in [*closed, live]:
        table.add(transport, peer)
    assert table.get(live) is peer
    assert all(table.get(t) is None for t in closed)


class _FakeTransport(asyncio.Transport):
    def __init__(self, *, closing: bool) -> None:
        super().__init__()
        self._closing = closing

    def is_closing(self) -> bool:
        return self._closing
