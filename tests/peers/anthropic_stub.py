"""A loopback stand-in for Anthropic's Messages API, the upstream only: the client in tests is the real ``anthropic``
SDK.

It answers ``POST /v1/messages`` as JSON, or (``stream: true``) as the API's event stream: ``message_start``
(with the input tokens), the text in ``content_block_delta`` events, ``message_delta`` (with the output tokens)
and ``message_stop``; each call reports :data:`TOKENS_IN` input and :data:`TOKENS_OUT` output tokens.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.harness import Upstream

TOKENS_IN, TOKENS_OUT = 12, 18
WORDS = ("Hello", " from", " the", " stub")


def message(model: str) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(WORDS)}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": TOKENS_IN, "output_tokens": TOKENS_OUT}}


def stream_events(model: str) -> list[dict[str, Any]]:
    start = {**message(model), "content": [], "stop_reason": None,
             "usage": {"input_tokens": TOKENS_IN, "output_tokens": 1}}
    return [{"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
              for word in WORDS),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": TOKENS_OUT}},
            {"type": "message_stop"}]


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(message(body["model"]))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in stream_events(body["model"]):
        await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    return response


def anthropic_stub() -> Upstream:
    return Upstream(handle)
