"""Structured logging: the trust-decision event and every other log line, JSON on stdout.

One line per event, rendered with orjson and handed in batches to a writer thread
(:mod:`sidecar.observe.line_writer`: a log line is the largest per-request cost after forwarding
itself, PERFORMANCE.md, and a stdout nobody reads must not stop the event loop). Timestamps are
formatted once per second.

Redaction: a :class:`Redactor` masks JWTs, bearer credentials, PEM private keys and every
configured secret value, wherever they appear (including exception texts someone passed in).
Each sidecar holds its own, with its own config's secrets: its trust-decision events are
redacted by it (``Exchange.event``, as it builds them), so one sidecar's secrets never mask words in another's
events. Every other log line passes :data:`REDACTOR`, the process-wide safety net, which masks
the secrets of every sidecar running in the process (attached at start, detached at stop): a
line logged outside any sidecar's reach still cannot carry one.

Bounds: strings an agent or a caller chose (a path, a host, a task id, an MCP tool name...) are
cut to a fixed number of characters in the trust-decision event (:data:`EVENT_BOUNDS`, stated in
``schemas/trust_decision.schema.json`` as ``maxLength``; ``Exchange.event`` applies them as it builds
the event, so that the line is one ``orjson.dumps`` of what it built) and to :data:`LOG_STRING_MAX` in every
other line, ending with a marker that says how long they were: a 2 MiB tool name cannot make a
2 MiB line.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
from typing import IO, Any, Awaitable, Iterable, MutableMapping

import orjson
import structlog

from sidecar.observe.line_writer import CLOCK, FLUSH_AFTER, BufferedLineWriter

__all__ = ["CLOCK", "FLUSH_AFTER", "BufferedLineWriter", "REDACTOR", "WRITER", "Redactor", "admission",
           "configure_logging", "emit_event"]

REDACTED = "<redacted>"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic|aws4-hmac-sha256)\s+[^\s,;\"']{8,}")
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


LOG_STRING_MAX = 4096
# Per event section, the request-derived strings and their bounds in characters (marker included).
EVENT_BOUNDS: dict[str, dict[str, int]] = {
    "target": {"method": 64, "host": 256, "path": 2048, "mcp_method": 256, "mcp_tool": 256, "copy_source": 2048,
               "mcp_resource": 2048, "mcp_prompt": 256, "mcp_server_request": 256, "query": 2048,
               "grpc_service": 256, "grpc_method": 256, "a2a_method": 64, "a2a_task_id": 256,
               "a2a_context_id": 256, "a2a_push_url": 2048, "llm_model": 256},
    "task": {"id": 64, "trigger": 256},
    "caller": {"id": 2048},
    "principal": {"iss": 1024, "sub": 1024},
}
REASON_DETAIL_MAX = 1024
ACT_CHAIN_ITEM_MAX = 1024


def bounded(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and a marker saying it was cut."""
    if len(text) <= limit:
        return text
    marker = f"...[truncated from {len(text)} chars]"
    return text[:max(limit - len(marker), 0)] + marker


class Redactor:
    """Masks secrets in text: known secret values and anything shaped like a credential."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.register(values)

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def register(self, values: Iterable[str]) -> None:
        """Add configured secret values (long enough to be unambiguous) to the mask list."""
        merged = set(self._secrets) | {v for v in values if v and len(v) >= 6}
        self._secrets = tuple(sorted(merged, key=len, reverse=True))

    def masks(self, value: str) -> bool:
        """Would :meth:`text` change ``value``?"""
        return self.text(value) != value

    def text(self, value: str) -> str:
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if "PRIVATE KEY" in value:
            value = _PEM.sub(REDACTED, value)
        if " " in value or "\t" in value:  # "Bearer <token>" needs whitespace; paths and names have none
            value = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return bounded(self.text(value), LOG_STRING_MAX)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


class SafetyNet(Redactor):
    """The process-wide redactor of log lines: the secrets of every sidecar attached to it."""

    def __init__(self) -> None:
        super().__init__()
        self._attached: list[Redactor] = []

    def attach(self, redactor: Redactor) -> None:
        self._attached.append(redactor)
        self._merge()

    def detach(self, redactor: Redactor) -> None:
        """A stopped sidecar's secrets leave the net (another sidecar may still hold the same value)."""
        self._attached = [r for r in self._attached if r is not redactor]
        self._merge()

    def _merge(self) -> None:
        self._secrets = ()
        self.register(s for r in self._attached for s in r.secrets)


