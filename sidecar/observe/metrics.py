"""Every metric the sidecar exposes, declared once (prefix ``sidecar_``).

Label values are bounded sets: ``upstream`` is a configured upstream name or ``_unknown``,
``rule`` a configured rule id or ``default``, ``provider`` a configured credential name,
``reason`` a reason code. Label children for the known sets are bound at start-up
(``Histogram.observe`` through ``.labels()`` costs twice as much, PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN = "_unknown"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The one metrics registry of a sidecar process."""

    def __init__(self, upstreams: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.upstreams = frozenset(upstreams)
        self.requests = Counter("sidecar_requests", "Exchanges handled, by direction, decision and upstream.",
                                ["direction", "decision", "upstream"], registry=r)
        self.request_duration = Histogram("sidecar_request_duration_seconds", "Exchange duration.",
                                          ["direction", "upstream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.policy_decisions = Counter("sidecar_policy_decisions", "Policy decisions, by rule.",
                                        ["direction", "decision", "rule"], registry=r)
        self.credentials_issued = Counter("sidecar_credentials_issued", "Credentials minted or fetched.",
                                          ["provider", "type", "outcome"], registry=r)
        self.credential_cache = Counter("sidecar_credential_cache", "Credential cache lookups.",
                                        ["provider", "result"], registry=r)
        self.credential_fetch_duration = Histogram("sidecar_credential_fetch_duration_seconds",
                                                   "Time to mint or fetch a credential.", ["provider"],
                                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.standing_credentials = Gauge("sidecar_standing_credentials",
                                          "Standing (static, long-lived) credentials configured.", registry=r)
        self.ephemeral_credentials = Gauge("sidecar_ephemeral_credentials",
                                           "Short-lived credentials currently held.", registry=r)
        self.delegated_requests = Counter("sidecar_delegated_requests", "Requests made for a human.",
                                          ["delegation"], registry=r)
        self.revocations = Counter("sidecar_revocations", "Revocations applied, by kind.", ["kind"], registry=r)
        self.revocation_propagation = Histogram(
            "sidecar_revocation_propagation_seconds", "Receive time minus the publisher's timestamp.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.revocation_bus_up = Gauge("sidecar_revocation_bus_up", "1 when the revocation bus is connected.",
                                       registry=r)
        self.active_tasks = Gauge("sidecar_active_tasks", "Open tasks.", registry=r)
        self.approvals_pending = Gauge("sidecar_approvals_pending", "Requests held for approval.", registry=r)
        self.policy_reloads = Counter("sidecar_policy_reloads", "Policy reloads, by outcome.", ["outcome"],
                                      registry=r)
        self.identity_reloads = Counter("sidecar_identity_reloads", "Identity (SVID, bundle) reloads.",
                                        ["outcome"], registry=r)
        self.jwks_fetch_failures = Counter("sidecar_jwks_fetch_failures", "JWKS fetches that failed.",
                                           ["issuer"], registry=r)
        self.tls_handshake_failures = Counter("sidecar_tls_handshake_failures",
                                              "Refused or failed TLS handshakes.", ["listener", "reason"],
                                              registry=r)
        self.upstream_errors = Counter("sidecar_upstream_errors", "Upstream failures.", ["upstream", "reason"],
                                       registry=r)
        self._bind()

    def _bind(self) -> None:
        """Pre-bind the children the hot path uses, and make zero series visible."""
        self._requests: dict[tuple[str, str, str], object] = {}
        self._durations: dict[tuple[str, str], object] = {}
        self._decisions: dict[tuple[str, str, str], object] = {}  # bounded: rule ids are configured
        self._cache: dict[tuple[str, str], object] = {}  # bounded: providers are configured
        for direction in ("inbound", "outbound"):
            for upstream in (*self.upstreams, UNKNOWN, "agent"):
                self._durations[(direction, upstream)] = self.request_duration.labels(direction, upstream)
        for outcome in ("ok", "error"):
            self.policy_reloads.labels(outcome)
            self.identity_reloads.labels(outcome)
        self.revocation_bus_up.set(0)

    def upstream_label(self, name: str | None) -> str:
        return name if name in self.upstreams else UNKNOWN

    def observe_request(self, direction: str, decision: str, upstream: str, seconds: float) -> None:
        key = (direction, decision, upstream)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(direction, decision, upstream)
        child.inc()  # type: ignore[attr-defined]
        hist = self._durations.get((direction, upstream))
        if hist is None:
            hist = self._durations[(direction, upstream)] = self.request_duration.labels(direction, upstream)
        hist.observe(seconds)  # type: ignore[attr-defined]

    def count_decision(self, direction: str, decision: str, rule: str) -> None:
        key = (direction, decision, rule)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.policy_decisions.labels(direction, decision, rule)
        child.inc()  # type: ignore[attr-defined]

    def count_cache(self, provider: str, result: str) -> None:
        key = (provider, result)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = self.credential_cache.labels(provider, result)
        child.inc()  # type: ignore[attr-defined]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
