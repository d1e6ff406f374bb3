"""The HTTP/2 transport to upstreams (issue 17 item 3): one connection multiplexing streams, a bound
on streams at once, flow control both ways, a new connection after an SVID rotation.

The upstream here is the sidecar's own HTTP/2 server protocol (``h2``'s server state machine) with
a test handler; the gRPC tests put a real ``grpcio`` server behind the same transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict

from sidecar.config import Limits, Timeouts
from sidecar.forward.http2 import H2Pool
from sidecar.http.incoming import Answer, IncomingRequest
from sidecar.http2.server import H2Protocol, H2Server


class Upstream:
    """An h2c server whose handler echoes the body (times ``repeat``) and counts streams in flight."""

    def __init__(self, repeat: int = 1) -> None:
        self.repeat, self.in_flight, self.most = repeat, 0, 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.server = H2Server(self.handle, protocol=H2Protocol, limits=Limits())

    async def handle(self, request: IncomingRequest) -> Answer:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.hold.wait()
            body = b"".join([chunk async for chunk in request.chunks()])
            return request.respond(200, None, {"x-path": request.target, "x-host": request.headers.get("Host", "")},
                                   body * self.repeat)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    peer = Upstream()
    listener = await asyncio.get_running_loop().create_server(peer.server, "127.0.0.1", 0)
    yield peer, listener.sockets[0].getsockname()[1]
    listener.close()


def pool(port: int, **kwargs: object) -> H2Pool:
    return H2Pool("127.0.0.1", port, None, Timeouts(first_byte=10, idle=10), **kwargs)  # type: ignore[arg-type]


async def get(transport: H2Pool, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    response = await transport.send("POST" if body else "GET", path, CIMultiDict(), body)
    try:
        return response.status, await response.read(), response.headers["x-path"]
    finally:
        response.release()


async def test_concurrent_requests_share_one_connection_within_the_stream_bound(upstream):
    """Eight requests at once on a pool bounded to three streams: one connection, never more than three
    streams open on it, every answer its own."""
    peer, port = upstream
    peer.hold.clear()
    transport = pool(port, limit=3)
    calls = asyncio.gather(*(get(transport, f"/r/{i}") for i in range(8)))
    await asyncio.sleep(0.2)
    assert peer.in_flight == 3
    peer.hold.set()
    answers = await calls
    assert [a[2] for a in answers] == [f"/r/{i}" for i in range(8)]
    assert peer.most == 3 and len(peer.server.connections) == 1
    transport.close()


async def test_large_bodies_flow_both_ways_past_the_initial_window(upstream):
    """A 1 MB upload and its 2 MB answer: both well past HTTP/2's 64 KB initial windows."""
    peer, port = upstream
    peer.repeat = 2
    transport = pool(port)
    status, body, _ = await get(transport, "/big", b"z" * 1_000_000)
    assert (status, len(body)) == (200, 2_000_000)
    transport.close()


async def test_a_streamed_upload_is_sent_as_it_comes(upstream):
    """An upload given as an async iterator (the agent's body, streamed) arrives whole."""
    _, port = upstream

    async def body():
        for i in range(5):
            yield b"%d" % i

    transport = pool(port)
    response = await transport.send("POST", "/s", CIMultiDict(), body())
    assert await response.read() == b"01234"
    response.release()
    transport.close()


async def test_renew_moves_new_streams_to_a_new_connection(upstream):
    """After a renewal (our SVID rotated) the next request opens a new connection; the old one, idle,
    is closed."""
    peer, port = upstream
    transport = pool(port)
    await get(transport, "/before")
    transport.renew(None)
    await get(transport, "/after")
    await asyncio.sleep(0.1)
    assert len(peer.server.connections) == 1  # the old one closed, the new one open
    transport.close()