REDACTOR = SafetyNet()


WRITER = BufferedLineWriter()


class _LineLogger:
    """The structlog logger: hands rendered bytes to the buffered writer."""

    def msg(self, message: bytes) -> None:
        WRITER.write(message + b"\n")

    debug = info = warning = error = critical = exception = log = msg


def _redact_processor(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {k: REDACTOR.value(v) for k, v in event.items()}


def _timestamp(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("ts", CLOCK.now())
    return event


def _exc_info(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Exceptions are logged by type only: their texts may carry what they were handling."""
    exc = event.pop("exc_info", None)
    if exc:
        err = exc if isinstance(exc, BaseException) else sys.exc_info()[1]
        if err is not None:
            event["error_type"] = type(err).__name__
    return event


def configure_logging(level: str = "info", stream: IO[bytes] | None = None) -> None:
    """Configure structlog: JSON lines, redacted, buffered, on stdout (or ``stream``).

    ``Sidecar.start`` then sets the writer's ``logging.on_backpressure`` policy from the config."""
    global WRITER
    WRITER.close()
    WRITER = BufferedLineWriter(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            _exc_info,
            _redact_processor,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *args: _LineLogger(),
        cache_logger_on_first_use=False,
    )
    _quiet_stdlib()


def _quiet_stdlib() -> None:
    """aiohttp's own loggers print tracebacks that can contain request lines: route them away."""
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.client", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = False


def clean(text: str, limit: int, redactor: Redactor | None = None) -> str:
    """Request-derived text as it may be written: redacted (by ``redactor``, default the safety net), then bounded."""
    return bounded((redactor or REDACTOR).text(text), limit)


_SECRET_PARAM = re.compile(r"(?i)(^|[&;])([^=&;]*(?:token|key|secret|passw|signature|sig|credential|auth)[^=&;]*=)"
                           r"[^&;]*")


def redact_query(query: str) -> str:
    """``target.query``: the value of every parameter named like a secret (``api_key=``, ``X-Amz-Signature=``) masked."""
    return _SECRET_PARAM.sub(lambda m: m.group(1) + m.group(2) + REDACTED, query) if "=" in query else query


_SECRET_KEY = re.compile(r"(?i)token|key|secret|passw|signature|credential|auth")
ARGUMENTS_MAX = 2048  # bytes of target.mcp_arguments as JSON; larger arguments are logged as null


def logged_arguments(arguments: dict[str, Any]) -> dict[str, Any] | None:
    """``target.mcp_arguments``: a tools/call's arguments with every value under a key named like a secret
    (``api_key``, ``password``) masked and every string redacted; null when they are larger than
    :data:`ARGUMENTS_MAX` as JSON (what replay needs stays small; the approval keeps the whole)."""
    masked = _masked(arguments)
    return masked if len(orjson.dumps(masked)) <= ARGUMENTS_MAX else None


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(k) else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return REDACTOR.value(value)


def _flush_at_exit() -> None:
    """The last lines (sidecar_stopped) reach stdout, or stderr says how many could not."""
    if not WRITER.flush():
        print(f"log: stdout did not take the last {WRITER.stats().queued_bytes} bytes of the log before exit",
              file=sys.stderr)


atexit.register(_flush_at_exit)


def admission() -> Awaitable[None] | None:
    """None while the log can take a new exchange's event; else what the exchange awaits (or is refused by)."""
    return WRITER.admission()


def emit_event(event: dict[str, Any], *, kept: bool = False) -> None:
    """Write one trust-decision event (``Exchange.event``: its request-derived text already redacted and
    bounded, so this is one ``orjson.dumps`` and a buffered write).

    ``kept``: the exchange was let in by :func:`admission`, so its event is never dropped under
    ``block`` or ``refuse``."""
    WRITER.write(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE), kept=kept)
