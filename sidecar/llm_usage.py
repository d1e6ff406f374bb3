"""Token budgets for LLM API calls, counted from the API's own ``usage``, and refusals an SDK shows.

A rule's ``budget: {tokens: N, per: T}`` gives every (rule, agent, task, principal) ``N`` tokens per
window of ``T`` seconds, counted from the ``usage`` the API reports in its answer: the JSON body, or
in a stream the chunk that carries it (chat completions' final chunk, the Responses API's
``response.completed`` event). A request is refused ``budget_exhausted`` (429, ``Retry-After`` the end
of the window) once the tokens used reach ``N``; the request that crosses the line is not cut, since
its usage is known only when it ends. :class:`TokenBudgets` is created once, outside the compiled
policy, so a reload keeps what was spent (like the rate limiter).

The Messages API (``protocol: anthropic``) reports usage in its JSON answer, and in a stream twice:
``message_start`` (the input tokens) and ``message_delta`` (the output so far); the input counts the
cache's tokens too (``cache_creation_input_tokens``, ``cache_read_input_tokens``). A stream's reports are
merged (the largest seen of each), so a later event that omits the input does not lower it.

Refusals are answered in the API's own error shape at the refusal's status: ``openai``'s
``{"error": {"message", "type", "code", "param"}}``, ``anthropic``'s ``{"type": "error", "error": {"type",
"message"}}``, so the SDK raises ``PermissionDeniedError`` (403) or ``RateLimitError`` (429) with the
sidecar's message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.errors import Refusal, RequestRefused, refusal_headers
from sidecar.http.sse import SseData

if TYPE_CHECKING:
    from sidecar.exchange import Exchange
    from sidecar.http.incoming import Answer, IncomingRequest
    from sidecar.policy.model import Budget

MAX_USAGE_BYTES = 16 * 1024 * 1024  # a JSON answer larger than this is not read for usage
MAX_BUDGETS = 100_000


@dataclass(slots=True)
class _Window:
    start: float
    used: int


class TokenBudgets:
    """Tokens used per key in the current window of its budget."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._windows: dict[Hashable, _Window] = {}
        self._clock = clock

    def check(self, key: Hashable, budget: Budget) -> None:
        """Refuse ``budget_exhausted`` when this key's window has no tokens left."""
        window = self._window(key, budget)
        if window.used >= budget.tokens:
            retry = max(1, math.ceil(window.start + budget.per - self._clock()))
            raise RequestRefused("budget_exhausted", f"llm: token budget of {budget.tokens} per {budget.per:g}s "
                                                     "is spent", retry_after=retry)

    def charge(self, key: Hashable, budget: Budget, tokens: int) -> None:
        self._window(key, budget).used += tokens

    def used(self, key: Hashable) -> int:
        window = self._windows.get(key)
        return window.used if window is not None else 0

    def _window(self, key: Hashable, budget: Budget) -> _Window:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= budget.per:
            if len(self._windows) >= MAX_BUDGETS:
                self._sweep(now, budget.per)
            window = self._windows[key] = _Window(now, 0)
        return window

    def _sweep(self, now: float, per: float) -> None:
        """Forget windows that have ended (they hold nothing a check would read)."""
        for key in [k for k, w in self._windows.items() if now - w.start >= per]:
            del self._windows[key]


def usage_observer(media_type: str, counted: Callable[[int, int], None]) -> Callable[[bytes, bool], bytes]:
    """A pass-through response filter that reports the answer's usage: (tokens in, tokens out), merged."""
    seen = [0, 0]

    def merged(tokens_in: int, tokens_out: int) -> None:
        seen[0], seen[1] = max(seen[0], tokens_in), max(seen[1], tokens_out)
        counted(seen[0], seen[1])

    return _observer(media_type, merged)


def _observer(media_type: str, counted: Callable[[int, int], None]) -> Callable[[bytes, bool], bytes]:
    if media_type == "text/event-stream":
        events = SseData()

        def observe_stream(chunk: bytes, final: bool) -> bytes:
            for data in events.feed(chunk):
                if data != b"[DONE]":
                    _report(data, counted)
            return chunk

        return observe_stream
    buffer = bytearray()

    def observe(chunk: bytes, final: bool) -> bytes:
        if len(buffer) <= MAX_USAGE_BYTES:
            buffer.extend(chunk)
        if final and len(buffer) <= MAX_USAGE_BYTES:
            _report(bytes(buffer), counted)
        return chunk

    return observe


def _report(data: bytes, counted: Callable[[int, int], None]) -> None:
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return  # not ours to judge: the client reads the answer; nothing is counted
    tokens = usage_of(answer)
    if tokens is not None:
        counted(*tokens)


def usage_of(answer: Any) -> tuple[int, int] | None:
    """(tokens in, tokens out) of an answer or stream event: chat's prompt/completion, the Responses
    API's input/output (also inside a ``response.completed`` event), embeddings' prompt tokens."""
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    for wrapper in ("response", "message"):  # the Responses API's response.completed, Messages' message_start
        if not isinstance(usage, dict) and isinstance(answer.get(wrapper), dict):
            usage = answer[wrapper].get("usage")
    if not isinstance(usage, dict):
        return None
    cached = [_count(usage.get(key, 0)) for key in ("cache_creation_input_tokens", "cache_read_input_tokens")]
    if None in cached:
        return None
    tokens_in = _count(usage.get("prompt_tokens", usage.get("input_tokens", 0)))
    tokens_out = _count(usage.get("completion_tokens", usage.get("output_tokens", 0)))
    if tokens_in is None or tokens_out is None:
        return None
    return tokens_in + sum(c for c in cached if c is not None), tokens_out


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def api_refusal(request: IncomingRequest, ex: Exchange, refusal: Refusal) -> Answer:
    """A refusal in the API's error shape, at its own status (the SDK's error class follows it)."""
    headers = refusal_headers(refusal)
    headers["Content-Type"] = "application/json"
    kind = "rate_limit_error" if refusal.status == 429 else "invalid_request_error" if refusal.status == 400 \
        else "permission_error"
    message = f"{refusal.message} (reason: {refusal.reason}, rule: {ex.rule_id}, decision: {ex.decision_id})"
    body: dict[str, object]
    if ex.protocol == "anthropic":
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": refusal.reason, "param": None}}
    return request.respond(refusal.status, None, headers, orjson.dumps(body))
