"""The sidecar's own HTTP/1.1 server against aiohttp's (the fallback it replaces), byte for byte.

The same raw requests (the outbound listener's security corpus, the framing edge cases below, and
request heads drawn by hypothesis) go to two sidecars, one on each server, in front of one raw
upstream that records every byte it receives. For each request both must give the same status,
the same reason code, the same trust decision, and forward the same bytes (issue 16 item 1).
"""

from __future__ import annotations

import asyncio
import os
import json
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.harness import SidecarHarness
from tests.scenarios.http1_corpus import AMBIGUOUS_HEADS, BYPASS_TARGETS, FORWARD_PROXY_TRICKS
from tests.scenarios.outbound import POLICY, outbound_to

BOUND = 3.0  # seconds a raw exchange may take before it counts as unanswered
VOLATILE = re.compile(rb"^(traceparent|tracestate|x-request-id|date):.*\r\n", re.IGNORECASE | re.MULTILINE)
SMUGGLED = b"GET /api/v1/admin/users HTTP/1.1\r\nHost: x\r\n\r\n"

# Framing and header edge cases; each ends its connection with Connection: close or a refusal.
EDGE_CASES = {
    "pipelined three": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\n\r\nGET /billing/v1/b HTTP/1.1\r\nHost: h\r\n\r\n"
                       b"GET /billing/v1/c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "pipelined after a refusal": b"GET /billing/v1/admin/x HTTP/1.1\r\nHost: h\r\n\r\n"
                                 b"GET /billing/v1/b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "pipelined after a body": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
                              b"GET /billing/v1/b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "chunked body": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n",
    "bad chunk size": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                      b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk without its CRLF": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                              b"Connection: close\r\n\r\n5\r\nhelloX0\r\n\r\n" + SMUGGLED,
    "TE and CL": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
                 b"Connection: close\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE chunked twice": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n"
                        b"Connection: close\r\n\r\n0\r\n\r\n",
    "TE identity": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n"
                   b"Connection: close\r\n\r\nab",
    "CL with a sign": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: +2\r\nConnection: close\r\n\r\nab",
    "CL list": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nab",
    "obs-fold": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n",
    "NUL in a value": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\nConnection: close\r\n\r\n",
    "CR in a value": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\nConnection: close\r\n\r\n",
    "bare LF line ends": b"GET /billing/v1/a HTTP/1.1\nHost: h\nConnection: close\n\n",
    "space before the colon": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A : 1\r\nConnection: close\r\n\r\n",
    "a header line without a colon": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-A\r\nConnection: close\r\n\r\n",
    "no Host in HTTP/1.1": b"GET /billing/v1/a HTTP/1.1\r\nConnection: close\r\n\r\n",
    "two Hosts": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nHost: i\r\nConnection: close\r\n\r\n",
    "HTTP/1.0 keep-alive": b"GET /billing/v1/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                           b"GET /billing/v1/b HTTP/1.0\r\n\r\n",
    "HTTP/1.0 no Host": b"GET /billing/v1/a HTTP/1.0\r\n\r\n",
    "an unknown version": b"GET /billing/v1/a HTTP/1.7\r\nHost: h\r\nConnection: close\r\n\r\n",
    "HTTP/2 version line": b"GET /billing/v1/a HTTP/2.0\r\nHost: h\r\nConnection: close\r\n\r\n",
    "absolute form": b"GET http://billing.internal/api/v1/a HTTP/1.1\r\nHost: billing.internal\r\n"
                     b"Connection: close\r\n\r\n",
    "asterisk form": b"OPTIONS * HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "an oversize head": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "too many headers": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
                        + b"Connection: close\r\n\r\n",
    "over the configured header bytes": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 40000
                                        + b"\r\nConnection: close\r\n\r\n",
    "an underscore name": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nX_A: 1\r\nConnection: close\r\n\r\n",
    "a body over the limit": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n"
                             b"Connection: close\r\n\r\nab",
    "100-continue": b"POST /billing/v1/a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\nab",
    "100-continue refused": b"POST /billing/v1/admin/a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                            b"Content-Length: 2\r\nConnection: close\r\n\r\nab",
    "a lowercase method": b"get /billing/v1/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "an unknown method": b"BREW /billing/v1/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "a websocket upgrade without a key": b"GET /billing/v1/ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n" + SMUGGLED,
    "an h2c upgrade": b"GET /billing/v1/a HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                      b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + SMUGGLED,
    "CONNECT to an unmapped host": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n" + SMUGGLED,
    "CONNECT with early bytes": b"CONNECT billing.internal:443 HTTP/1.1\r\nHost: billing.internal:443\r\n\r\n"
                                b"\x16\x03\x01\x00\x05hello",
    "garbage": b"\x00\x01\x02 not http at all\r\n\r\n",
}

