"""Every metric the sidecar exposes, declared once (prefix ``sidecar_``).

Label values are bounded sets: ``upstream`` is a configured upstream name or ``_unknown``,
``rule`` a configured rule id or ``default``, ``provider`` a configured credential name,
``reason`` a reason code. Label children for the known sets are bound at start-up
(``Histogram.observe`` through ``.labels()`` costs twice as much, PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from sidecar.observe import decision_log
from sidecar.observe.line_writer import LogStats

UNKNOWN = "_unknown"
AGENT_INFO_LABELS = ("name", "environment", "owner", "trust_level")
DELEGATIONS = ("delegated", "impersonated")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The one metrics registry of a sidecar process."""

    def __init__(self, upstreams: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.upstreams = frozenset(upstreams)
        # The per-request families are lock-free children rendered at scrape time (HotPath below):
        # prometheus_client's own children cost several µs per request in locks and checks.
        self.hot = HotPath()
        r.register(self.hot)
        self.credentials_issued = Counter("sidecar_credentials_issued", "Credentials minted or fetched.",
                                          ["provider", "type", "outcome"], registry=r)
        self.credential_fetch_duration = Histogram("sidecar_credential_fetch_duration_seconds",
                                                   "Time to mint or fetch a credential.", ["provider"],
                                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.standing_credentials = Gauge("sidecar_standing_credentials",
                                          "Standing (static, long-lived) credentials configured.", registry=r)
        self.ephemeral_credentials = Gauge("sidecar_ephemeral_credentials",
                                           "Short-lived credentials currently held.", registry=r)
        self.delegated_requests = Counter("sidecar_delegated_requests", "Requests made for a human.",
                                          ["delegation"], registry=r)
        self.delegated = {d: self.delegated_requests.labels(d) for d in DELEGATIONS}  # bound once: no labels() per request
        self.revocations = Counter("sidecar_revocations", "Revocations applied, by kind.", ["kind"], registry=r)
        self.revocation_propagation = Histogram(
            "sidecar_revocation_propagation_seconds", "Receive time minus the publisher's timestamp.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.revocation_bus_up = Gauge("sidecar_revocation_bus_up", "1 when the revocation bus is connected.",
                                       registry=r)
        self.fleet_registered = Gauge("sidecar_fleet_registered", "1 while this sidecar's last fleet heartbeat was "
                                      "written (its entry is live in the fleet inventory).", registry=r)
        self.fleet_heartbeats = Counter("sidecar_fleet_heartbeats", "Fleet inventory heartbeats, by outcome.",
                                        ["outcome"], registry=r)
        self.fleet_last_heartbeat = Gauge("sidecar_fleet_last_heartbeat_timestamp_seconds",
                                          "Unix time of the last fleet heartbeat written.", registry=r)
        self.active_tasks = Gauge("sidecar_active_tasks", "Open tasks.", registry=r)
        self.approvals_pending = Gauge("sidecar_approvals_pending", "Requests held for approval.", registry=r)
        self.policy_reloads = Counter("sidecar_policy_reloads", "Policy reloads, by outcome.", ["outcome"],
                                      registry=r)
        self.identity_reloads = Counter("sidecar_identity_reloads", "Identity (SVID, bundle) reloads.",
                                        ["outcome"], registry=r)
        self.intercept_ca_reloads = Counter("sidecar_intercept_ca_reloads", "CONNECT interception CA reloads.",
                                            ["outcome"], registry=r)
        self.jwks_fetch_failures = Counter("sidecar_jwks_fetch_failures", "JWKS fetches that failed.",
                                           ["issuer"], registry=r)
        self.tls_handshake_failures = Counter("sidecar_tls_handshake_failures",
                                              "Refused or failed TLS handshakes.", ["listener", "reason"],
                                              registry=r)
        self.upstream_errors = Counter("sidecar_upstream_errors", "Upstream failures.", ["upstream", "reason"],
                                       registry=r)
        self.http2_abuse = Counter("sidecar_http2_abuse", "HTTP/2 bounds held against a client (sidecar.http2.guard), "
                                   "by listener and kind.", ["listener", "kind"], registry=r)
        self.agent_info = Gauge("sidecar_agent_info", "1, labelled with the agent's declared metadata (one series "
                                "per process; free labels are not exported).", AGENT_INFO_LABELS, registry=r)
        self.loop_lag = Histogram("sidecar_event_loop_lag_seconds",
                                  "How late the event loop ran a timer sampled every loop_sample_interval.",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.a2a_card_mismatches = Counter("sidecar_a2a_card_mismatches",
                                           "Agent cards served inbound naming an endpoint other than the sidecar's.",
                                           registry=r)
        self.loop_stalls = Counter("sidecar_event_loop_stalls",
                                   "Times the event loop did not run for observability.stall_threshold.", registry=r)
        r.register(LogPressure(lambda: decision_log.WRITER.stats()))
        self._bind()

    def _bind(self) -> None:
        """Make the zero series visible from the start."""
        for direction in ("inbound", "outbound"):
            for upstream in (*self.upstreams, UNKNOWN, "agent"):
                self.hot.duration(direction, upstream)
        for outcome in ("ok", "error"):
            self.policy_reloads.labels(outcome)
            self.identity_reloads.labels(outcome)
            self.intercept_ca_reloads.labels(outcome)
        self.revocation_bus_up.set(0)
        self.fleet_registered.set(0)
        for outcome in ("ok", "error"):
            self.fleet_heartbeats.labels(outcome)

    def describe_agent(self, values: dict[str, str | None]) -> None:
        """The one ``sidecar_agent_info`` series: name, environment, owner, trust level (bounded: one per process)."""
        self.agent_info.clear()
        self.agent_info.labels(*(values.get(k) or "" for k in AGENT_INFO_LABELS)).set(1)

    def watch_runtime(self, pooled: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Gauges read when scraped (on the loop): its asyncio tasks and each pool's connections."""
        self.registry.register(RuntimeGauges(pooled))

    def upstream_label(self, name: str | None) -> str:
        return name if name in self.upstreams else UNKNOWN

    def observe_request(self, direction: str, decision: str, upstream: str, seconds: float) -> None:
        self.hot.count(REQUESTS, (direction, decision, upstream))
        self.hot.duration(direction, upstream).observe(seconds)

    def count_decision(self, direction: str, decision: str, rule: str) -> None:
        self.hot.count(DECISIONS, (direction, decision, rule))

    def count_cache(self, provider: str, result: str) -> None:
        self.hot.count(CACHE, (provider, result))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- the hot path: plain counters on the event loop, rendered when scraped ----------------------

REQUESTS = ("sidecar_requests", "Exchanges handled, by direction, decision and upstream.",
            ("direction", "decision", "upstream"))
DECISIONS = ("sidecar_policy_decisions", "Policy decisions, by rule.", ("direction", "decision", "rule"))
CACHE = ("sidecar_credential_cache", "Credential cache lookups.", ("provider", "result"))
DURATION = ("sidecar_request_duration_seconds", "Exchange duration.", ("direction", "upstream"))


# -- the log on its way to stdout (sidecar.observe.line_writer), read when scraped --------------

LOG_DROPPED = ("sidecar_log_lines_dropped", "Log lines that could not be written (buffer full or stdout gone), "
                                            "by kind: trust_decision events and other lines.", ("kind",))
LOG_BUFFER = ("sidecar_log_buffer_bytes", "Log bytes waiting for stdout (bounded by logging.buffer_bytes).")
LOG_WAITING = ("sidecar_log_waiting_exchanges", "New exchanges waiting for room in the log (on_backpressure: block).")


class LogPressure:
    """The writer's counters as metrics: what was dropped, what waits, who waits."""

    def __init__(self, stats: Callable[[], LogStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        dropped = CounterMetricFamily(*LOG_DROPPED[:2], labels=LOG_DROPPED[2])
        dropped.add_metric(("trust_decision",), stats.dropped_events)
        dropped.add_metric(("other",), stats.dropped_other)
        yield dropped
        yield GaugeMetricFamily(*LOG_BUFFER, value=stats.queued_bytes)
        yield GaugeMetricFamily(*LOG_WAITING, value=stats.waiting)

    def describe(self) -> Iterator[Metric]:
        return iter(())


# -- what the loop holds, read when scraped: a soak shows these flat after warm-up -------------

ASYNCIO_TASKS = ("sidecar_asyncio_tasks", "asyncio tasks not yet done on the loop that serves exchanges.")
POOLED = ("sidecar_upstream_connections", "Kept-alive connections per pool (an upstream, or agent), by state: "
                                          "open (idle or in use) and idle.", ("upstream", "state"))


class RuntimeGauges:
    """asyncio tasks and pooled connections, counted at scrape time; ``pooled`` maps a pool's name
    (a configured upstream, or ``agent``) to its (open, idle) connections."""

    def __init__(self, pooled: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        self._pooled = pooled

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*ASYNCIO_TASKS, value=len(asyncio.all_tasks()))
        pooled = GaugeMetricFamily(*POOLED[:2], labels=POOLED[2])
        for name, (open_, idle) in sorted(self._pooled().items()):
            pooled.add_metric((name, "open"), open_)
            pooled.add_metric((name, "idle"), idle)
        yield pooled

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value


class HotPath:
    """Counters and a histogram updated without locks (one event loop) and rendered at scrape time.

    Label sets stay bounded: upstreams, rules and providers are configured names.
    """

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, tuple[str, ...]], dict[tuple[str, ...], float]] = {
            family: {} for family in (REQUESTS, DECISIONS, CACHE)}
        self._durations: dict[tuple[str, str], _Histogram] = {}

    def count(self, family: tuple[str, str, tuple[str, ...]], labels: tuple[str, ...]) -> None:
        children = self._counters[family]
        children[labels] = children.get(labels, 0.0) + 1.0

    def duration(self, direction: str, upstream: str) -> _Histogram:
        key = (direction, upstream)
        hist = self._durations.get(key)
        if hist is None:
            hist = self._durations[key] = _Histogram()
        return hist

    def collect(self) -> Iterator[Metric]:
        for (name, text, labels), children in self._counters.items():
            family = CounterMetricFamily(name, text, labels=labels)
            for values, count in children.items():
                family.add_metric(values, count)
            yield family
        name, text, labels = DURATION
        hist_family = HistogramMetricFamily(name, text, labels=labels)
        for values, hist in self._durations.items():
            cumulative, buckets = 0, []
            for bound, in_bucket in zip((*_LATENCY_BUCKETS, float("inf")), hist.counts):
                cumulative += in_bucket
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            hist_family.add_metric(values, buckets, hist.sum)
        yield hist_family

    def describe(self) -> Iterator[Metric]:
        return iter(())