async def test_a_header_http2_cannot_carry_is_refused_not_sent(upstream):
    """A value with a line break (the agent's, or a credential's) is bad_request, as on HTTP/1.1."""
    from sidecar.errors import RequestRefused

    _, port = upstream
    transport = pool(port)
    with pytest.raises(RequestRefused) as refused:
        await transport.send("GET", "/x", CIMultiDict({"x-evil": "a\r\nb"}), None)
    assert refused.value.reason == "bad_request"
    assert (await get(transport, "/after"))[0] == 200  # the connection is still good
    transport.close()


async def test_a_pseudo_header_or_empty_name_among_the_fields_is_refused_not_sent(upstream):
    """``h2``'s outbound validation is off (``encode_headers`` checks in one pass): a field named like a
    pseudo-header, or with no name, would make a malformed block the upstream resets the connection for."""
    from sidecar.errors import RequestRefused

    _, port = upstream
    transport = pool(port)
    for fields in ({":path": "/elsewhere"}, {"": "x"}):
        with pytest.raises(RequestRefused) as refused:
            await transport.send("GET", "/x", CIMultiDict(fields), None)
        assert refused.value.reason == "bad_request"
    assert (await get(transport, "/after"))[0] == 200
    transport.close()


async def test_credentials_and_short_cookies_stay_out_of_the_compression_context():
    """With ``h2``'s outbound normalization off, ``encode_headers`` keeps what it did: an Authorization (the
    credential the pipeline injects), a Proxy-Authorization and a short cookie go as never-indexed literals
    (RFC 7541 §7.1.3), so no intermediary re-encodes them into a dynamic table where a later request could
    probe them; names lowercased, values stripped, connection-specific fields left out. The upstream is
    ``h2`` with its inbound validation on: the block is valid HTTP/2."""
    import h2.config
    import h2.connection
    import h2.events
    from hpack import NeverIndexedHeaderTuple

    seen: asyncio.Future[list[tuple[bytes, bytes]]] = asyncio.get_running_loop().create_future()

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
            self.h2.initiate_connection()
            self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    if not seen.done():
                        seen.set_result(list(event.headers or []))
                    self.h2.send_headers(event.stream_id, [(b":status", b"200")], end_stream=True)
            self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]

    listener = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", 0)
    transport = pool(listener.sockets[0].getsockname()[1])
    try:
        response = await transport.send("GET", "/x", CIMultiDict({
            "Authorization": "Bearer secret-token", "Proxy-Authorization": "Basic eDp5", "Cookie": "a=1",
            "X-Trace": "  kept  ", "Connection": "close", "Keep-Alive": "5"}), None)
        response.release()
        headers = await asyncio.wait_for(seen, 10)
    finally:
        transport.close()
        listener.close()
    never = {bytes(n) for n, _ in (h for h in headers if isinstance(h, NeverIndexedHeaderTuple))}
    fields = {bytes(n): bytes(v) for n, v in headers}
    assert never == {b"authorization", b"proxy-authorization", b"cookie"}
    assert fields[b"x-trace"] == b"kept" and fields[b"authorization"] == b"Bearer secret-token"
    assert b"connection" not in fields and b"keep-alive" not in fields


@pytest.fixture
def ca():
    import trustme

    return trustme.CA()


def tls_server(ca, alpn: list[str] | None):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_client(ca):
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_auto_speaks_http2_to_an_upstream_whose_handshake_selects_h2(ca):
    """http2: auto, an upstream offering h2 by ALPN: the request goes over HTTP/2."""
    from sidecar.forward.http2 import AlpnPool

    peer = Upstream()
    listener = await asyncio.get_running_loop().create_server(peer.server, "127.0.0.1", 0,
                                                              ssl=tls_server(ca, ["h2", "http/1.1"]))
    transport = AlpnPool("127.0.0.1", listener.sockets[0].getsockname()[1], tls_client(ca), Timeouts())
    try:
        response = await transport.send("GET", "/auto", CIMultiDict(), None)
        assert response.status == 200 and response.headers["x-path"] == "/auto"
        response.release()
        assert not transport.speaks_http11 and len(peer.server.connections) == 1
    finally:
        transport.close()
        listener.close()


