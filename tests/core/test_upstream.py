"""The forwarding leg's HTTP/1.1 client (``sidecar.forward.http11``) against raw loopback servers.

Each server here is a plain asyncio protocol whose every byte the test controls, so that
keep-alive, framing and failure behaviour are observed on the wire, not assumed.
"""

from __future__ import annotations

import asyncio
import ssl
from types import SimpleNamespace
from typing import Callable

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.http11 import ConnectionPool, send, serialize_head
from tests.harness import raw_http

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Wire:
    """A raw HTTP server: ``respond(request_head, connection_no) -> bytes | None`` (None: close, no answer)."""

    def __init__(self, respond: Callable[[bytes, int], bytes | None]) -> None:
        self.respond = respond
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> Wire:
        wire = self

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                wire.connections += 1
                self.no, self.transport, self.buf = wire.connections, transport, b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                    length = _content_length(head)
                    if len(self.buf) < length:
                        self.buf = head + b"\r\n\r\n" + self.buf
                        return
                    body, self.buf = self.buf[:length], self.buf[length:]
                    wire.requests.append(head + b"\r\n\r\n" + body)
                    answer = wire.respond(head, self.no)
                    if answer is None:
                        self.transport.close()  # type: ignore[attr-defined]
                        return
                    self.transport.write(answer)  # type: ignore[attr-defined]

            def connection_lost(self, exc: BaseException | None) -> None:
                wire.closed += 1

        self.server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def pool_for(wire: Wire, **timeouts: float) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", wire.port, None, Timeouts(**timeouts))


