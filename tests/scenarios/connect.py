"""An HTTPS_PROXY client whose CONNECT tunnel the sidecar intercepts, reaching an HTTPS ``billing`` upstream.

Policy: the outbound one (``tests.scenarios.outbound.POLICY``): the same rules apply in a tunnel.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import trustme

from tests.harness import SidecarHarness, Upstream

SECRET = "canary-connect-secret-4b1e"


async def start_https_upstream(ca: trustme.CA) -> Upstream:
    """A real HTTPS upstream on 127.0.0.1 whose certificate names the IP it is reached at."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return await Upstream().start(ssl_context=context)


def billing_config(upstream: Upstream, ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """billing.internal maps to the upstream's https://127.0.0.1 URL, with a static credential."""
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {
        "agent": {"name": "billing-agent", "environment": "test"},
        "outbound": {"upstreams": {"billing": {
            "url": f"https://127.0.0.1:{upstream.port}/api", "hosts": ["billing.internal"],
            "ca": str(ca_file), "credential": "legacy"}}},
        "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}},
    }


def intercept_ca(h: SidecarHarness) -> str:
    assert h.sidecar is not None
    return str(h.sidecar.interceptor.ca_cert_path)


async def tunnel(h: SidecarHarness, ca_file: str, authority: str = "billing.internal:443",
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel by hand: the 200, then TLS verified against ``ca_file`` for the host."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    context = ssl.create_default_context(cafile=ca_file)
    await writer.start_tls(context, server_hostname=authority.rpartition(":")[0])
    return reader, writer


def get(path: str, host: str = "billing.internal", extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n"


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   head: str) -> tuple[int, dict[str, str], bytes]:
    """One request on an open tunnel; the response's status, headers and body."""
    writer.write(head.encode())
    lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def through_tunnel(h: SidecarHarness, *heads: str,
                         ca_file: str | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    """Open one tunnel, send each request in turn over it, close it; the responses."""
    reader, writer = await tunnel(h, ca_file or intercept_ca(h))
    try:
        return [await exchange(reader, writer, head) for head in heads]
    finally:
        writer.close()
