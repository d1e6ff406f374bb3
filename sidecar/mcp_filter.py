"""What reaches the agent of an MCP server's answer: lists filtered, server requests decided.

A JSON answer is read whole before anything of it is sent (bounded: larger, the exchange is refused
``upstream_answer_too_large`` and the upstream's connection closed unread; one it cannot read is refused
``upstream_answer_invalid``; either way the agent gets a JSON-RPC error, nothing of the answer); a
server-sent events answer (a POST's, or the GET stream, a resumed one too) event by event as it streams
(an event is bounded too). A list response keeps only what policy lets the agent use
(:mod:`sidecar.policy.mcp_responses`); a request the server makes of the agent (sampling, elicitation,
roots) is decided by the caller's ``server_request`` and, refused, taken out. A stream that cannot be read
is not passed on: the relay breaks it off (fail closed) rather than show what the policy hides or let a
server request through unread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from sidecar.errors import Refusal, UpstreamFailed
from sidecar.forward.relay import AnswerEnds, WholeAnswer
from sidecar.policy.mcp_responses import (LISTINGS, AnswerTooLarge, MessageFilter, ServerRequest, SseMessageFilter,
                                          filter_json)

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from sidecar.policy.engine import PolicySet
    from sidecar.policy.facts import Facts

MAX_LIST_BYTES = 4 * 1024 * 1024  # a list response larger than this cannot be filtered: refused
MAX_JSON_ANSWER_BYTES = 16 * 1024 * 1024  # any other JSON answer (a large resource read): read, then passed on
Filter = Callable[[bytes, bool], bytes]
Ending = Callable[[Refusal], bytes]  # the refusal -> the SSE event that ends the stream with it


def answer_filter(policy: PolicySet, facts: Facts, method: str | None, headers: CIMultiDictProxy[str],
                  server_request: ServerRequest, ending: Ending | None = None) -> Filter | WholeAnswer | None:
    """The filter for one MCP answer (status 200), or None where it carries no message to read. ``ending``: the
    last SSE event that ends a stream it cannot pass on (the request's JSON-RPC error); None: broken off."""
    listing = LISTINGS.get(method or "")
    allowed = None
    if listing is not None:
        uses = listing.uses

        def allowed(name: str) -> bool:
            return policy.mcp_allowed(facts, uses, name)

    messages = MessageFilter(listing, allowed, server_request)
    media = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media == "text/event-stream":
        return _sse(SseMessageFilter(messages), ending)
    if media == "application/json":
        strict = listing is not None
        def read(body: bytes) -> bytes:  # an empty one (a session DELETE's 200) carries no message
            return filter_json(body, messages, strict) if body.strip() else body

        return WholeAnswer(MAX_LIST_BYTES if strict else MAX_JSON_ANSWER_BYTES, read)
    return _refuse_all if listing is not None else None


def _refuse_all(chunk: bytes, final: bool) -> bytes:
    """A list response in any other media type cannot be filtered: never pass it on."""
    raise ValueError("an MCP list response is neither application/json nor text/event-stream")



def _sse(sse: SseMessageFilter, ending: Ending | None) -> Filter:
    def feed(chunk: bytes, final: bool) -> bytes:
        try:
            return sse.feed(chunk) + (sse.close() if final else b"")
        except Refusal as exc:
            if ending is None:
                raise
            reason = "upstream_answer_too_large" if isinstance(exc, AnswerTooLarge) else "upstream_answer_invalid"
            refusal = UpstreamFailed(reason, f"upstream: {exc.message}; the rest of the answer was not relayed")
            raise AnswerEnds(ending(refusal), exc.message) from None

    return feed
