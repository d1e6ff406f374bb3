"""A loopback stand-in for the OpenAI API, the upstream only: the client in tests is the real ``openai`` SDK.

It answers ``POST /v1/chat/completions`` (JSON, or SSE chunks ending in the usage chunk the API sends
when ``stream_options.include_usage`` is set), ``/v1/responses`` (JSON, or the event stream ending in
``response.completed`` with its usage) and ``/v1/embeddings``, each reporting :data:`TOKENS_IN` prompt
and :data:`TOKENS_OUT` completion tokens, in the API's own shapes. Like the API, it compresses its
answers (gzip or deflate) for a client that accepts that, as the SDK's httpx does by default.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.harness import Upstream

TOKENS_IN, TOKENS_OUT = 12, 18
WORDS = ("Hello", " from", " the", " stub")


def chat_answer(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "".join(WORDS)}}],
            "usage": {"prompt_tokens": TOKENS_IN, "completion_tokens": TOKENS_OUT,
                      "total_tokens": TOKENS_IN + TOKENS_OUT}}


def chat_chunks(model: str, with_usage: bool) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
              for word in WORDS]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if with_usage:  # the final chunk: no choices, the whole call's usage
        chunks.append({**base, "choices": [], "usage": chat_answer(model)["usage"]})
    return chunks


def response_answer(model: str) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": "".join(WORDS), "annotations": []}]}],
            "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": TOKENS_IN, "output_tokens": TOKENS_OUT, "total_tokens": TOKENS_IN + TOKENS_OUT,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}


async def sse(request: web.Request, events: list[tuple[str | None, dict[str, Any]]]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.enable_compression()
    await response.prepare(request)
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        await response.write(f"{head}data: {json.dumps(data)}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write(b"data: [DONE]\n\n")
    return response


async def handle(request: web.Request) -> web.StreamResponse:
    response = await answer(request)
    if not response.prepared:
        response.enable_compression()  # gzip or deflate when the request accepts it, else identity
    return response


async def answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model, stream = body["model"], body.get("stream", False)
    if request.path.endswith("/chat/completions"):
        if not stream:
            return web.json_response(chat_answer(model))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await sse(request, [(None, chunk) for chunk in chat_chunks(model, usage)])
    if request.path.endswith("/responses"):
        answer = response_answer(model)
        if not stream:
            return web.json_response(answer)
        return await sse(request, [("response.created", {"type": "response.created", "sequence_number": 0,
                                                         "response": {**answer, "status": "in_progress",
                                                                      "usage": None}}),
                                   ("response.completed", {"type": "response.completed", "sequence_number": 1,
                                                           "response": answer})])
    return web.json_response({"object": "list", "model": model,
                              "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                              "usage": {"prompt_tokens": TOKENS_IN, "total_tokens": TOKENS_IN}})


def openai_stub() -> Upstream:
    return Upstream(handle)
