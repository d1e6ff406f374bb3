"""An agent using resources, prompts, tool arguments and sampling with the official MCP SDK (1.x or 2.x), for tests.

Run with the Python of the environment whose SDK major is to be tested::

    python tests/peers/mcp_sdk/rules_client.py URL

It lists and reads resources, lists and gets prompts, calls ``lookup`` for two regions and ``ask_model``
(the server then asks this agent for a sampling, which the callback answers), each refusal caught as the
agent's code sees it. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from mcp import types

try:
    import httpx2 as httpx
    from mcp import Client

    MAJOR = 2
except ImportError:
    import httpx  # type: ignore[no-redef]

    from mcp import ClientSession

    MAJOR = 1
from mcp.client.streamable_http import streamable_http_client


class Agent:
    def __init__(self) -> None:
        self.sampled: list[str] = []

    async def sampling(self, context: Any, params: Any) -> types.CreateMessageResult:
        self.sampled.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", model="stub-model",
                                         content=types.TextContent(type="text", text="forty-two"))

    async def work(self, session: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"major": MAJOR}
        out["resources"] = sorted(str(r.uri) for r in (await session.list_resources()).resources)
        out["readme"] = (await session.read_resource("docs://readme")).contents[0].text
        out["plan"] = await refused(lambda: session.read_resource("docs://internal/plan"))
        out["prompts"] = sorted(p.name for p in (await session.list_prompts()).prompts)
        out["summarize"] = (await session.get_prompt("summarize", {"text": "x"})).messages[0].content.text
        out["leak"] = await refused(lambda: session.get_prompt("leak_secrets"))
        out["us"] = text_of(await session.call_tool("lookup", {"region": "US"}))
        out["eu"] = await refused(lambda: session.call_tool("lookup", {"region": "EU"}))
        out["ask"] = text_of(await session.call_tool("ask_model", {"question": "meaning of life?"}))
        out["sampled"] = self.sampled
        return out


async def refused(send: Callable[[], Awaitable[Any]]) -> str | None:
    try:
        result = await send()
    except Exception as exc:  # what the agent's code sees
        return f"{type(exc).__name__}: {exc}"
    return f"not refused: {result}"


def text_of(result: Any) -> str:
    if getattr(result, "isError", False):
        return "error: " + " ".join(getattr(block, "text", "") for block in result.content)
    return " ".join(getattr(block, "text", "") for block in result.content)


async def main(url: str) -> None:
    agent = Agent()
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        transport = streamable_http_client(url, http_client=http)
        if MAJOR == 1:
            async with transport as (read, write, _), ClientSession(read, write,
                                                                    sampling_callback=agent.sampling) as session:
                await session.initialize()
                out = await agent.work(session)
        else:
            async with Client(transport, mode="legacy", sampling_callback=agent.sampling) as client:
                out = await agent.work(client)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