async def test_auto_falls_back_to_http11_when_the_handshake_selects_it(ca):
    """http2: auto, an HTTP/1.1-only TLS upstream: the request goes over HTTP/1.1, and so do the next."""
    from sidecar.forward.http2 import AlpnPool
    from tests.harness import Upstream as Http11Upstream

    upstream = await Http11Upstream().start(tls_server(ca, ["http/1.1"]))
    port = int(upstream.url.rsplit(":", 1)[1])
    transport = AlpnPool("127.0.0.1", port, tls_client(ca), Timeouts())
    try:
        for path in ("/first", "/second"):
            response = await transport.send("GET", path, CIMultiDict({"Host": "127.0.0.1"}), None)
            assert response.status == 200
            await response.read()
            response.release()
        assert transport.speaks_http11
        assert [seen.path for seen in upstream.seen] == ["/first", "/second"]
    finally:
        transport.close()
        await upstream.stop()


@pytest.mark.parametrize(("upstream", "expected"), [
    ({"url": "https://api.example.com"}, False),  # HTTP/1.1 unless asked
    ({"url": "http://127.0.0.1:9000", "http2": True}, True),  # h2c with prior knowledge
    ({"url": "https://api.example.com", "http2": "auto"}, "auto"),  # ALPN chooses
    ({"url": "http://127.0.0.1:9000", "protocol": "grpc"}, True),  # gRPC is HTTP/2
    ({"url": "http://127.0.0.1:9000", "http2": "auto"}, "http2: auto chooses by ALPN"),  # no TLS, no ALPN
    ({"url": "http://127.0.0.1:9000", "protocol": "grpc", "http2": False}, "http2: a grpc upstream"),
    ({"url": "https://api.example.com", "http2": "yes"}, "http2: must be true, false or auto"),
])
def test_the_http2_key_of_an_upstream(upstream, expected):
    """``http2: true | false | auto`` per upstream, checked at load with its path."""
    from sidecar.config import parse_config
    from sidecar.errors import ConfigInvalid

    raw = {"outbound": {"upstreams": {"api": upstream}}}
    if isinstance(expected, str) and expected.startswith("http2:"):
        with pytest.raises(ConfigInvalid) as invalid:
            parse_config(raw)
        assert any(expected.removeprefix("http2: ") in str(e) and "api.http2" in str(e) for e in invalid.value.errors)
        return
    assert parse_config(raw).outbound.upstreams["api"].http2 == expected


async def test_a_connection_whose_stream_ids_are_spent_is_replaced(upstream):
    """After 2^30 streams a connection has no stream id left (RFC 9113 §5.1.1): the next request goes
    on a new connection, the spent one is closed, nothing fails (ids spent by hand, not by 2^30 calls)."""
    peer, port = upstream
    transport = pool(port)
    assert (await get(transport, "/a"))[0] == 200
    spent = transport._client
    assert spent is not None
    spent.h2.highest_outbound_stream_id = spent.h2.HIGHEST_ALLOWED_STREAM_ID
    assert await get(transport, "/b") == (200, b"", "/b")
    assert transport._client is not spent
    assert spent.transport is None or spent.transport.is_closing()
    transport.close()


async def test_the_authority_sent_is_the_requests_host_not_the_pools(upstream):
    """:authority is the Host the pipeline routed and matched (a wildcard's name, say), not the address
    the pool dials; without a Host it is the pool's."""
    peer, port = upstream
    transport = pool(port)
    response = await transport.send("GET", "/a", CIMultiDict({"Host": "bucket.storage.example"}), None)
    assert response.headers["x-host"] == "bucket.storage.example"
    response.release()
    response = await transport.send("GET", "/b", CIMultiDict(), None)
    assert response.headers["x-host"] == f"127.0.0.1:{port}"
    response.release()
    transport.close()


