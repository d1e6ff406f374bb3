"""Strict JSON-RPC parsing for ``protocol: a2a``: what policy sees of an agent-to-agent call.

The JSON-RPC envelope is read exactly as MCP's is (:mod:`sidecar.policy.mcp`: one object, no
duplicate or case-variant keys, no BOM, no NaN, bounded nesting, ``rpc.`` reserved); this module adds
what A2A means inside it. Both spellings the current ``a2a-sdk`` speaks are accepted, the A2A 1.0
methods (``SendMessage``) and the previous version's (``message/send``); policy and events see the
1.0 name (:data:`METHODS`), and a rule may name either. A method outside the table is refused: an
A2A server dispatches on this closed set, so anything else is a call policy cannot read.

From the params, policy reads (``a2a.*`` in CEL):

- ``task_id``: ``message.taskId`` of a message, ``id`` of a task request, ``taskId`` (or 0.3's ``id``)
  of a push-notification request; the sidecar binds task ids to the agent that created them;
- ``context_id`` and ``metadata`` of the message;
- ``part_kinds``: each part's kind, ``text``, ``file`` (1.0's ``raw`` or ``url``, 0.3's ``file``) or
  ``data``. A part must carry exactly one content member, and a 0.3 ``kind`` must say the same: a part
  two readers could take for different kinds is refused;
- ``push_url``: the webhook a push-notification config registers (``https`` only, no userinfo), an
  SSRF vector the rule's ``a2a.push_hosts`` must list.

Protobuf JSON accepts a field's camelCase and snake_case names; a message carrying both is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from yarl import URL

from sidecar.errors import RequestRefused
from sidecar.policy.mcp import MAX_DEPTH, MAX_NAME_CHARS, RpcRef, RpcRefused, check_envelope, check_media_type, \
    checked_text, loads_strict

# the A2A 1.0 JSON-RPC method -> the previous (0.3) spec version's name, where it had one
METHODS: dict[str, str | None] = {
    "SendMessage": "message/send",
    "SendStreamingMessage": "message/stream",
    "GetTask": "tasks/get",
    "ListTasks": None,
    "CancelTask": "tasks/cancel",
    "SubscribeToTask": "tasks/resubscribe",
    "CreateTaskPushNotificationConfig": "tasks/pushNotificationConfig/set",
    "GetTaskPushNotificationConfig": "tasks/pushNotificationConfig/get",
    "ListTaskPushNotificationConfigs": "tasks/pushNotificationConfig/list",
    "DeleteTaskPushNotificationConfig": "tasks/pushNotificationConfig/delete",
    "GetExtendedAgentCard": "agent/getAuthenticatedExtendedCard",
}
CANONICAL: dict[str, str] = {**{m: m for m in METHODS}, **{old: new for new, old in METHODS.items() if old}}
MESSAGE_METHODS = frozenset({"SendMessage", "SendStreamingMessage"})
STREAMING_METHODS = frozenset({"SendStreamingMessage", "SubscribeToTask"})
_TASK_BY_ID = frozenset({"GetTask", "CancelTask", "SubscribeToTask"})
_PUSH = frozenset({"CreateTaskPushNotificationConfig", "GetTaskPushNotificationConfig",
                   "ListTaskPushNotificationConfigs", "DeleteTaskPushNotificationConfig"})
_CONTENT_KINDS = {"text": "text", "raw": "file", "url": "file", "file": "file", "data": "data"}
MAX_PARTS = 1000


@dataclass(frozen=True, slots=True)
class A2aCall:
    """One parsed A2A request: what policy sees as ``a2a.*``."""

    method: str  # the A2A 1.0 name
    id: str | int | None
    is_notification: bool
    task_id: str | None = None
    context_id: str | None = None
    part_kinds: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    push_url: str | None = None

    @property
    def rpc(self) -> RpcRef:
        return RpcRef(self.id, not self.is_notification)


def _refuse(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"a2a: {message}")


def _as_a2a(refusal: RequestRefused) -> RequestRefused:
    """The shared JSON-RPC checks speak as mcp; here they speak as a2a."""
    return RequestRefused(refusal.reason, "a2a: " + refusal.message.removeprefix("mcp: "))


def parse_a2a_request(body: bytes, content_type: str | None, max_bytes: int, *,
                      max_depth: int = MAX_DEPTH) -> A2aCall:
    """One strict JSON-RPC 2.0 A2A request -> A2aCall, or RequestRefused (RpcRefused once its id is known)."""
    if len(body) > max_bytes:
        raise RequestRefused("body_too_large", f"a2a: body larger than {max_bytes} bytes")
    try:
        check_media_type(content_type)
        obj = check_envelope(loads_strict(body, max_depth))
    except RequestRefused as refusal:
        raise _as_a2a(refusal) from None
    ref = RpcRef(obj.get("id"), "id" in obj)
    try:
        return _request(obj)
    except RequestRefused as refusal:  # the id is known: answered as a JSON-RPC error
        raise RpcRefused(_as_a2a(refusal).message, ref) from None


class _Details(NamedTuple):
    task_id: str | None = None
    context_id: str | None = None
    part_kinds: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    push_url: str | None = None


def _request(obj: dict[str, Any]) -> A2aCall:
    sent = obj.get("method")
    if not isinstance(sent, str) or len(sent) > MAX_NAME_CHARS or sent not in CANONICAL:
        raise _refuse(f"method must be one of {', '.join(METHODS)} (or their previous names)")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise _refuse("params must be a JSON object")
    method = CANONICAL[sent]
    return A2aCall(method, obj.get("id"), "id" not in obj, *_details(method, sent, params))


def _details(method: str, sent: str, params: dict[str, Any]) -> _Details:
    """What each method's params say about its task, message and push URL."""
    if method in MESSAGE_METHODS:
        return _message_details(params)
    if method == "ListTasks":
        return _Details(context_id=_optional_text(params, "contextId"))
    if method in _TASK_BY_ID:
        return _Details(task_id=_required_text(params, "id"))
    if method in _PUSH:
        return _Details(task_id=_push_task_id(params, sent), push_url=_push_url(params))
    return _Details()


