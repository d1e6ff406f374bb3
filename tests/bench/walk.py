"""The walk of one outbound request through the sidecar's modules, file by file.

Run: python -m tests.bench.walk

Starts a real sidecar (one upstream with a static credential, one allowing rule), sends one GET
through the outbound listener, and prints each sidecar module the request's own code entered,
in order, with consecutive calls in the same module merged (a coroutine resumed after an await is
not a new entry). A module that appears twice was left and re-entered (docs/ARCHITECTURE.md explains the ones that are). Logging, metrics and
the event loop's own callbacks are left out: they are not the request's path.
"""

from __future__ import annotations

import asyncio
import sys
from inspect import CO_ASYNC_GENERATOR, CO_COROUTINE, CO_GENERATOR
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from tests.harness import SidecarHarness, Upstream

ROOT = str(Path(__file__).resolve().parents[2] / "sidecar")
QUIET = ("sidecar/observe/decision_log.py", "sidecar/observe/line_writer.py", "sidecar/observe/metrics.py",
         "sidecar/observe/loop.py")

# The orchestrator, the exchange's record, the runtime state and the foundation: used along the way, not stages.
NOT_STAGES = ("sidecar/pipeline.py", "sidecar/exchange.py", "sidecar/runtime.py", "sidecar/http/")


def module_of(frame: FrameType) -> str | None:
    path = frame.f_code.co_filename
    if not path.startswith(ROOT):
        return None
    rel = "sidecar" + path[len(ROOT):]
    return None if rel.endswith(QUIET) else rel


def trace_into(walk: list[tuple[str, list[str]]]) -> Any:
    started: set[int] = set()  # coroutine frames: a resumption after an await is not a new entry

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        module = module_of(frame)
        if module is None or id(frame) in started:
            return
        if frame.f_code.co_flags & (CO_COROUTINE | CO_ASYNC_GENERATOR | CO_GENERATOR):
            started.add(id(frame))
        if walk and walk[-1][0] == module:
            walk[-1][1].append(frame.f_code.co_name)
        else:
            walk.append((module, [frame.f_code.co_name]))
    return profile


async def main() -> None:
    upstream = await Upstream().start()
    tmp = Path(tempfile.mkdtemp(prefix="walk-"))
    config = {"agent": {"name": "walk"},
              "outbound": {"upstreams": {"api": {"url": upstream.url, "credential": "key"}}},
              "credentials": {"key": {"type": "static", "header": "X-API-Key", "value": {"value": "walk-secret"}}}}
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "read", "direction": "outbound", "upstream": "api", "methods": ["GET"], "effect": "allow"}]}
    h = await SidecarHarness(tmp, config, policy).start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{h.outbound}/api/v1/items") as warm:  # pools and caches filled first
            await warm.read()
        walk: list[tuple[str, list[str]]] = []
        sys.setprofile(trace_into(walk))
        try:
            async with session.get(f"{h.outbound}/api/v1/items") as response:
                await response.read()
        finally:
            sys.setprofile(None)
    await h.settle()
    await h.stop()
    await upstream.stop()
    seen: dict[str, int] = {}
    for step, (module, functions) in enumerate(walk, 1):
        seen[module] = seen.get(module, 0) + 1
        again = f"  (again: {seen[module]})" if seen[module] > 1 else ""
        print(f"{step:3d}  {module:34s} {', '.join(dict.fromkeys(functions))[:90]}{again}")
    print(f"{len(walk)} steps, {len(seen)} modules, {sum(n - 1 for n in seen.values())} re-entries")
    stages = [m for m, _ in walk if not m.startswith(NOT_STAGES)]
    merged = [m for i, m in enumerate(stages) if i == 0 or stages[i - 1] != m]
    print("stages, in order (the pipeline, the exchange record, runtime state and http/ left out):")
    print("  " + " -> ".join(m.removeprefix("sidecar/").removesuffix(".py") for m in merged))


if __name__ == "__main__":
    asyncio.run(main())
