"""A scripted MCP server over streamable HTTP (three tools, sessions, the server-to-client stream) on
loopback, as the ``tools`` fixture; loaded as a plugin by ``tests/conftest.py``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.harness import Upstream

TOOLS = [{"name": "search_tickets"}, {"name": "draft_reply"}, {"name": "delete_account"}]


async def mcp_server(request: web.Request) -> web.StreamResponse:
    if request.method == "GET":  # the transport's server-to-client stream: one notification
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        await response.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())
        await response.write_eof()
        return response
    if request.method == "DELETE":
        return web.Response(status=200)
    call = json.loads(await request.read())
    if "method" not in call or "id" not in call:  # answers and notifications (MCP: 202, no body)
        return web.Response(status=202)
    if call["method"] == "initialize":
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": {"protocolVersion": "2025-06-18"}},
                                 headers={"Mcp-Session-Id": uuid.uuid4().hex})
    if call["method"] == "tools/list":
        page = {"tools": TOOLS, **({"nextCursor": "page-3"} if call.get("params", {}).get("cursor") else {})}
        result = {"jsonrpc": "2.0", "id": call["id"], "result": page}
        if request.headers.get("Accept") == "text/event-stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: message\ndata: {json.dumps(result)}\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(result)
    return web.json_response({"jsonrpc": "2.0", "id": call.get("id"), "result": {"ok": call["method"]}})


@pytest.fixture
async def tools() -> AsyncIterator[Upstream]:
    """The MCP server, recording what reached it."""
    server = await Upstream(mcp_server).start()
    yield server
    await server.stop()
