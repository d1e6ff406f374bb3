"""Server-sent events read as they pass (``sidecar.http.sse``, the MCP answer filter): every line ending the
WHATWG grammar allows, however the stream is cut into chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from sidecar.http.sse import SseData
from sidecar.policy.mcp_responses import MessageFilter, SseMessageFilter

ENDINGS = st.sampled_from(["\r\n", "\n", "\r"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[str], bytes, list[int]]:
    """Events of one or more data lines, each event's lines ended by one of CRLF, LF or CR (a CR then an LF
    would be one CRLF), cut at arbitrary points."""
    events = draw(st.lists(st.lists(TEXT, min_size=1, max_size=3), min_size=1, max_size=5))
    parts = []
    for lines in events:
        ending = draw(ENDINGS)
        parts.append("".join(f"data: {line}{ending}" for line in lines) + ending)
    raw = "".join(parts).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    return ["\n".join(lines) for lines in events], raw, cuts


def pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


@given(streams())
def test_every_line_ending_and_every_cut_yield_the_same_events(stream):
    """CRLF, LF and bare CR each end a line (a CRLF cut in two is still one), wherever the chunks are cut."""
    expected, raw, cuts = stream
    reader = SseData()
    got = [data.decode() for chunk in pieces(raw, cuts) for data in reader.feed(chunk)]
    assert got == expected


@pytest.mark.parametrize("raw, expected", [
    (b"data:x\n\n", [b"x"]),  # no space after the colon
    (b"data:  x\n\n", [b" x"]),  # only one leading space is dropped
    (b"data\n\n", [b""]),  # a bare field name is an empty data line
    (b"id: 1\n\n", []),  # an event without data is not dispatched
    (b": comment\rdata: y\r\r", [b"y"]),  # comments, and bare CR line endings
])
def test_data_fields_are_read_as_the_grammar_says(raw, expected):
    """One leading space dropped, a bare 'data' empty, events without data not dispatched."""
    assert list(SseData().feed(raw)) == expected


@given(st.lists(ENDINGS, min_size=2, max_size=2), st.lists(st.integers(0, 400), max_size=6))
def test_the_mcp_answer_filter_reads_every_line_ending_too(endings, cuts):
    """The MCP filter finds the server's request and passes the rest whatever the line endings and the cuts."""
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"})
    ask = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"})
    first, second = endings  # one per event: a CR then an LF would be one CRLF
    raw = f"id: 1{first}data: {note}{first}{first}id: 2{second}data: {ask}{second}{second}".encode()
    seen: list[str] = []
    messages = MessageFilter(server_request=lambda method, ident: bool(seen.append(method)))
    stream = SseMessageFilter(messages)
    out = b"".join(stream.feed(chunk) for chunk in pieces(raw, sorted(c for c in cuts if c <= len(raw))))
    out += stream.close()
    assert seen == ["sampling/createMessage"]
    assert out.decode() == f"id: 1\ndata: {note}\n\nid: 2\n\n"
