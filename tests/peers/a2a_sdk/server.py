"""An A2A agent built with the official ``a2a-sdk`` (1.x: the A2A 1.0 JSON-RPC binding), for tests.

Run with the test environment's Python::

    python tests/peers/a2a_sdk/server.py

It serves JSON-RPC at ``/`` and its agent card at the well-known path on 127.0.0.1 (a free port),
prints ``PORT <n>`` once listening, and runs until killed. Every message opens a task that works
in three artifact chunks ("step 0".."step 2"), a little apart so that a stream arrives event by
event, then completes. The v0.3 method names are served on the same endpoint.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryPushNotificationConfigStore, InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from starlette.applications import Starlette

STEPS = 3


class Planner(AgentExecutor):
    """Plans in three steps, each an artifact chunk of one task."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        for step in range(STEPS):
            await asyncio.sleep(0.05)
            await updater.add_artifact([new_text_part(f"step {step}")], artifact_id="plan", append=step > 0,
                                       last_chunk=step == STEPS - 1)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def card(url: str) -> AgentCard:
    return AgentCard(name="planner", description="plans", version="1.0",
                     supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
                     capabilities=AgentCapabilities(streaming=True, push_notifications=True),
                     default_input_modes=["text/plain"], default_output_modes=["text/plain"],
                     skills=[AgentSkill(id="plan", name="plan", description="plans a trip", tags=["plan"])])


async def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    agent = card(f"http://127.0.0.1:{port}/")
    handler = DefaultRequestHandler(Planner(), InMemoryTaskStore(), agent,
                                   push_config_store=InMemoryPushNotificationConfigStore())
    app: Any = Starlette(routes=[*create_agent_card_routes(agent),
                                 *create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True)])
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        await asyncio.sleep(0.02)
    print(f"PORT {port}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main())
