"""Response heads of the own HTTP/1.1 server: what is written, and what never is (issue 16 item 1)."""

from __future__ import annotations

import pytest

from sidecar.http1.response import header_block, status_line


@pytest.mark.parametrize("headers", [
    [("X-A", "ok\r\nSet-Cookie: stolen=1")],  # response splitting through a value
    [("X-A\r\nX-B", "1")],  # through a name
    [("X-A", "a\nb")],  # a bare LF
    [("X-A", "a\rb")],  # a bare CR
])
def test_a_line_break_in_a_header_is_never_written(headers: list[tuple[str, str]]) -> None:
    """A header carrying CR or LF refuses the whole head (ValueError) instead of splitting the response."""
    with pytest.raises(ValueError):
        header_block(headers, "", "")


def test_a_head_has_server_sidecar_date_framing_and_the_blank_line() -> None:
    """Server: sidecar and Date are added where absent, never doubled; the framing and connection lines follow."""
    block = header_block([("Content-Type", "text/plain"), ("server", "upstream-x")], "Content-Length: 2\r\n",
                         "Connection: close\r\n")
    lines = block.decode().split("\r\n")
    assert lines[0] == "Content-Type: text/plain" and lines[1] == "server: upstream-x"
    assert not any(line.startswith("Server: sidecar") for line in lines)
    assert any(line.startswith("Date: ") for line in lines)
    assert block.endswith(b"Content-Length: 2\r\nConnection: close\r\n\r\n")
    assert status_line(1, 200, None) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(0, 599, None) == b"HTTP/1.0 599 \r\n"
    with pytest.raises(ValueError):
        status_line(1, 200, "OK\r\nX: 1")
