"""The forwarding leg's HTTP/1.1 client (``sidecar.forward.http11``) against raw loopback servers.

Each server here is a plain asyncio protocol (``Wire``) or a scripted stream handler (the
``raw_server`` fixture) whose every byte the test controls, so that keep-alive, framing and failure
behaviour are observed on the wire, not assumed; the last tests drive the same leg end to end
through a sidecar, TLS to the upstream included.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable

import aiohttp
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.connection import MalformedResponse, check_response_head
from sidecar.forward.http11 import ConnectionPool, send, serialize_head
from tests.harness import BOUND, OK, Upstream, raw_http
from tests.scenarios.outbound import ALLOW_ALL, POLICY, config_for, outbound_to

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


def pool_at(port: int, **timeouts: float) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", port, None, Timeouts(**timeouts))


def pool_for(wire: Wire, **timeouts: float) -> ConnectionPool:
    return pool_at(wire.port, **timeouts)


async def get(pool: ConnectionPool, method: str = "GET", body: bytes | None = None, *,
              target: str = "/x") -> tuple[int, bytes]:
    response = await send(pool, method, target, CIMultiDict({"Host": pool.host_header}), body)
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


TOKEN = set(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def one_by_one(raw: tuple[tuple[bytes, bytes], ...]) -> bool:
    """The rule itself, header by header: a non-empty token name, a value without CTLs but HTAB."""
    return all(name and set(name) <= TOKEN and all(b == 0x09 or 0x20 <= b != 0x7F for b in value)
               for name, value in raw)


HEADER_BYTES = st.binary(max_size=6) | st.sampled_from([b"X-A", b"Content-Type", b"a\tb", b"ok"])


@given(st.lists(st.tuples(HEADER_BYTES, HEADER_BYTES), max_size=6).map(tuple))
def test_the_joined_check_of_a_response_head_is_the_header_by_header_rule(raw):
    """One translate over all names and one over all values refuses exactly the heads the per-header rule does."""
    try:
        check_response_head(raw)
        passed = True
    except MalformedResponse:
        passed = False
    assert passed == one_by_one(raw)


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
    from tests.scenarios.inbound import POLICY, client_context, inbound_config

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


# -- raw servers scripted byte by byte: desync, framing and stalls (security review 3) -----------

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned"


async def test_a_response_nobody_asked_for_never_answers_the_next_request(raw_server):
    """An upstream that writes a second, unsolicited response after the first one was read (a desync,
    or cache poisoning across tasks and callers) does not get it taken as the next request's answer
    (security review 3, finding H1)."""
    sent_extra = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            if first:
                await asyncio.sleep(0.05)  # after the client has read and released the first answer
                writer.write(POISON)
                await writer.drain()
                sent_extra.set()
                first = False

    pool = pool_at(await raw_server(handler))
    assert await get(pool) == (200, b"ok")
    await sent_extra.wait()
    await asyncio.sleep(0.05)  # loopback delivery of the unsolicited bytes to the idle connection
    assert await get(pool) == (200, b"ok")
    pool.close()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # no Content-Length, no chunked: ends at close
    b"HTTP/1.0 200 OK\r\n\r\n",  # an HTTP/1.0 server's usual framing
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",  # chunked not final: ends at close (RFC 9112 6.3)
])
async def test_a_close_delimited_body_is_relayed_whole_not_parsed_as_another_response(raw_server, head):
    """A response framed by the connection closing is read to the close: its body is never truncated
    to nothing nor read as the start of another response (response splitting by body content)
    (security review 3, finding H2)."""
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned and more"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()

    pool = pool_at(await raw_server(handler))
    assert await asyncio.wait_for(get(pool), 3) == (200, body)
    pool.close()


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_connection_answered_before_its_upload_ended_is_not_reused(raw_server):
    """An upstream that answers a POST before reading its body (and keeps the connection) reads the
    agent's body as a second request; its answer must not become the answer to the next request
    (security review 3, finding H3)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # answers each head at once and never reads a body: what follows is "a request"
            line = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0]
            if b"/smuggled" in line:
                await asyncio.sleep(0.1)  # a slow endpoint: its answer comes after the next request
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            else:
                writer.write(OK)

    pool = pool_at(await raw_server(handler))
    rest = asyncio.Event()

    async def body():
        yield SMUGGLED[:5]
        await rest.wait()
        yield SMUGGLED[5:]

    headers = CIMultiDict({"Host": pool.host_header, "Content-Length": str(len(SMUGGLED))})
    response = await send(pool, "POST", "/upload", headers, body())
    assert await response.read() == b"ok"
    rest.set()
    await asyncio.sleep(0.01)  # the upload finishes before the relay releases the connection
    response.release()
    assert await asyncio.wait_for(get(pool, target="/next"), 3) == (200, b"ok")
    pool.close()


