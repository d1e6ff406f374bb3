"""Structured logging: the trust-decision event and every other log line, JSON on stdout.

One line per event, rendered with orjson and written to a buffer that is flushed at the
end of the current event-loop iteration (a log line is the largest per-request cost after
forwarding itself, PERFORMANCE.md). Timestamps are formatted once per second.

Redaction: every line passes :func:`redact`, which masks JWTs, bearer credentials, PEM
private keys and every configured secret value, wherever they appear (including exception
texts someone passed in).

Bounds: strings an agent or a caller chose (a path, a host, a task id, an MCP tool name...) are
cut to a fixed number of characters in the trust-decision event (:data:`EVENT_BOUNDS`, stated in
``schemas/trust_decision.schema.json`` as ``maxLength``) and to :data:`LOG_STRING_MAX` in every
other line, ending with a marker that says how long they were: a 2 MiB tool name cannot make a
2 MiB line.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any, Iterable

import orjson
import structlog

REDACTED = "<redacted>"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic|aws4-hmac-sha256)\s+[^\s,;\"']{8,}")
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


LOG_STRING_MAX = 4096
# Per event section, the request-derived strings and their bounds in characters (marker included).
EVENT_BOUNDS: dict[str, dict[str, int]] = {
    "target": {"method": 64, "host": 256, "path": 2048, "mcp_method": 256, "mcp_tool": 256, "copy_source": 2048,
               "query": 2048},
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

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def register(self, values: Iterable[str]) -> None:
        """Add configured secret values (long enough to be unambiguous) to the mask list."""
        merged = set(self._secrets) | {v for v in values if v and len(v) >= 6}
        self._secrets = tuple(sorted(merged, key=len, reverse=True))

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


REDACTOR = Redactor()


class _Clock:
    """RFC 3339 UTC timestamps, with the second-resolution prefix formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


CLOCK = _Clock()


FLUSH_AFTER = 0.02  # seconds: at most this much of the log waits in memory
FLUSH_BYTES = 64 * 1024


class BufferedLineWriter:
    """Lines into a buffer, flushed every FLUSH_AFTER seconds or FLUSH_BYTES (at once outside a loop).

    Under load: one write and flush per batch instead of per line. A line after a quiet spell
    (nothing flushed for FLUSH_AFTER) is written at once: at an agent's sporadic pace a timer
    per line would cost a wake-up of its own, and the line would wait for nothing.
    ``flush()`` is also called on shutdown.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._flushed = 0.0  # time.monotonic() of the last flush

    @property
    def stream(self) -> IO[bytes]:
        return self._stream or sys.stdout.buffer

    def write(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
            return
        if self._scheduled:
            return
        if time.monotonic() - self._flushed >= FLUSH_AFTER:
            self.flush()
            return
        try:
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            self._scheduled = True
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        self._flushed = time.monotonic()
        self._size = 0
        lines, self._lines = self._lines, []
        if lines:
            stream = self.stream
            stream.write(b"".join(lines))
            stream.flush()


WRITER = BufferedLineWriter()


class _LineLogger:
    """The structlog logger: hands rendered bytes to the buffered writer."""

    def msg(self, message: bytes) -> None:
        WRITER.write(message + b"\n")

    debug = info = warning = error = critical = exception = log = msg


def _redact_processor(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    return {k: REDACTOR.value(v) for k, v in event.items()}


def _timestamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("ts", CLOCK.now())
    return event


def _exc_info(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Exceptions are logged by type only: their texts may carry what they were handling."""
    exc = event.pop("exc_info", None)
    if exc:
        err = exc if isinstance(exc, BaseException) else sys.exc_info()[1]
        if err is not None:
            event["error_type"] = type(err).__name__
    return event


def configure_logging(level: str = "info", stream: IO[bytes] | None = None) -> None:
    """Configure structlog: JSON lines, redacted, buffered, on stdout (or ``stream``)."""
    global WRITER
    WRITER = BufferedLineWriter(stream)
    atexit.register(WRITER.flush)  # the last lines (sidecar_stopped) reach stdout
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


def clean(text: str, limit: int) -> str:
    """Request-derived text as it may be written: redacted, then bounded."""
    return bounded(REDACTOR.text(text), limit)


_SECRET_PARAM = re.compile(r"(?i)(^|[&;])([^=&;]*(?:token|key|secret|passw|signature|sig|credential|auth)[^=&;]*=)"
                           r"[^&;]*")


def redact_query(query: str) -> str:
    """``target.query``: the value of every parameter named like a secret (``api_key=``, ``X-Amz-Signature=``) masked."""
    return _SECRET_PARAM.sub(lambda m: m.group(1) + m.group(2) + REDACTED, query) if "=" in query else query


def emit_event(event: dict[str, Any]) -> None:
    """Write one trust-decision event; every field that carries request-derived text is redacted and bounded."""
    target = event.get("target")
    if target is not None and target.get("query"):
        target["query"] = redact_query(target["query"])
    detail = event.get("reason_detail")
    if detail:
        event["reason_detail"] = clean(detail, REASON_DETAIL_MAX)
    for section, bounds in EVENT_BOUNDS.items():
        fields = event.get(section)
        if fields is None:
            continue
        for key, limit in bounds.items():
            value = fields.get(key)
            if value:
                fields[key] = clean(value, limit)
    if event.get("act_chain"):
        event["act_chain"] = [clean(actor, ACT_CHAIN_ITEM_MAX) for actor in event["act_chain"]]
    WRITER.write(orjson.dumps(event) + b"\n")
