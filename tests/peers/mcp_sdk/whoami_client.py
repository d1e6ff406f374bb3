"""An agent that knows nothing of OAuth: the official MCP SDK client (1.x or 2.x) calls ``whoami``. For tests.

    python tests/peers/mcp_sdk/whoami_client.py URL

Prints one JSON object: the tool's answer, or the error the agent's code saw.
"""

from __future__ import annotations

import asyncio
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


async def whoami(session: Any) -> str:
    result = await session.call_tool("whoami", {})
    return " ".join(getattr(block, "text", "") for block in result.content)


async def main(url: str) -> None:
    out: dict[str, Any] = {"major": MAJOR}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
            transport = streamable_http_client(url, http_client=http)
            if MAJOR == 1:
                async with transport as (read, write, _), ClientSession(read, write) as session:
                    await session.initialize()
                    out["answer"] = await whoami(session)
            else:
                async with Client(transport, mode="legacy") as client:
                    out["answer"] = await whoami(client)
    except Exception as exc:  # what the agent's code sees
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