async def hang_or_raise(coro: Awaitable[object], bound: float = 3.0) -> BaseException | None:
    """What the coroutine raised (None if it returned); a test failure if it is still waiting after ``bound``."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=bound)
    if not done:
        task.cancel()
        pytest.fail("no answer and no timeout: the request waits past first_byte")
    return task.exception()


async def test_the_first_byte_timeout_holds_after_an_interim_response(raw_server):
    """An upstream that sends ``100 Continue`` and then nothing is timed out by first_byte (the request
    would otherwise hang forever and hold its pool slot: handlers are not cancelled on disconnect)
    (security review 3, finding H4)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(handler), first_byte=0.1)
    assert isinstance(await hang_or_raise(get(pool)), asyncio.TimeoutError)
    assert pool._open == 0  # the slot is given back
    pool.close()


async def test_an_endless_stream_of_interim_responses_is_timed_out(raw_server):
    """1xx responses one after another never make a final answer: first_byte bounds them all together
    (security review 3, finding H4)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for _ in range(500):
            writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            await asyncio.sleep(0.01)

    pool = pool_at(await raw_server(handler), first_byte=0.1)
    assert isinstance(await hang_or_raise(get(pool)), asyncio.TimeoutError)
    pool.close()


async def test_a_header_value_with_a_raw_latin1_byte_is_refused_as_bad_request(make_sidecar, upstream):
    """An agent header carrying a raw obs-text byte cannot be encoded for the upstream: refused with 400
    bad_request (nothing forwarded), not an unhandled exception answered 500 internal_error
    (security review 3, finding H5)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    port = h.port("outbound")
    response = await raw_http(port, b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Note: caf\xe9\r\n"
                                    b"Connection: close\r\n\r\n" % port)
    assert response.split(b" ")[1] == b"400" and b'"bad_request"' in response.replace(b'": "', b'":"')
    assert upstream.seen == []


def test_serialize_head_refuses_text_it_cannot_encode():
    """A surrogate-escaped byte in a header value or target is refused as bad_request (security review 3,
    finding H5)."""
    for headers, target in [({"X-Note": "caf\udce9"}, "/x"), ({}, "/caf\udce9")]:
        with pytest.raises(RequestRefused) as caught:
            serialize_head("GET", target, CIMultiDict(headers), None, False)
        assert caught.value.reason == "bad_request"


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_a_status_outside_100_to_599_is_an_upstream_failure(make_sidecar, raw_server, status):
    """An upstream status that HTTP does not define (RFC 9110 15: 100-599) is answered 502, never relayed
    to the agent as ``HTTP/1.1 0 X`` or similar (security review 3, finding H6)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 %s X\r\nContent-Length: 2\r\n\r\nok" % status)

    h = await make_sidecar(outbound_to(await raw_server(handler)), POLICY)
    out = h.port("outbound")
    response = await raw_http(out, b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                                   % out)
    assert response.split(b" ")[1] == b"502"


async def test_an_upload_the_upstream_stops_reading_is_timed_out_by_idle(raw_server):
    """An upstream that takes the head, never reads the body and never answers stalls the upload on
    backpressure: the exchange fails after ``idle`` without progress instead of holding its slot forever
    (security review 3, finding H7)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(handler), first_byte=0.1, idle=0.2)
    chunk, count = b"x" * 65536, 2048  # 128 MiB: far beyond what loopback socket buffers hold

    async def body():
        for _ in range(count):
            yield chunk

    headers = CIMultiDict({"Host": pool.host_header, "Content-Length": str(len(chunk) * count)})
    assert isinstance(await hang_or_raise(send(pool, "POST", "/x", headers, body())), asyncio.TimeoutError)
    assert pool._open == 0
    pool.close()


