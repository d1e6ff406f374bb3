"""Security review, round 3: the forwarding leg's own HTTP/1.1 client (``sidecar.forward.http11``).

Tests named ``test_h<N>_...`` reproduce findings H1-H7 of the third review; each failed before its
fix and now asserts it. The others confirm a defence that held. The upstreams here are raw asyncio
servers on loopback whose every byte the test writes, so that framing and reuse are seen on the wire.
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
from multidict import CIMultiDict

from sidecar.config_model import Timeouts
from sidecar.errors import RequestRefused
from sidecar.forward.http11 import ConnectionPool, send, serialize_head
from tests.harness import Upstream, raw_http
from tests.test_security_review import OUT_POLICY, out_config

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server():
    """Start a loopback server running ``handler(reader, writer)`` per connection; returns its port."""
    servers: list[asyncio.Server] = []
    connections: list[asyncio.Task[None]] = []

    async def start(handler: Handler) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client closed: this connection's script ends
            finally:
                writer.close()

        servers.append(await asyncio.start_server(run, "127.0.0.1", 0))
        return servers[-1].sockets[0].getsockname()[1]

    yield start
    for task in connections:
        task.cancel()
    for server in servers:
        server.close()


def pool_at(port: int, **timeouts: float) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", port, None, Timeouts(**timeouts))


async def get(pool: ConnectionPool, target: str = "/x") -> tuple[int, bytes]:
    response = await send(pool, "GET", target, CIMultiDict({"Host": pool.host_header}), None)
    try:
        return response.status, await response.read()
    finally:
        response.release()


# -- H1: bytes sent on an idle kept-alive connection answer the next request -------------------

async def test_h1_a_response_nobody_asked_for_never_answers_the_next_request(raw_server):
    """An upstream that writes a second, unsolicited response after the first one was read (a desync,
    or cache poisoning across tasks and callers) does not get it taken as the next request's answer."""
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


# -- H2: a close-delimited body is cut to nothing, its bytes parsed as another response --------

@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # no Content-Length, no chunked: ends at close
    b"HTTP/1.0 200 OK\r\n\r\n",  # an HTTP/1.0 server's usual framing
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",  # chunked not final: ends at close (RFC 9112 6.3)
])
async def test_h2_a_close_delimited_body_is_relayed_whole_not_parsed_as_another_response(raw_server, head):
    """A response framed by the connection closing is read to the close: its body is never truncated
    to nothing nor read as the start of another response (response splitting by body content)."""
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned and more"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()

    pool = pool_at(await raw_server(handler))
    assert await asyncio.wait_for(get(pool), 3) == (200, body)
    pool.close()


# -- H3: an early answer during the upload, then the connection reused ------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_h3_a_connection_answered_before_its_upload_ended_is_not_reused(raw_server):
    """An upstream that answers a POST before reading its body (and keeps the connection) reads the
    agent's body as a second request; its answer must not become the answer to the next request."""
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
    assert await asyncio.wait_for(get(pool, "/next"), 3) == (200, b"ok")
    pool.close()


# -- H4: after a 1xx, first_byte no longer bounds the wait ------------------------------------

async def hang_or_raise(coro: Awaitable[object], bound: float = 3.0) -> BaseException | None:
    """What the coroutine raised (None if it returned); a test failure if it is still waiting after ``bound``."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=bound)
    if not done:
        task.cancel()
        pytest.fail("no answer and no timeout: the request waits past first_byte")
    return task.exception()


async def test_h4_the_first_byte_timeout_holds_after_an_interim_response(raw_server):
    """An upstream that sends ``100 Continue`` and then nothing is timed out by first_byte (the request
    would otherwise hang forever and hold its pool slot: handlers are not cancelled on disconnect)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(30)

    pool = pool_at(await raw_server(handler), first_byte=0.1)
    assert isinstance(await hang_or_raise(get(pool)), asyncio.TimeoutError)
    assert pool._open == 0  # the slot is given back
    pool.close()


