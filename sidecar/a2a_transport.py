"""A2A task ids bound to the agent that created them, learned from the remote agent's answers.

An A2A server creates a task when it is sent a message, and names it in its answer (the JSON result,
or the events of a stream). The sidecar reads those answers as they pass, without changing a byte, and
binds every task id they name to whoever sent the message: on the outbound listener the agent and the
sidecar task (``X-Sidecar-Task``) it sent under, on the inbound listener the calling peer and the human
it acts for. A later request naming a task id (``GetTask``, ``CancelTask``, a message continuing the
task, a push-notification config) is refused ``unknown_task`` unless it comes from that owner: one
agent cannot read, cancel or steer another's task by guessing or replaying its id, and an id the
sidecar never saw created is refused the same way. The table is bounded (least recently used first
out) and an idle binding expires.

The agent card an agent serves through the inbound listener (``inbound.protocol: a2a``) is read as it
passes too (:func:`card_observer`): every endpoint URL it declares should be the address its caller
used to reach the sidecar (``https``, the same host and port), since a card naming any other endpoint
points callers around the sidecar's policy. Such a card is passed on unchanged and reported (a warning
and ``sidecar_a2a_card_mismatches``): the sidecar cannot know every name it is reached by (a Service
name, a pod IP), so a mismatch is an operator's misconfiguration to see, not proof of an attack.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from yarl import URL

from sidecar.errors import RequestRefused
from sidecar.http.sse import SseData
from sidecar.http.target import DEFAULT_PORTS

MAX_TASKS = 10_000
TASK_IDLE_TTL = 24 * 3600.0  # seconds a task id may go unused before it is forgotten
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a JSON answer larger than this is passed on unread (no binding)
Owner = tuple[str | None, ...]
_EVENTS = ("message", "statusUpdate", "artifactUpdate", "status_update", "artifact_update")
CARD_PATHS = frozenset({"/.well-known/agent-card.json", "/.well-known/agent.json"})  # current and legacy
_INTERFACES = ("supportedInterfaces", "supported_interfaces", "additionalInterfaces", "additional_interfaces")


class A2aTasks:
    """Task ids per upstream (``""`` for the inbound listener), each bound to one owner."""

    def __init__(self, *, max_tasks: int = MAX_TASKS, idle_ttl: float = TASK_IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._owners: OrderedDict[tuple[str, str], tuple[Owner, float]] = OrderedDict()
        self._max, self._ttl, self._clock = max_tasks, idle_ttl, clock

    def __len__(self) -> int:
        return len(self._owners)

    def check(self, upstream: str, task_id: str, owner: Owner, *, who: str = "agent and task") -> None:
        """Refuse a task id the sidecar did not see created for this owner (``who`` it is, in the message)."""
        key, now = (upstream, task_id), self._clock()
        bound = self._owners.get(key)
        if bound is None or bound[0] != owner or now - bound[1] > self._ttl:
            raise RequestRefused("unknown_task", f"a2a: the task id was not created through the sidecar by this {who}")
        self._owners[key] = (owner, now)
        self._owners.move_to_end(key)

    def bind(self, upstream: str, task_id: str, owner: Owner) -> None:
        """Bind a task id the remote agent named in its answer; one already bound keeps its owner."""
        key = (upstream, task_id)
        if key in self._owners and self._owners[key][0] != owner:
            return
        self._owners[key] = (owner, self._clock())
        self._owners.move_to_end(key)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def observer(self, upstream: str, owner: Owner, media_type: str) -> Callable[[bytes, bool], bytes]:
        """A pass-through response filter that binds the task ids the answer names."""
        learn = _Learner(lambda task_id: self.bind(upstream, task_id, owner))
        feed = learn.sse if media_type == "text/event-stream" else learn.json

        def observe(chunk: bytes, final: bool) -> bytes:
            feed(chunk, final)
            return chunk

        return observe


class _Learner:
    """Reads JSON-RPC answers (one JSON body, or SSE events) for the task ids their results name."""

    def __init__(self, bind: Callable[[str], None]) -> None:
        self._bind = bind
        self._buffer = bytearray()
        self._events = SseData(MAX_ANSWER_BYTES)

    def json(self, chunk: bytes, final: bool) -> None:
        if len(self._buffer) <= MAX_ANSWER_BYTES:
            self._buffer += chunk
        if final and len(self._buffer) <= MAX_ANSWER_BYTES:
            self._answer(bytes(self._buffer))

    def sse(self, chunk: bytes, final: bool) -> None:
        for data in self._events.feed(chunk):
            self._answer(data)

    def _answer(self, data: bytes) -> None:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # not ours to judge: the client reads the answer; nothing is bound
        if isinstance(answer, dict):
            for task_id in task_ids(answer.get("result")):
                self._bind(task_id)


def task_ids(result: Any) -> Iterator[str]:
    """The task ids an A2A result names: 1.0's ``task.id`` and events' ``taskId``, 0.3's ``kind: task``."""
    if not isinstance(result, dict):
        return
    if isinstance(result.get("taskId"), str):
        yield result["taskId"]
    task = result.get("task")
    if isinstance(task, dict) and isinstance(task.get("id"), str):
        yield task["id"]
    if result.get("kind") == "task" and isinstance(result.get("id"), str):
        yield result["id"]
    for key in _EVENTS:
        yield from task_ids(result.get(key))


def card_observer(host: str, port: int, on_mismatch: Callable[[list[str]], None]) -> Callable[[bytes, bool], bytes]:
    """A pass-through filter for an agent card: ``on_mismatch`` gets the endpoint URLs it declares that
    are not ``https://host:port`` (the address the caller reached the sidecar at), without userinfo or query."""
    buffer = bytearray()

    def observe(chunk: bytes, final: bool) -> bytes:
        if len(buffer) <= MAX_ANSWER_BYTES:
            buffer.extend(chunk)
        if final and len(buffer) <= MAX_ANSWER_BYTES:
            try:
                card = orjson.loads(bytes(buffer))
            except orjson.JSONDecodeError:
                return chunk  # not a card: the caller's SDK will say so
            astray = [_shown(url) for url in card_urls(card) if not _at(url, host, port)]
            if astray:
                on_mismatch(astray)
        return chunk

    return observe


def card_urls(card: Any) -> Iterator[str]:
    """The endpoint URLs an agent card declares: 0.3's ``url``, and each interface's ``url``."""
    if not isinstance(card, dict):
        return
    if isinstance(card.get("url"), str):
        yield card["url"]
    for key in _INTERFACES:
        interfaces = card.get(key)
        for interface in interfaces if isinstance(interfaces, list) else ():
            if isinstance(interface, dict) and isinstance(interface.get("url"), str):
                yield interface["url"]


def _at(raw: str, host: str, port: int) -> bool:
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        return False
    return url.scheme == "https" and (url.host or "").lower().rstrip(".") == host and (
        url.port or DEFAULT_PORTS["https"]) == port


def _shown(raw: str) -> str:
    """A card's URL as a log may show it: no userinfo, query or fragment (they could carry a secret)."""
    try:
        url = URL(raw)
        return str(url.with_user(None).with_query(None).with_fragment(None))[:256]
    except (ValueError, TypeError):
        return "<not a URL>"