async def test_a_pipelined_second_response_in_the_same_packet_closes_the_connection(raw_server):
    """Two responses to one request arriving together: the extra one is dropped with its connection
    (security review 3: a defence that held)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" + POISON)

    pool = pool_at(await raw_server(handler))
    assert await get(pool) == (204, b"")
    assert await get(pool) == (204, b"")
    pool.close()


async def test_a_cancelled_wait_for_a_connection_leaves_the_pool_usable(raw_server):
    """Requests cut while queued for the one connection neither leak a slot nor wedge the pool
    (security review 3: a defence that held)."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await release.wait()
            writer.write(OK)

    pool = ConnectionPool("127.0.0.1", await raw_server(handler), None, Timeouts(), limit=1)
    first = asyncio.ensure_future(get(pool))
    queued = [asyncio.ensure_future(get(pool)) for _ in range(3)]
    await asyncio.sleep(0.05)
    for task in queued:
        task.cancel()
    release.set()
    assert await first == (200, b"ok")
    assert await asyncio.wait_for(get(pool), 2) == (200, b"ok")
    assert pool._open == 1
    pool.close()


async def test_a_response_body_that_stalls_is_an_upstream_timeout_not_a_reset(make_sidecar, raw_server):
    """An upstream that sends its head and then stops mid-body is answered 504 upstream_timeout (the
    body's idle timeout), not 502 upstream_unreachable "connection reset", which sends operators
    looking for a network fault (security review 4, finding I4)."""
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await asyncio.sleep(BOUND * 2)

    config = outbound_to(await raw_server(stalls), timeouts={"first_byte": "300ms", "idle": "300ms"})
    h = await make_sidecar(config, ALLOW_ALL)
    port = h.port("outbound")
    answer = await raw_http(port, b"GET /billing/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                            % port, read_timeout=BOUND)
    assert answer.startswith(b"HTTP/1.1 504 ") and b'"error":"upstream_timeout"' in answer
    event = (await h.settle())[-1]
    assert event["reason"] == "upstream_timeout" and event["status"] == 504


# -- TLS to the upstream: verification on, hostname checked, SNI sent (security review 3) --------

async def tls_upstream(ca: trustme.CA, snis: list[str | None]) -> Upstream:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ctx.sni_callback = lambda sock, name, _ctx: snis.append(name)  # type: ignore[assignment,misc,func-returns-value]
    server = Upstream()
    return await server.start(ssl_context=ctx)


def tls_config(url: str, ca_file: Path) -> dict:
    config = config_for(SimpleNamespace(url=url))
    config["outbound"]["upstreams"]["billing"]["ca"] = str(ca_file)
    return config


@pytest.mark.parametrize("host, trusted, status", [
    ("localhost", True, 200),  # the certificate's name, our CA: forwarded
    ("127.0.0.1", True, 502),  # a certificate for another name: hostname verification refuses
    ("localhost", False, 502),  # a CA we were not told to trust
])
async def test_upstream_tls_is_verified_with_hostname_and_sni(make_sidecar, upstream_ca, tmp_path, host, trusted,
                                                              status):
    """The forwarding leg verifies the upstream's chain and name and sends SNI; a failure forwards nothing
    (security review 3: a defence that held)."""
    snis: list[str | None] = []
    server = await tls_upstream(upstream_ca, snis)
    ca_file = tmp_path / "ca.pem"
    (upstream_ca if trusted else trustme.CA()).cert_pem.write_to_path(str(ca_file))
    try:
        h = await make_sidecar(tls_config(f"https://{host}:{server.port}/api", ca_file), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/x") as r:
                assert r.status == status
        assert len(server.seen) == (1 if status == 200 else 0)
        if status == 200:
            assert snis[-1] == "localhost"
    finally:
        await server.stop()


# -- the connection's own protocol: one parser per connection, one lazy timer, flow control (issue 16) --

async def test_a_body_that_trickles_but_never_stops_for_idle_is_read_whole(raw_server):
    """The body's timer counts silence, not the whole read: a byte every 50 ms for longer than ``idle`` in all
    keeps the exchange alive (the one timer, on firing, re-arms for what is left since the last byte)."""
    async def trickles(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
        for byte in b"twelve bytes":
            await asyncio.sleep(0.05)
            writer.write(bytes([byte]))
            await writer.drain()
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(trickles), first_byte=0.2, idle=0.2)
    assert await asyncio.wait_for(get(pool), 3) == (200, b"twelve bytes")  # 0.6 s of body, never 0.2 s quiet
    pool.close()


async def test_a_body_that_stops_after_some_bytes_is_timed_out_by_idle(raw_server):
    """Bytes that came once do not keep the timer quiet for ever: ``idle`` after the last one, the read fails
    with a timeout and the connection is not kept."""
    async def stops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for byte in b"half!":
            await asyncio.sleep(0.05)
            writer.write(bytes([byte]))
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(stops), first_byte=0.2, idle=0.2)
    response = await send(pool, "GET", "/x", CIMultiDict({"Host": pool.host_header}), None)
    try:
        assert isinstance(await hang_or_raise(response.read()), asyncio.TimeoutError)
    finally:
        response.release()
    assert pool.counts == (0, 0)
    pool.close()


async def test_one_connection_and_its_parsers_serve_gets_and_heads_in_turn(wire_factory):
    """A HEAD answer declares a length it does not send (RFC 9110 9.3.2): read with the HEAD parser, it does
    not eat the next answer; each kind of parser is made once per connection and kept across requests."""
    def answer(head: bytes, no: int) -> bytes:
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nthe body"

    wire = await wire_factory(answer)
    pool = pool_for(wire)
    parsers = []
    for method in ("GET", "HEAD", "GET", "HEAD", "GET"):
        assert await get(pool, method) == (200, b"" if method == "HEAD" else b"the body")
        [(proto, _)] = pool._idle
        parsers.append(dict(proto._parsers))
    assert wire.connections == 1
    assert parsers[-1][True] is parsers[0][True] and parsers[-1][False] is parsers[1][False]
    pool.close()


async def test_the_start_of_another_response_after_one_closes_its_connection(raw_server):
    """Bytes after a response in its own segment that are not yet a whole response (a next head cut short)
    are not left in the kept parser to be taken for the next request's answer: the connection closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK + b"HTTP/1.1 200 OK\r\nContent-Len")

    pool = pool_at(await raw_server(handler))
    assert await get(pool) == (200, b"ok")
    assert pool.counts == (0, 0)  # closed, not kept
    assert await get(pool) == (200, b"ok")
    pool.close()


async def test_a_body_nobody_reads_pauses_the_connection_and_is_not_timed_out_meanwhile(raw_server):
    """A large body the relay is not reading stops being read from the socket (flow control: what is held
    stays bounded), and the pause is ours, not the upstream's silence: ``idle`` does not end it."""
    total = 8 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(big), first_byte=0.2, idle=0.2)
    response = await send(pool, "GET", "/x", CIMultiDict({"Host": pool.host_header}), None)
    proto = response._proto
    async with asyncio.timeout(BOUND):
        while not proto._reading_paused:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # longer than idle, paused the whole time
    assert proto.is_connected() and response.content.total_bytes < total
    size = 0
    while chunk := await asyncio.wait_for(response.read_chunk(), BOUND):
        size += len(chunk)
    assert size == total
    response.release()
    assert pool.counts == (1, 1)
    pool.close()