async def get(pool: ConnectionPool, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    response = await send(pool, method, "/x", CIMultiDict({"Host": pool.host_header}), body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


@pytest.fixture
async def wire_factory():
    wires: list[Wire] = []

    async def make(respond: Callable[[bytes, int], bytes | None]) -> Wire:
        wires.append(await Wire(respond).start())
        return wires[-1]

    yield make
    for wire in wires:
        await wire.stop()


async def test_a_connection_read_to_the_end_is_reused(wire_factory):
    """Three requests in a row travel on one kept-alive connection."""
    wire = await wire_factory(lambda head, no: OK)
    pool = pool_for(wire)
    for _ in range(3):
        assert await get(pool) == (200, b"ok")
    assert wire.connections == 1
    pool.close()


async def test_a_response_not_read_to_the_end_closes_its_connection(wire_factory):
    """Released before its body was read (a client gone mid-response): never handed to the next request."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    pool = pool_for(wire)
    response = await send(pool, "GET", "/x", CIMultiDict(), None)
    response.release()
    response = await send(pool, "GET", "/x", CIMultiDict(), None)
    response.release()
    assert wire.connections == 2


async def test_connection_close_from_the_upstream_is_honoured(wire_factory):
    """``Connection: close`` (or HTTP/1.0) means the next request opens a new connection."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    pool = pool_for(wire)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert wire.connections == 2


def _drop_second_request_on_first_connection(head: bytes, no: int, seen: dict[int, int]) -> bytes | None:
    seen[no] = seen.get(no, 0) + 1
    return None if no == 1 and seen[no] == 2 else OK


async def test_a_stale_kept_alive_connection_is_retried_once_for_an_idempotent_request(wire_factory):
    """The upstream closed a kept-alive connection as our GET arrived: sent again on a new one (RFC 9112 §9.3.1)."""
    seen: dict[int, int] = {}
    wire = await wire_factory(lambda head, no: _drop_second_request_on_first_connection(head, no, seen))
    pool = pool_for(wire)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert wire.connections == 2 and len(wire.requests) == 3


async def test_a_non_idempotent_request_is_never_sent_twice(wire_factory):
    """A POST whose kept-alive connection dies unanswered fails: the upstream may have acted on it."""
    seen: dict[int, int] = {}
    wire = await wire_factory(lambda head, no: _drop_second_request_on_first_connection(head, no, seen))
    pool = pool_for(wire)
    assert await get(pool, "POST", b"{}") == (200, b"ok")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await get(pool, "POST", b"{}")
    assert len(wire.requests) == 2


async def test_requests_beyond_the_limit_wait_for_a_connection(wire_factory):
    """With a limit of one, concurrent requests queue for the one connection instead of opening more."""
    wire = await wire_factory(lambda head, no: OK)
    pool = ConnectionPool("127.0.0.1", wire.port, None, Timeouts(), limit=1)
    results = await asyncio.gather(*(get(pool) for _ in range(5)))
    assert results == [(200, b"ok")] * 5 and wire.connections == 1


async def test_head_and_204_carry_no_body_and_keep_the_connection(wire_factory):
    """A HEAD response's Content-Length describes a body that is not sent; 204 has none either."""
    def respond(head: bytes, no: int) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    wire = await wire_factory(respond)
    pool = pool_for(wire)
    assert await get(pool, "HEAD") == (200, b"")
    assert await get(pool, "DELETE") == (204, b"")
    assert await get(pool, "HEAD") == (200, b"")
    assert wire.connections == 1


async def test_an_interim_100_continue_is_skipped(wire_factory):
    """1xx responses before the final one are not the response."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert await get(pool_for(wire), "POST", b"x") == (200, b"ok")


async def test_an_unsolicited_101_is_a_failure_and_the_connection_closed(wire_factory):
    """A plain request never asked to switch protocols: the 101 is refused, not relayed, and not retried."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    wire = await wire_factory(lambda head, no: switch if len(wire.requests) == 2 else OK)
    pool = pool_for(wire)
    assert await get(pool) == (200, b"ok")
    with pytest.raises(aiohttp.http_exceptions.HttpProcessingError):
        await get(pool)  # on the kept-alive connection: an answer came, so no second attempt
    await asyncio.sleep(0.05)
    assert wire.closed == 1 and len(wire.requests) == 2


async def test_a_malformed_response_fails_the_exchange(wire_factory):
    """Response framing is llhttp's: a response with two Content-Lengths is an error, never relayed."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
    with pytest.raises(aiohttp.http_exceptions.HttpProcessingError):
        await get(pool_for(wire))


async def test_no_first_byte_within_the_timeout_is_a_timeout(wire_factory):
    """The upstream accepted the request and stayed silent: a timeout, and its connection is closed."""
    wire = await wire_factory(lambda head, no: b"")
    pool = pool_for(wire, first_byte=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await get(pool)
    await asyncio.sleep(0.05)
    assert wire.closed == 1


async def test_a_cancelled_exchange_closes_its_connection(wire_factory):
    """A cut (revocation, client gone) while waiting for the upstream closes that connection."""
    wire = await wire_factory(lambda head, no: b"")
    pool = pool_for(wire)
    pending = asyncio.ensure_future(get(pool))
    while not wire.requests:
        await asyncio.sleep(0.01)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.sleep(0.05)
    assert wire.closed == 1


async def test_idle_connections_are_closed_after_the_keepalive_time(wire_factory):
    """A kept-alive connection nobody reuses is closed by the pool, not left open forever."""
    wire = await wire_factory(lambda head, no: OK)
    pool = pool_for(wire, idle=0.1)
    assert await get(pool) == (200, b"ok")
    for _ in range(50):
        if wire.closed:
            break
        await asyncio.sleep(0.05)
    assert wire.closed == 1


async def test_a_closed_pool_closes_connections_as_they_come_back(wire_factory):
    """After an SVID rotation the old pool is closed: its connection in use is not kept afterwards."""
    wire = await wire_factory(lambda head, no: OK)
    pool = pool_for(wire)
    response = await send(pool, "GET", "/x", CIMultiDict(), None)
    pool.close()
    assert await response.read() == b"ok"
    response.release()
    await asyncio.sleep(0.05)
    assert wire.closed == 1


async def test_the_head_is_written_as_built(wire_factory):
    """Method, target and headers reach the wire exactly as the pipeline built them, in order."""
    wire = await wire_factory(lambda head, no: OK)
    headers = CIMultiDict([("Host", "api.example"), ("X-A", "1"), ("x-a", "2"), ("Via", "1.1 sidecar")])
    response = await send(pool_for(wire), "GET", "/v1/a%2Fb?q=1&q=2", headers, None)
    response.release()
    assert wire.requests[0] == (b"GET /v1/a%2Fb?q=1&q=2 HTTP/1.1\r\nHost: api.example\r\nX-A: 1\r\nx-a: 2\r\n"
                                b"Via: 1.1 sidecar\r\n\r\n")


async def test_a_streamed_body_is_chunked_unless_its_length_was_declared(wire_factory):
    """A body of unknown length goes out chunked; a declared one as it is, under its Content-Length."""
    wire = await wire_factory(lambda head, no: OK)
    pool = pool_for(wire)

    async def body():
        yield b"abc"
        yield b"de"

    response = await send(pool, "POST", "/x", CIMultiDict({"Content-Length": "5"}), body())
    assert await response.read() == b"ok"
    response.release()
    assert wire.requests[0].endswith(b"Content-Length: 5\r\n\r\nabcde")
    # the raw server above frames by Content-Length only; check the chunked head and that it was answered
    response = await send(pool, "POST", "/x", CIMultiDict(), body())
    assert response.status == 200
    response.release()
    assert b"Transfer-Encoding: chunked\r\n" in wire.requests[1]


async def test_an_early_refusal_stops_the_upload(wire_factory):
    """Refused before it read the body, an upstream never gets the rest: none of it can pass for a request."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    more = asyncio.Event()

    async def body():
        yield b"first"
        await more.wait()
        yield b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

    response = await send(pool_for(wire), "POST", "/x", CIMultiDict(), body())
    assert response.status == 401
    more.set()
    await asyncio.sleep(0.1)
    response.release()
    assert not any(b"smuggled" in request for request in wire.requests)


@pytest.mark.parametrize("name, value, target", [
    ("X-Token", "a\r\nX-Injected: 1", "/x"),  # CRLF in a value (a token from a hostile IdP)
    ("X-Token", "a\nX-Injected: 1", "/x"),  # a bare LF: some servers split on it
    ("X-Token", "a\rb", "/x"),  # a bare CR
    ("X-Token", "a\x00b", "/x"),  # NUL
    ("X-Bad\r\nX-Injected", "1", "/x"),  # CRLF in a name
    ("X-Token", "ok", "/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y"),  # a target that would add a request
    ("X-Token", "ok", "/x y"),  # a space in the target
    ("X-Token", "ok", "http://other.example/x"),  # an absolute target: only origin-form is sent
])
def test_a_head_that_would_split_the_request_is_refused(name, value, target):
    """Nothing that could smuggle a second header or request reaches the upstream: bad_request instead."""
    with pytest.raises(RequestRefused) as caught:
        serialize_head("GET", target, CIMultiDict({name: value}), None, False)
    assert caught.value.reason == "bad_request"


async def test_waiting_for_a_busy_pool_is_bounded_by_first_byte(wire_factory):
    """Every connection busy (long streams): a queued request times out instead of waiting for ever."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345" if no == 1 else OK)
    pool = ConnectionPool("127.0.0.1", wire.port, None, Timeouts(first_byte=0.2), limit=1)
    streaming = await send(pool, "GET", "/x", CIMultiDict(), None)  # holds the one connection
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(5) as guard:  # the test's own bound, in case the pool's is missing
            await send(pool, "GET", "/x", CIMultiDict(), None)
    assert not guard.expired()
    streaming.release()  # not read to the end: closed, and its slot is free again
    assert await get(pool) == (200, b"ok")
    assert wire.connections == 2


async def test_a_released_connection_goes_to_the_longest_waiter_not_a_newcomer(wire_factory):
    """Queued requests are served in arrival order: one arriving as a connection frees up waits its turn."""
    wire = await wire_factory(lambda head, no: OK)
    pool = ConnectionPool("127.0.0.1", wire.port, None, Timeouts(first_byte=5), limit=1)
    first = await send(pool, "GET", "/a", CIMultiDict(), None)
    assert await first.read() == b"ok"
    queued = asyncio.ensure_future(get(pool))
    await asyncio.sleep(0.05)  # queued for the one connection
    first.release()
    proto, reused = await pool.acquire()  # a newcomer, arriving as the connection is released
    assert queued.done() and queued.result() == (200, b"ok") and reused
    pool.release(proto, True)
    assert wire.connections == 1


@pytest.mark.parametrize("host, port, tls, expected", [
    ("api.example", 443, True, "api.example"),  # the scheme's default port is left out
    ("api.example", 8443, True, "api.example:8443"),
    ("127.0.0.1", 80, False, "127.0.0.1"),
    ("::1", 8080, False, "[::1]:8080"),  # an IPv6 literal is bracketed (RFC 9110 §7.2)
])
def test_the_host_header_names_the_origin(host, port, tls, expected):
    """What the pool writes as Host: the authority as a URI would, never an ambiguous IPv6 form."""
    ctx = ssl.create_default_context() if tls else None
    assert ConnectionPool(host, port, ctx, Timeouts()).host_header == expected


async def test_after_a_renewal_no_connection_opened_before_it_is_used_again(wire_factory):
    """An SVID rotation renews the pool: idle connections close now, busy ones when released, new ones use it."""
    wire = await wire_factory(lambda head, no: OK)
    pool = pool_for(wire)
    assert await get(pool) == (200, b"ok")  # connection 1, now idle
    busy = await send(pool, "GET", "/x", CIMultiDict(), None)  # connection 1 again, in use
    assert await get(pool) == (200, b"ok")  # connection 2, now idle
    pool.renew(None)  # plain TCP here: the new context is None
    assert await busy.read() == b"ok"
    busy.release()
    assert await get(pool) == (200, b"ok")
    await asyncio.sleep(0.05)
    assert wire.connections == 3 and wire.closed == 2  # 1 and 2 closed, 3 opened after the renewal


MALFORMED_HEADS = [
    # a space before the colon: llhttp keeps "Content-Length " as a header, next to our own framing
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    # a name that is not an RFC 9110 token
    b"HTTP/1.1 200 OK\r\nX-A\x01: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX(A): 1\r\nContent-Length: 2\r\n\r\nok",
    # control characters in a value (HTAB is the one allowed, RFC 9110 5.5)
    b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
]


@pytest.mark.parametrize("response", MALFORMED_HEADS, ids=["space-before-colon", "ctl-in-name", "paren-in-name",
                                                         "ctl-in-value", "del-in-value", "nul-in-value"])
async def test_a_malformed_response_header_fails_the_exchange_and_closes_the_connection(wire_factory, response):
    """A header name that is not a token, or a value with a control character, fails the exchange as a
    protocol error and its connection is not reused (issue 11 item 15)."""
    from sidecar.forward.transport import failure

    wire = await wire_factory(lambda head, no: response)
    pool = pool_for(wire)
    with pytest.raises(aiohttp.http_exceptions.HttpProcessingError) as caught:
        await get(pool)
    refusal = failure(caught.value)
    assert (refusal.reason, refusal.status) == ("upstream_protocol_error", 502)
    await asyncio.sleep(0.05)
    assert wire.closed == 1


async def test_a_tab_in_a_response_header_value_is_relayed(wire_factory):
    """HTAB is a valid field-value character (RFC 9110 5.5): such a response passes (issue 11 item 15)."""
    wire = await wire_factory(lambda head, no: b"HTTP/1.1 200 OK\r\nX-A: a\tb\r\nContent-Length: 2\r\n\r\nok")
    assert await get(pool_for(wire)) == (200, b"ok")


def assert_malformed_refused(h, answer: bytes, events: list[dict]) -> None:
    """The sidecar's own 502, with none of the malformed response in it, and one event for it."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"Content-Length : " not in answer and not body.endswith(b"ok")
    assert b'"error":"upstream_protocol_error"' in body and b"error=http_protocol_error" in head
    refused = [e for e in events if e["reason"] == "upstream_protocol_error"]
    assert len(refused) == 1 and refused[0]["status"] == 502 and refused[0]["outcome"] == "refused"
    assert "token" in refused[0]["reason_detail"]


async def test_an_upstreams_malformed_response_never_reaches_the_agent(make_sidecar, wire_factory):
    """Outbound: "Content-Length : 2" from an upstream is a 502 of the sidecar's own (issue 11 item 15)."""
    wire = await wire_factory(lambda head, no: MALFORMED_HEADS[0])
    h = await make_sidecar({"outbound": {"upstreams": {"raw": {"url": f"http://127.0.0.1:{wire.port}"}}}},
                           {"version": 1, "default": "deny", "rules": [
                               {"id": "raw", "direction": "outbound", "upstream": "raw", "effect": "allow"}]})
    out = h.port("outbound")
    answer = await raw_http(out, b"GET /raw/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % out)
    assert_malformed_refused(h, answer, await h.settle())
    assert len(wire.requests) == 1  # not retried on another connection


async def test_the_agents_malformed_response_never_reaches_the_caller(make_sidecar, wire_factory, tmp_path):
    """Inbound: the agent's "Content-Length : 2" is a 502 to the mTLS caller, nothing of it relayed
    (issue 11 item 15)."""
    from tests.core.test_inbound import POLICY, client_context, inbound_config

    wire = await wire_factory(lambda head, no: MALFORMED_HEADS[0])
    h = await make_sidecar(inbound_config(tmp_path, SimpleNamespace(url=f"http://127.0.0.1:{wire.port}")), POLICY)
    ctx = client_context(h, "spiffe://sidecar.local/orchestrator", tmp_path / "caller")
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("inbound"), ssl=ctx)
    try:
        writer.write(b"GET /tasks/1 HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert_malformed_refused(h, answer, await h.settle())
