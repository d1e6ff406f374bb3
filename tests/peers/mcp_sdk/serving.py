"""Serving an SDK-built ASGI app on a bound socket for the peer scripts beside this file (imported by them as
``serving``: each runs with its own SDK environment's Python, the script's folder first on its path)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn


async def serve(app: Any, sock: socket.socket, **config: Any) -> None:
    """Serve ``app`` on ``sock`` (uvicorn), print ``PORT <n>`` once listening, and run until killed."""
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    serving = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        await asyncio.sleep(0.02)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await serving
