"""An MCP server built with the official Python SDK (1.x ``FastMCP`` or 2.x ``MCPServer``), for tests.

Run with the Python of the environment whose SDK major is to be tested::

    python tests/peers/mcp_sdk/server.py

It serves the streamable-HTTP transport at ``/mcp`` on 127.0.0.1 (a free port), prints
``PORT <n>`` once listening, and runs until killed. Tools: ``search`` (logs a message to the
client during the call and announces a tools/list change on the server-to-client GET stream),
``delete_account`` and ``export_all`` (for rules to hide and refuse).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvicorn

try:  # 2.x
    from mcp.server.mcpserver import Context, MCPServer as Server
except ImportError:  # 1.x
    from mcp.server.fastmcp import Context, FastMCP as Server  # type: ignore[no-redef]

server = Server("sdk-test-server")


@server.tool()
async def search(query: str, ctx: Context) -> str:  # type: ignore[type-arg]
    """Search the tickets."""
    await ctx.info(f"searching for {query}")  # on this call's own SSE response
    await ctx.session.send_tool_list_changed()  # related to no request: on the GET stream
    return f"found: {query}"


@server.tool()
async def delete_account(account: str) -> str:
    """Delete an account."""
    return f"deleted {account}"


@server.tool()
async def export_all() -> str:
    """Export everything."""
    return "exported"


async def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app: Any = server.streamable_http_app()
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        await asyncio.sleep(0.02)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await serving


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