def test_remembered_encodings_decode_to_what_was_sent_as_the_table_changes():
    """``MemoEncoder`` (each field's HPACK bytes kept while the dynamic table is unchanged) against a plain
    ``hpack`` decoder: blocks drawn from a small pool of fields (so most repeat) with new values among
    them (the table grows and evicts: a small table), sensitive fields, and table size changes, each
    block decodes to exactly what was encoded."""
    import random

    import hpack

    from sidecar.http2.side import MemoEncoder

    rng = random.Random(7)
    encoder, decoder = MemoEncoder(), hpack.Decoder()
    encoder.header_table_size = decoder.header_table_size = 256  # evictions within a few blocks
    pool = [(b"content-type", b"application/grpc"), (b"grpc-status", b"0"), (b"user-agent", b"grpc-python/1.85"),
            (b"x-a", b"1"), (b"x-b", b"two"), (b":status", b"200")]
    remembered = 0
    for i in range(400):
        block = rng.sample(pool, rng.randint(1, len(pool)))
        if rng.random() < 0.2:
            block.append((b"x-new", f"value-{i}".encode()))  # a new value: added to the table
        if rng.random() < 0.1:
            block.append(hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer t"))
        if rng.random() < 0.03:
            size = rng.choice([128, 256, 512])
            encoder.header_table_size = size  # as h2 does on the peer's SETTINGS_HEADER_TABLE_SIZE
            decoder.max_allowed_table_size = size
        remembered += len(encoder._memo)
        assert [tuple(f) for f in decoder.decode(encoder.encode(block), raw=True)] == [tuple(f) for f in block]
    assert remembered  # the memo was used, not bypassed


def test_remembered_blocks_decode_as_a_plain_decoder_decodes_them():
    """``MemoDecoder`` (a whole block's fields kept while the dynamic table is unchanged) against a plain
    ``hpack`` decoder fed the same blocks: repeated blocks (remembered), blocks adding new values (the
    table changes, a small table evicts), sensitive fields and table size changes; and a block
    remembered under one header-list bound is checked again under a smaller one."""
    import random

    import hpack
    import pytest as _pytest

    from sidecar.http2.side import MemoDecoder

    rng = random.Random(11)
    encoder, plain, memo = hpack.Encoder(), hpack.Decoder(), MemoDecoder(65536)
    encoder.header_table_size = 256
    pool = [[(b":status", b"200"), (b"content-type", b"application/grpc")], [(b"grpc-status", b"0")],
            [(b"x-a", b"1"), (b"x-b", b"two")]]
    remembered = 0
    for i in range(400):
        block = list(rng.choice(pool))
        if rng.random() < 0.15:
            block.append((b"x-new", f"value-{i}".encode()))
        if rng.random() < 0.1:
            block.append(hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer t"))
        if rng.random() < 0.03:
            encoder.header_table_size = rng.choice([128, 256, 512])
        data = encoder.encode(block)
        remembered += len(memo._memo)
        assert [tuple(f) for f in memo.decode(data, raw=True)] == [tuple(f) for f in plain.decode(data, raw=True)]
    assert remembered
    for field in ((b"x-one", b"1"), (b"x-two", b"2")):  # each newest in turn: both indexed as 62, the same byte
        memo.decode(encoder.encode([field]), raw=True)
        assert [tuple(f) for f in memo.decode(encoder.encode([field]), raw=True)] == [field]
    first, again = encoder.encode([(b"x-long", b"v" * 100)]), encoder.encode([(b"x-long", b"v" * 100)])
    memo.decode(first, raw=True)  # adds it to the table
    assert memo.decode(again, raw=True) == memo.decode(again, raw=True)  # indexed now: remembered
    memo.max_header_list_size = 50  # as h2 sets it from our SETTINGS_MAX_HEADER_LIST_SIZE
    with _pytest.raises(hpack.OversizedHeaderListError):
        memo.decode(again, raw=True)
