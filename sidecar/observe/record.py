"""The one exit of every exchange: its metrics, then its one trust-decision event.

Every exchange passes through :meth:`Recorder.record` exactly once, refused or not. Refusals made
before any exchange began (a TLS handshake refused, a request the parser rejected, a connection
refused under overload) are recorded through the same function, as exchanges of their own.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from sidecar.errors import IdentityRefused, Refusal
from sidecar.exchange import AgentInfo, Exchange
from sidecar.observe.decision_log import Redactor, emit_event
from sidecar.observe.headers import HeaderCapture
from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.observe")

UPSTREAM_FAILURES = frozenset({"upstream_unreachable", "upstream_protocol_error", "upstream_timeout",
                               "upstream_answer_too_large", "upstream_answer_invalid"})
HANDSHAKE_REASONS = frozenset({"no_client_cert", "foreign_trust_domain"})  # their own reason codes


class Recorder:
    """Records exchanges for one agent, redacted by its sidecar's own redactor (its config's secrets)."""

    def __init__(self, metrics: Metrics, agent: AgentInfo, redactor: Redactor | None = None,
                 headers: HeaderCapture | None = None) -> None:
        self.metrics, self.agent = metrics, agent
        self.redactor = redactor or Redactor()
        self.headers = headers
        self._pending: list[Exchange] = []

    def record_soon(self, ex: Exchange, loop: asyncio.AbstractEventLoop) -> None:
        """Record ``ex`` once the current step of the loop is over: the answer its handler returns is
        written first, so the agent does not wait for its metrics and event (a fifth of a request's
        instructions). In order, all pending ones in one callback; :meth:`flush` records them now. ``loop``:
        the running one, passed in (``get_running_loop`` costs a ``getpid`` system call)."""
        self._pending.append(ex)
        if len(self._pending) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Record every exchange :meth:`record_soon` left pending (also called at shutdown)."""
        pending, self._pending = self._pending, []
        for ex in pending:
            try:
                self.record(ex)
            except Exception:  # a defect in one event's making must not lose the others
                log.exception("record_failed", direction=ex.direction, decision_id=ex.decision_id)

    def record(self, ex: Exchange) -> None:
        m = self.metrics
        upstream = "agent" if ex.direction == "inbound" else m.upstream_label(ex.upstream)
        if ex.outcome == "refused" and ex.status is None and not ex.server_request:
            ex.status = 500  # a refusal that answered nothing: a defect
        m.observe_request(ex.direction, ex.decision, upstream, time.perf_counter() - ex.started)
        if ex.rule_id is not None:
            m.count_decision(ex.direction, ex.decision, ex.rule_id)
        if ex.direction == "outbound" and ex.decision == "allow" and ex.delegation in m.delegated:
            m.delegated[ex.delegation].inc()
        if ex.reason in UPSTREAM_FAILURES:
            m.upstream_errors.labels(upstream, ex.reason).inc()
        facts = ex.facts
        recorded = self.headers.capture(facts.headers) if self.headers is not None and facts is not None else None
        emit_event(ex.event(self.agent, recorded, self.redactor), kept=ex.kept)

    def refused(self, direction: str, refusal: Refusal, *, protocol: str = "http") -> None:
        """A refusal outside any exchange (a connection, or a request never parsed): one event of its own."""
        ex = Exchange(direction, protocol=protocol)
        ex.refuse(refusal)
        self.record(ex)

    def handshake_refused(self, reason: str, message: str, peer: str) -> None:
        """A refused inbound handshake is a refused exchange too: counted, logged and one event."""
        self.metrics.tls_handshake_failures.labels("inbound", reason).inc()
        log.warning("tls_handshake_refused", listener="inbound", reason=reason, message=message, peer=peer)
        code = reason if reason in HANDSHAKE_REASONS else "peer_unverified"
        self.refused("inbound", IdentityRefused(code, message, detail=f"tls: {reason}"))