def _message_details(params: dict[str, Any]) -> _Details:
    message = _member(params, "message")
    if not isinstance(message, dict):
        raise _refuse("params.message must be a JSON object")
    metadata = _member(message, "metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _refuse("message.metadata must be a JSON object")
    config = _member(params, "configuration")
    if config is not None and not isinstance(config, dict):
        raise _refuse("params.configuration must be a JSON object")
    return _Details(_optional_text(message, "taskId"), _optional_text(message, "contextId"),
                    tuple(_part_kinds(message)), metadata, _push_url(config) if config is not None else None)


def _part_kinds(message: dict[str, Any]) -> Iterator[str]:
    parts = _member(message, "parts")
    if not isinstance(parts, list) or not parts:
        raise _refuse("message.parts must be a non-empty list")
    if len(parts) > MAX_PARTS:
        raise _refuse(f"a message may have at most {MAX_PARTS} parts")
    for i, part in enumerate(parts):
        yield _part_kind(part, i)


def _part_kind(part: Any, i: int) -> str:
    """The one kind a part's content says; a 0.3 ``kind`` must agree with it."""
    if not isinstance(part, dict):
        raise _refuse(f"message.parts[{i}] must be a JSON object")
    contents = [key for key in part if key in _CONTENT_KINDS]
    if len(contents) != 1:
        raise _refuse(f"message.parts[{i}] must carry exactly one of text, raw, url, file or data")
    kind = _CONTENT_KINDS[contents[0]]
    if "kind" in part and part["kind"] != kind:
        raise _refuse(f"message.parts[{i}].kind must say what its content is ({kind})")
    return kind


def _push_task_id(params: dict[str, Any], sent: str) -> str:
    """1.0 names the task ``taskId``; 0.3's get, list and delete named it ``id``."""
    previous = sent.startswith("tasks/") and not sent.endswith("/set")
    return _required_text(params, "id" if previous else "taskId")


def _push_url(config: dict[str, Any]) -> str | None:
    """The webhook URL a push config registers: 1.0's ``url`` (or inside the send configuration's
    ``taskPushNotificationConfig``), 0.3's ``pushNotificationConfig.url``."""
    for key in ("taskPushNotificationConfig", "pushNotificationConfig"):
        inner = _member(config, key)
        if inner is not None:
            if not isinstance(inner, dict):
                raise _refuse(f"{key} must be a JSON object")
            return _push_url(inner)
    raw = _optional_text(config, "url")
    return None if raw is None else checked_push_url(raw)


def checked_push_url(raw: str) -> str:
    """An https URL with a host and no userinfo, as the sidecar will show it to policy."""
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        raise _refuse("push notification url is not a URL") from None
    if url.scheme != "https" or not url.host or url.user is not None or url.password is not None:
        raise _refuse("push notification url must be https://host/... without userinfo")
    return str(url)


def _member(obj: dict[str, Any], camel: str) -> Any:
    """A field by its camelCase or snake_case name (protobuf JSON reads both); both at once is refused."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    if snake != camel and snake in obj:
        if camel in obj:
            raise _refuse(f"{camel} and {snake} name the same field")
        return obj[snake]
    return obj.get(camel)


def _optional_text(obj: dict[str, Any], camel: str) -> str | None:
    value = _member(obj, camel)
    if value is None:
        return None
    return checked_text(value, camel, MAX_NAME_CHARS)


def _required_text(obj: dict[str, Any], camel: str) -> str:
    value = _optional_text(obj, camel)
    if value is None:
        raise _refuse(f"params.{camel} is required")
    return value


def method_name(name: str) -> str | None:
    """A rule's method, either spelling -> the 1.0 name policy matches; None if A2A has no such method."""
    return CANONICAL.get(name)