# Where the sidecar's server is deliberately stricter: after a CONNECT that got no tunnel, or an upgrade
# answered without 101, it parses nothing more on the connection (aiohttp's parsed the bytes that followed
# as new requests: the TLS bytes sent early as a malformed request, and after a refused CONNECT the same
# request again and again). The first answer is the same; nothing after it is.
FIRST_ANSWER_ONLY = {"a websocket upgrade without a key", "an h2c upgrade", "CONNECT to an unmapped host",
                     "CONNECT with early bytes"}


def bypass_requests() -> list[tuple[str, bytes]]:
    cases = [(f"bypass {target!r}", f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
              .encode()) for target, *_ in BYPASS_TARGETS]
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"ab" + SMUGGLED), b"ab" + SMUGGLED)
    cases += [(f"ambiguous {i}", head + b"Connection: close\r\n\r\n" + body) for i, head in enumerate(AMBIGUOUS_HEADS)]
    cases += [(f"forward proxy {target}", b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
               % (target.encode(), host.encode())) for target, host, _ in FORWARD_PROXY_TRICKS]
    return cases


@dataclass
class Recorder:
    """A raw upstream: every request's bytes as received (head and its framed body), answered 200."""

    requests: list[bytes] = field(default_factory=list)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            if length:
                body = await reader.readexactly(int(length.group(1)))
            elif re.search(rb"\r\ntransfer-encoding: *chunked", head, re.IGNORECASE):
                while not body.endswith(b"0\r\n\r\n"):
                    body += await reader.readuntil(b"\r\n")
            self.requests.append(VOLATILE.sub(b"", head) + body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@dataclass(frozen=True)
class Outcome:
    statuses: tuple[int, ...]
    reasons: tuple[str, ...]
    events: tuple[tuple[str, str, int | None], ...]  # (decision, reason, status)
    forwarded: tuple[bytes, ...]


async def exchange(h: SidecarHarness, log: SidecarHarness, upstream: Recorder, data: bytes) -> Outcome:
    """Write ``data`` on a fresh connection, read until the sidecar closes (or BOUND), and say what happened.

    Both sidecars log to the stream of the one started last (``log``); one runs at a time here."""
    before_events, before_sent = len(log.events()), len(upstream.requests)
    port = h.port("outbound")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data.replace(b"%d", str(port).encode()))
    received = b""
    try:
        async with asyncio.timeout(BOUND):
            while chunk := await reader.read(65536):
                received += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    await asyncio.sleep(0.02)  # the last event is recorded once the exchange has unwound
    statuses = tuple(int(code) for code in re.findall(rb"HTTP/\d\.\d (\d{3}) ", received) if code != b"100")
    reasons = tuple(r.decode() for r in re.findall(rb'"error": ?"([a-z_]+)"', received))
    events = tuple((e["decision"], e["reason"], e.get("status")) for e in log.events()[before_events:])
    return Outcome(statuses, reasons, events, tuple(upstream.requests[before_sent:]))


