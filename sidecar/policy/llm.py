"""What policy sees of a call to an LLM API (``protocol: openai`` or ``anthropic``): model, streaming, token cap.

The meaning of an LLM call sits in its JSON body, so the body of a POST to one of the API's
endpoints is parsed with the same strict reader as MCP's (:func:`sidecar.policy.mcp.loads_strict`:
no duplicate keys, no BOM, no NaN, bounded nesting) and refused ``bad_request`` when it does not
parse: a body the sidecar cannot read is not one it can budget or decide on.

=====================  ==================================================================
endpoint               what is read
=====================  ==================================================================
``chat/completions``   ``model``, ``stream``, ``max_completion_tokens`` (or the older
                       ``max_tokens``; both at once must agree)
``responses``          ``model``, ``stream``, ``max_output_tokens``
``embeddings``         ``model``
``messages``           (``protocol: anthropic``, the Messages API) ``model``, ``stream``,
                       ``max_tokens`` (required, as the API requires it)
=====================  ==================================================================

Other paths of the upstream (``GET /models``) are plain HTTP. ``model`` is a required string,
``stream`` a boolean, a token cap a non-negative integer; anything else is refused rather than
guessed at (a string ``"true"`` that one reader takes as streaming and another does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.errors import RequestRefused
from sidecar.policy.mcp import MAX_DEPTH, MAX_NAME_CHARS, check_media_type, checked_text, loads_strict

ENDPOINTS: dict[str, tuple[str, ...]] = {  # path suffix -> the body fields that cap output tokens
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/responses": ("max_output_tokens",),
    "/embeddings": (),
}
ANTHROPIC_ENDPOINTS: dict[str, tuple[str, ...]] = {"/messages": ("max_tokens",)}
PROTOCOL_ENDPOINTS = {"openai": ENDPOINTS, "anthropic": ANTHROPIC_ENDPOINTS}
LLM_PROTOCOLS = frozenset(PROTOCOL_ENDPOINTS)
STREAMING = frozenset({"/chat/completions", "/responses", "/messages"})
CAP_REQUIRED = frozenset({"/messages"})  # the Messages API refuses a call without max_tokens
# where the agent's own API key would travel besides Authorization (stripped by default): never forwarded,
# unless the upstream's pass_headers names it (a credential of the upstream's own replaces it)
AGENT_KEY_HEADERS: dict[str, tuple[str, ...]] = {"anthropic": ("x-api-key",)}


@dataclass(frozen=True, slots=True)
class LlmCall:
    """One parsed LLM API request: ``llm.*`` in CEL."""

    endpoint: str  # "chat/completions" | "responses" | "embeddings"
    model: str
    stream: bool
    max_tokens: int | None


def endpoint_of(path: str, protocol: str = "openai") -> str | None:
    """The API endpoint a canonical path ends in, or None for any other path."""
    return next((suffix for suffix in PROTOCOL_ENDPOINTS[protocol] if path.endswith(suffix)), None)


def _refuse(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"llm: {message}")


def parse_llm_request(body: bytes, content_type: str | None, endpoint: str, max_bytes: int) -> LlmCall:
    """One strict JSON request body of an LLM endpoint -> LlmCall, or RequestRefused."""
    if len(body) > max_bytes:
        raise RequestRefused("body_too_large", f"llm: body larger than {max_bytes} bytes")
    try:
        check_media_type(content_type)
        obj = loads_strict(body, MAX_DEPTH)
        if not isinstance(obj, dict):
            raise _refuse("body must be a JSON object")
        model = checked_text(obj.get("model"), "model", MAX_NAME_CHARS)
    except RequestRefused as refusal:
        raise RequestRefused(refusal.reason, "llm: " + refusal.message.removeprefix("mcp: ")) from None
    stream = obj.get("stream", False)
    if not isinstance(stream, bool) or (stream and endpoint not in STREAMING):
        raise _refuse("stream must be true or false (and only where the endpoint streams)")
    caps = ENDPOINTS[endpoint] if endpoint in ENDPOINTS else ANTHROPIC_ENDPOINTS[endpoint]
    max_tokens = _max_tokens(obj, caps)
    if max_tokens is None and endpoint in CAP_REQUIRED:
        raise _refuse(f"{caps[0]} is required")
    return LlmCall(endpoint.lstrip("/"), model, stream, max_tokens)


def _max_tokens(obj: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The output-token cap, from whichever of its names the body uses (they must agree)."""
    values = {obj[key] for key in keys if obj.get(key) is not None}
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _refuse(f"{' or '.join(keys)} must be a non-negative integer")
    if len(values) > 1:
        raise _refuse(f"{' and '.join(keys)} must agree")
    return values.pop() if values else None
