"""Filtering ``tools/list`` responses down to the tools the agent may call.

A JSON response is buffered (it is small) and filtered at its end; a server-sent events
response is filtered event by event as it streams. A response that cannot be parsed is not
passed on: the relay breaks off (fail closed) rather than show tools the policy hides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from sidecar.policy.mcp import SseToolsListFilter, filter_tools_list

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from sidecar.policy.engine import PolicySet
    from sidecar.policy.facts import Facts

MAX_TOOLS_LIST_BYTES = 4 * 1024 * 1024


def tools_list_filter(policy: PolicySet, facts: Facts,
                      headers: CIMultiDictProxy[str]) -> Callable[[bytes, bool], bytes]:
    """The filter for one response, keeping the tools this policy lets these facts call."""

    def allowed(tool: str) -> bool:
        return policy.mcp_tool_allowed(facts, tool)

    media = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media == "text/event-stream":
        sse = SseToolsListFilter(allowed)
        return lambda chunk, final: sse.feed(chunk) + (sse.close() if final else b"")
    if media == "application/json":
        return _buffered(allowed)
    return _refuse_all


def _refuse_all(chunk: bytes, final: bool) -> bytes:
    """A tools/list response in any other media type cannot be filtered: never pass it on."""
    raise ValueError("tools/list response is neither application/json nor text/event-stream")


def _buffered(allowed: Callable[[str], bool]) -> Callable[[bytes, bool], bytes]:
    parts: list[bytes] = []
    size = 0

    def feed(chunk: bytes, final: bool) -> bytes:
        nonlocal size
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_TOOLS_LIST_BYTES:
            raise ValueError("tools/list response too large to filter")
        return filter_tools_list(b"".join(parts), allowed) if final else b""

    return feed
