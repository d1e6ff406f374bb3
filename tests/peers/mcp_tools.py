"""A scripted MCP server over streamable HTTP (three tools, resources, prompts, sessions, the server-to-client
stream) on loopback, as the ``tools`` fixture; loaded as a plugin by ``tests/conftest.py``.

A GET with ``?ask=1`` also asks the agent, on the stream, for a sampling and a roots/list; a ``tools/call`` of
``ask_model`` asked for SSE asks for a sampling in its answer. The agent's answers (JSON-RPC responses POSTed
back) are kept in ``tools.answers``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
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


# --- shared by the MCP tests: requests through the sidecar, the official SDKs' environments ---------------

def mcp_config(tools: Upstream, **upstream: object) -> dict:
    return {"outbound": {"upstreams": {"tools": {"url": tools.url + "/mcp", "protocol": "mcp", **upstream}}}}


async def exchange(h, method: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                   path: str = "/tools"):
    """One request to the MCP upstream through the sidecar: status, body and response headers."""
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{h.outbound}{path}", data=body, headers=headers or {}) as r:
            return r.status, await r.read(), r.headers


def call(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


INITIALIZE = call("initialize", protocolVersion="2025-06-18", capabilities={}, clientInfo={"name": "a", "version": "1"})
JSON_IN = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def open_session(h, task: str | None = None) -> str:
    """initialize through the sidecar; the session id the server issued."""
    headers = {**JSON_IN, **({"X-Sidecar-Task": task} if task else {})}
    status, _, response_headers = await exchange(h, "POST", INITIALIZE, headers)
    assert status == 200
    return response_headers["Mcp-Session-Id"]


SDK_PEERS = Path(__file__).parent / "mcp_sdk"


@functools.cache
def sdk_python(major: int) -> str | None:
    """The Python of an environment holding MCP SDK ``major``.x: 2.x is in the test extra; 1.x in the
    second environment scripts/test builds (.venv-mcp1, or SIDECAR_MCP1_PYTHON)."""
    if major == 2:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            if importlib.metadata.version("mcp").startswith("2."):
                return sys.executable
        return None
    root = Path(__file__).parents[2]
    candidate = os.environ.get("SIDECAR_MCP1_PYTHON", str(root / ".venv-mcp1" / "bin" / "python"))
    try:
        version = subprocess.run([candidate, "-c", "import importlib.metadata as m; print(m.version('mcp'))"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return None
    return candidate if version.startswith(f"{major}.") else None


def need_sdk(major: int) -> str:
    python = sdk_python(major)
    if python is None:
        why = (f"mcp SDK {major}.x not found: scripts/test installs it "
               f"({'the test extra' if major == 2 else '.venv-mcp1, or set SIDECAR_MCP1_PYTHON'})")
        if os.environ.get("CI") == "true":  # CI must run what the SDKs prove, never skip it
            pytest.fail(why)
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def sdk_servers():
    """SDK-built streamable-HTTP servers on 127.0.0.1, one per SDK major, started on first use: major -> port."""
    running: dict[int, tuple[subprocess.Popen, int]] = {}

    def port(major: int) -> int:
        if major not in running:
            proc = subprocess.Popen([need_sdk(major), str(SDK_PEERS / "server.py")], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            line = proc.stdout.readline()  # the server prints its port once listening, or dies
            assert line.startswith(b"PORT "), line
            running[major] = (proc, int(line.split()[1]))
        return running[major][1]

    yield port
    for proc, _ in running.values():
        proc.kill()
        proc.wait()


def sdk_config(port: int) -> dict:
    return {"outbound": {"upstreams": {"tools": {"url": f"http://127.0.0.1:{port}/mcp", "protocol": "mcp"}}}}


async def answered(h, n: int) -> list[dict]:
    """The events, once ``n`` refused server requests have been answered to the server and recorded (the answers
    leave the relay's path, so they are waited for, within 10 s)."""
    async with asyncio.timeout(10):
        while True:
            events = await h.settle()
            done = [e for e in events if (e["target"] or {}).get("mcp_server_request") and e["decision"] == "deny"]
            if len(done) >= n:
                return events


async def run_sdk(python: str, script: str, *args: str) -> dict:
    """One of the SDK peer scripts (``tests/peers/mcp_sdk/<script>``) run to its end, within 60 s: the JSON
    object it printed (what the agent saw)."""
    proc = await asyncio.create_subprocess_exec(python, str(SDK_PEERS / script), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # timed out: never leave the client running
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out)
