"""A scripted MCP server over streamable HTTP (three tools, resources, prompts, sessions, the server-to-client
stream) on loopback, as the ``tools`` fixture; loaded as a plugin by ``tests/conftest.py``.

A GET with ``?ask=1`` also asks the agent, on the stream, for a sampling and a roots/list; a ``tools/call`` of
``ask_model`` asked for SSE asks for a sampling in its answer. The agent's answers (JSON-RPC responses POSTed
back) are kept in ``tools.answers``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from tests.harness import Upstream

TOOLS = [{"name": "search_tickets"}, {"name": "draft_reply"}, {"name": "delete_account"}]
RESOURCES = [{"uri": "docs://readme", "name": "readme"}, {"uri": "docs://internal/plan", "name": "plan"},
             {"uri": "file:///etc/passwd", "name": "passwd"}]
PROMPTS = [{"name": "summarize"}, {"name": "leak_secrets"}]
SAMPLING = {"jsonrpc": "2.0", "id": "s-1", "method": "sampling/createMessage",
            "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}], "maxTokens": 5}}
ROOTS = {"jsonrpc": "2.0", "id": "r-1", "method": "roots/list"}
LIST_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


async def sse(request: web.Request, *messages: dict) -> web.StreamResponse:
    """The messages as server-sent events, each with an id (as a resumable server sends them)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, message in enumerate(messages):
        await response.write(f"id: {i + 1}\nevent: message\ndata: {json.dumps(message)}\n\n".encode())
    await response.write_eof()
    return response


def mcp_server(answers: list[dict]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":  # the transport's server-to-client stream
            asks = (SAMPLING, ROOTS) if request.query.get("ask") else ()
            return await sse(request, *asks, LIST_CHANGED)
        if request.method == "DELETE":
            return web.Response(status=200)
        call = json.loads(await request.read())
        if "method" not in call or "id" not in call:  # answers and notifications (MCP: 202, no body)
            if "method" not in call:
                answers.append({**call, "session": request.headers.get("Mcp-Session-Id")})
            return web.Response(status=202)
        return await answer(request, call)

    return serve


async def answer(request: web.Request, call: dict) -> web.StreamResponse:
    params = call.get("params", {})
    listed = {"resources/list": {"resources": RESOURCES}, "prompts/list": {"prompts": PROMPTS}}
    if call["method"] in listed:
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": listed[call["method"]]})
    if call["method"] == "tools/call" and params.get("name") == "ask_model" and \
            request.headers.get("Accept") == "text/event-stream":
        result = {"jsonrpc": "2.0", "id": call["id"], "result": {"content": [{"type": "text", "text": "asked"}]}}
        return await sse(request, {**SAMPLING, "id": "s-2"}, result)
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
    """The MCP server, recording what reached it (and in ``answers`` the agent's answers to its requests)."""
    answers: list[dict] = []
    server = await Upstream(mcp_server(answers)).start()
    server.answers = answers  # type: ignore[attr-defined]
    yield server
    await server.stop()