async def test_h4_an_endless_stream_of_interim_responses_is_timed_out(raw_server):
    """1xx responses one after another never make a final answer: first_byte bounds them all together."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for _ in range(500):
            writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            await asyncio.sleep(0.01)

    pool = pool_at(await raw_server(handler), first_byte=0.1)
    assert isinstance(await hang_or_raise(get(pool)), asyncio.TimeoutError)
    pool.close()


# -- H5: a header that is not UTF-8 text is an unhandled error (500), not a refusal ------------

async def test_h5_a_header_value_with_a_raw_latin1_byte_is_refused_as_bad_request(make_sidecar, upstream):
    """An agent header carrying a raw obs-text byte cannot be encoded for the upstream: refused with 400
    bad_request (nothing forwarded), not an unhandled exception answered 500 internal_error."""
    h = await make_sidecar(out_config(upstream), OUT_POLICY)
    port = h.port("outbound")
    response = await raw_http(port, b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Note: caf\xe9\r\n"
                                    b"Connection: close\r\n\r\n" % port)
    assert response.split(b" ")[1] == b"400" and b'"bad_request"' in response.replace(b'": "', b'":"')
    assert upstream.seen == []


def test_h5_serialize_head_refuses_text_it_cannot_encode():
    """A surrogate-escaped byte in a header value or target is refused as bad_request."""
    for headers, target in [({"X-Note": "caf\udce9"}, "/x"), ({}, "/caf\udce9")]:
        with pytest.raises(RequestRefused) as caught:
            serialize_head("GET", target, CIMultiDict(headers), None, False)
        assert caught.value.reason == "bad_request"


# -- H6: a status line outside 100-599 is relayed as an invalid response -----------------------

@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_h6_a_status_outside_100_to_599_is_an_upstream_failure(make_sidecar, raw_server, status):
    """An upstream status that HTTP does not define (RFC 9110 15: 100-599) is answered 502, never relayed
    to the agent as ``HTTP/1.1 0 X`` or similar."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 %s X\r\nContent-Length: 2\r\n\r\nok" % status)

    port = await raw_server(handler)
    h = await make_sidecar(out_config(SimpleNamespace(url=f"http://127.0.0.1:{port}")), OUT_POLICY)
    out = h.port("outbound")
    response = await raw_http(out, b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                                   % out)
    assert response.split(b" ")[1] == b"502"


# -- H7: an upstream that stops reading the upload holds the exchange forever ------------------

async def test_h7_an_upload_the_upstream_stops_reading_is_timed_out_by_idle(raw_server):
    """An upstream that takes the head, never reads the body and never answers stalls the upload on
    backpressure: the exchange fails after ``idle`` without progress instead of holding its slot forever."""
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


# -- defences that held --------------------------------------------------------------------

async def test_a_pipelined_second_response_in_the_same_packet_closes_the_connection(raw_server):
    """Two responses to one request arriving together: the extra one is dropped with its connection."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" + POISON)

    pool = pool_at(await raw_server(handler))
    assert await get(pool) == (204, b"")
    assert await get(pool) == (204, b"")
    pool.close()


async def test_a_cancelled_wait_for_a_connection_leaves_the_pool_usable(raw_server):
    """Requests cut while queued for the one connection neither leak a slot nor wedge the pool."""
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


# -- TLS to the upstream: verification on, hostname checked, SNI sent --------------------------

@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def _tls_upstream(ca: trustme.CA, snis: list[str | None]) -> Upstream:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ctx.sni_callback = lambda sock, name, _ctx: snis.append(name)  # type: ignore[assignment,misc,func-returns-value]
    server = Upstream()
    return await server.start(ssl_context=ctx)


def _tls_config(url: str, ca_file: Path) -> dict:
    config = out_config(SimpleNamespace(url=url))
    config["outbound"]["upstreams"]["billing"]["ca"] = str(ca_file)
    return config


@pytest.mark.parametrize("host, trusted, status", [
    ("localhost", True, 200),  # the certificate's name, our CA: forwarded
    ("127.0.0.1", True, 502),  # a certificate for another name: hostname verification refuses
    ("localhost", False, 502),  # a CA we were not told to trust
])
async def test_upstream_tls_is_verified_with_hostname_and_sni(make_sidecar, tls_ca, tmp_path, host, trusted, status):
    """The forwarding leg verifies the upstream's chain and name and sends SNI; a failure forwards nothing."""
    snis: list[str | None] = []
    server = await _tls_upstream(tls_ca, snis)
    ca_file = tmp_path / "ca.pem"
    (tls_ca if trusted else trustme.CA()).cert_pem.write_to_path(str(ca_file))
    try:
        h = await make_sidecar(_tls_config(f"https://{host}:{server.port}/api", ca_file), OUT_POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/x") as r:
                assert r.status == status
        assert len(server.seen) == (1 if status == 200 else 0)
        if status == 200:
            assert snis[-1] == "localhost"
    finally:
        await server.stop()
