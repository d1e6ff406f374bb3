"""An agent's MCP session with the official Python SDK (1.x ``ClientSession``, 2.x ``Client``), for tests.

Run with the Python of the environment whose SDK major is to be tested::

    python tests/peers/mcp_sdk/client.py URL TASK OTHER_TASK [MODE]

``URL`` is the MCP endpoint (through the sidecar), ``TASK`` the ``X-Sidecar-Task`` the session runs
under, ``OTHER_TASK`` another open task to replay the session id under, ``MODE`` (2.x only) the
``Client`` connect mode (``legacy``: the initialize handshake; ``auto``: the SDK's default). It lists the
tools, calls ``search``, calls ``delete_account`` (to be refused), calls ``search`` again in the same
session, waits for a server-sent notification on the GET stream, replays the session id under
``OTHER_TASK``, then closes (the SDK ends its session with DELETE). Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

try:
    import httpx2 as httpx
    from mcp import Client

    MAJOR = 2
except ImportError:
    import httpx  # type: ignore[no-redef]

    from mcp import ClientSession

    MAJOR = 1
from mcp.client.streamable_http import streamable_http_client

NOTIFICATION_WAIT = 5.0  # seconds: bounded; the notification comes within milliseconds


class Agent:
    def __init__(self, url: str, task: str, other_task: str) -> None:
        self.url, self.task, self.other_task = url, task, other_task
        self.logs: list[str] = []
        self.list_changed = asyncio.Event()
        self.session_ids: list[str] = []

    async def on_log(self, params: Any) -> None:
        self.logs.append(str(params.data))

    async def on_message(self, message: Any) -> None:
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/tools/list_changed":
            self.list_changed.set()

    async def on_response(self, response: Any) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in self.session_ids:
            self.session_ids.append(sid)

    def http(self) -> Any:
        return httpx.AsyncClient(headers={"X-Sidecar-Task": self.task}, timeout=httpx.Timeout(10.0),
                                 event_hooks={"response": [self.on_response]})

    async def work(self, session: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"major": MAJOR}
        out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
        out["first"] = text_of(await session.call_tool("search", {"query": "refunds"}))
        try:
            await session.call_tool("delete_account", {"account": "acme"})
            out["refused"] = None
        except Exception as exc:  # what the agent's code sees
            out["refused"] = f"{type(exc).__name__}: {exc}"
        out["second"] = text_of(await session.call_tool("search", {"query": "invoices"}))
        if self.session_ids:  # the 2026-07-28 protocol has no session, and no GET stream to wait on
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.list_changed.wait(), NOTIFICATION_WAIT)
        out["list_changed"] = self.list_changed.is_set()
        out["logs"] = self.logs
        out["session_id"] = self.session_ids[0] if self.session_ids else None
        out["replay"] = await self.replay() if self.session_ids else None
        return out

    async def replay(self) -> dict[str, Any]:
        """The session id sent under another task, as a stolen id would be."""
        headers = {"Mcp-Session-Id": self.session_ids[0], "X-Sidecar-Task": self.other_task,
                   "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": "2025-06-18"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as raw:
            r = await raw.post(self.url, headers=headers, content=b'{"jsonrpc":"2.0","id":99,"method":"ping"}')
        return {"status": r.status_code, "body": r.json()}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


async def run_v1(agent: Agent) -> dict[str, Any]:
    async with agent.http() as http, streamable_http_client(agent.url, http_client=http) as (read, write, _):
        async with ClientSession(read, write, logging_callback=agent.on_log,
                                 message_handler=agent.on_message) as session:
            await session.initialize()
            return await agent.work(session)


async def run_v2(agent: Agent, mode: str) -> dict[str, Any]:
    async with agent.http() as http:
        transport = streamable_http_client(agent.url, http_client=http)
        async with Client(transport, mode=mode, logging_callback=agent.on_log,
                          message_handler=agent.on_message) as client:
            return await agent.work(client)


async def main(argv: list[str]) -> None:
    url, task, other = argv[1:4]
    mode = argv[4] if len(argv) > 4 else "legacy"
    agent = Agent(url, task, other)
    out = await (run_v1(agent) if MAJOR == 1 else run_v2(agent, mode))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv))