@pytest.fixture
async def pair(make_sidecar, raw_server, monkeypatch):
    """(aiohttp's server, the sidecar's own), in front of one recording upstream."""
    upstream = Recorder()
    config = outbound_to(await raw_server(upstream))
    config["outbound"]["limits"] = {"max_header_bytes": 32768, "max_headers": 100, "max_body_bytes": 1 << 20}
    monkeypatch.setenv("SIDECAR_HTTP1_SERVER", "aiohttp")
    old = await make_sidecar(config, POLICY)
    monkeypatch.delenv("SIDECAR_HTTP1_SERVER")
    new = await make_sidecar(config, POLICY)
    return old, new, upstream


async def compare(pair, name: str, data: bytes, *, first_only: bool = False) -> None:
    old, new, upstream = pair
    was = await exchange(old, new, upstream, data)
    now = await exchange(new, new, upstream, data)
    if first_only:
        was = Outcome(was.statuses[:1], was.reasons[:1], was.events[:1], was.forwarded[:1])
    assert now == was, f"{name}: aiohttp's server gave {was}, the sidecar's gave {now}"


async def test_the_security_corpus_is_answered_alike(pair):
    """The bypass, ambiguous-framing and forward-proxy tables of the outbound listener, on both servers."""
    for name, data in bypass_requests():
        await compare(pair, name, data)


@pytest.mark.parametrize("name", list(EDGE_CASES))
async def test_framing_edge_cases_are_answered_alike(pair, name):
    """Pipelining, chunked framing, TE+CL, obs-fold, control characters, versions, forms, limits, 100-continue,
    upgrades and CONNECT: the same statuses, reasons, events and forwarded bytes on both servers."""
    await compare(pair, name, EDGE_CASES[name], first_only=name in FIRST_ANSWER_ONLY)


NAMES = st.sampled_from(["Host", "host", "Content-Length", "Transfer-Encoding", "Expect", "Connection", "X-A", "X_A",
                         "Upgrade", "Te", "Host ", "X\x00A", "Authorization", "Content-Type"])
VALUES = st.sampled_from(["127.0.0.1:%d", "evil.example", "0", "2", "-1", "chunked", "identity", "gzip, chunked",
                          "100-continue", "close", "keep-alive", "upgrade", "websocket", "a\x00b", "", " x ", "1, 2",
                          "Bearer canary", "é"])
HEADS = st.builds(
    lambda method, target, version, fields, end: (
        f"{method} {target} {version}{end}" + "".join(f"{n}: {v}{end}" for n, v in fields)
        + f"Connection: close{end}{end}").encode("utf-8", "surrogateescape") + b"ab",
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "get", "DELETE"]),
    st.sampled_from(["/billing/v1/x", "/billing/v1/admin/x", "/billing/v1/%2e%2e/admin", "/billing/v1/a%00b",
                     "http://billing.internal/api/v1/x", "*", "/billing/v1/x?q=1#f", "/billing/v1/x;p"]),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1 ", "HTTP/0.9"]),
    st.lists(st.tuples(NAMES, VALUES), max_size=5),
    st.sampled_from(["\r\n", "\r\n", "\n"]),
)


def drawn_heads(count: int) -> list[bytes]:
    """``count`` request heads drawn by hypothesis (deterministically: the same on every run)."""
    heads: list[bytes] = []

    @settings(max_examples=count, database=None, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(HEADS)
    def draw(head: bytes) -> None:
        heads.append(head)

    draw()
    return heads


async def test_fuzzed_request_heads_are_answered_alike(pair):
    """Request heads built from the pieces that matter to framing and routing, on both servers (40 in the
    suite; ``SIDECAR_FUZZ_HEADS=300`` for a longer run: 300 alike on 2026-12-02)."""
    for head in drawn_heads(int(os.environ.get("SIDECAR_FUZZ_HEADS", "40"))):
        await compare(pair, repr(head[:120]), head)
