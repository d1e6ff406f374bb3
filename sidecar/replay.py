"""``sidecar replay --events FILE|- --policy NEW...``: what a candidate policy would change.

Reads trust-decision events (JSON lines; other log lines are skipped), rebuilds each logged
request as ``explain`` describes one (:class:`~sidecar.explain.Described`: method, canonical path,
query, body size, MCP method and tool, the A2A and LLM API calls policy saw, override reading,
agent and its metadata, caller, principal, delegation, task, time) and decides it with the candidate set's
:meth:`PolicySet.decide`, as the running sidecar would (rate limits are not charged). The
logged outcome is read back as the policy effect it came from (``approved``: an approval rule;
``rate_limited`` and failures after an allow: allow). Changes are counted by kind, agent,
upstream and rule, with a few examples each; memory does not grow with the number of events.

Events the policy did not decide (refused before policy: ``rule_id`` null) and events this config
cannot route are counted as not re-decided, with why. Headers: an event (schema 4) records the
values of the headers the running policy read by name and the names of all that were present
(:mod:`sidecar.observe.headers`); a header it has no value for was absent when its name is not
listed. A candidate rule that reads a header the event has no value for, present or possibly
present, makes that request **undecidable**: counted in a group of its own, by agent, upstream
and header, never as a change. Exit 3 when a request that was allowed would be denied or held
for approval, 0 otherwise, 1 on unusable input (with the line number).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Iterator, Mapping, TypeVar

import orjson

from sidecar.config_model import AgentMeta, Config
from sidecar.exchange import AgentInfo
from sidecar.observe.decision_log import REDACTED
from sidecar.explain import Described, decide, load_candidate, router_for
from sidecar.policy.a2a import A2aCall
from sidecar.policy.engine import PolicySet
from sidecar.policy.llm import LlmCall, endpoint_of
from sidecar.policy.mcp import SERVER_REQUEST_METHOD, described_body
from sidecar.policy.readings import NONE, Reading
from sidecar.routing import Router

SCHEMA_VERSIONS = (1, 2, 3, 4)
EXAMPLES = 3
# the policy effect behind a logged reason (rule_id set); any other reason came after an allow
LOGGED_EFFECT = {
    "rule_denied": "deny", "no_matching_rule": "deny", "condition_error": "deny",
    "approval_required": "require_approval", "approved": "require_approval", "approval_denied": "require_approval",
    "approval_timeout": "require_approval",
}
TIGHTER = {("allow", "deny"), ("allow", "require_approval")}


class BadEvent(ValueError):
    """An input line that is not a usable trust-decision event."""


class UndeclaredLevel(Exception):
    """A logged trust level this config does not declare: the event cannot be ranked."""


class NotRecorded(Exception):
    """Policy read something of the request that its event did not record: it cannot be decided again."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class RecordedHeaders(Mapping[str, tuple[str, ...]]):
    """The headers policy saw, as far as the event recorded them: the values it has, the names present
    (None: not known). Reading a header that was present, or may have been, but has no recorded value
    raises :class:`NotRecorded`; one whose name is not listed was absent."""

    __slots__ = ("_values", "_names")

    def __init__(self, values: Mapping[str, list[str]] | None, names: list[str] | None) -> None:
        self._values = {k: tuple(v) for k, v in (values or {}).items()}
        self._names = frozenset(names) if names is not None else None

    def __getitem__(self, name: str) -> tuple[str, ...]:
        found = self._values.get(name)
        if found is not None:
            return found
        if self._names is not None and name not in self._names:
            raise KeyError(name)
        raise NotRecorded(f"header {name}")

    def __contains__(self, name: object) -> bool:
        if name in self._values:
            return True
        if self._names is not None and name not in self._names:
            return False
        raise NotRecorded(f"header {name}")

    def __iter__(self) -> Iterator[str]:
        if self._names is None:
            raise NotRecorded("the header names")
        return iter(sorted(self._names))

    def __len__(self) -> int:
        if self._names is None:
            raise NotRecorded("the header names")
        return len(self._names)


class _Unrecorded:
    """A logged call whose fields named in ``unrecorded`` raise :class:`NotRecorded` when policy reads them."""

    __slots__ = ()
    _PREFIX = ""

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "unrecorded"):
            raise NotRecorded(f"{object.__getattribute__(self, '_PREFIX')}.{name}")
        return object.__getattribute__(self, name)


C = TypeVar("C", bound=_Unrecorded)


class LoggedA2aCall(_Unrecorded, A2aCall):
    __slots__ = ("unrecorded",)
    _PREFIX = "a2a"


class LoggedLlmCall(_Unrecorded, LlmCall):
    __slots__ = ("unrecorded",)
    _PREFIX = "llm"


def _logged(call: C, unrecorded: set[str]) -> C:
    object.__setattr__(call, "unrecorded", frozenset(unrecorded))
    return call


def _unclear(value: Any) -> bool:
    """A logged string that is not what policy saw: cut short or redacted."""
    return isinstance(value, str) and (REDACTED in value or "...[truncated from " in value)


def logged_a2a(t: dict[str, Any]) -> A2aCall | None:
    """The A2A call an event records (schema 4: every field but ``metadata``; before it, method and task id)."""
    method = t.get("a2a_method")
    if method is None:
        return None
    fields = {"task_id": t.get("a2a_task_id"), "context_id": t.get("a2a_context_id"),
              "push_url": t.get("a2a_push_url")}
    kinds = t.get("a2a_part_kinds")
    unrecorded = {name for name, value in fields.items() if _unclear(value)} | {"metadata"}
    if "a2a_part_kinds" not in t:  # schema 3: only the method and task id
        unrecorded |= {"context_id", "push_url"}
    if kinds is None:
        unrecorded.add("part_kinds")
    call = LoggedA2aCall(method, None, False, fields["task_id"], fields["context_id"], tuple(kinds or ()), None,
                         fields["push_url"])
    return _logged(call, unrecorded | ({"method"} if _unclear(method) else set()))


def logged_llm(t: dict[str, Any]) -> LlmCall | None:
    """The LLM API call an event records (schema 4: model, stream and token cap; before it, the model)."""
    model, endpoint = t.get("llm_model"), endpoint_of(t.get("path") or "")
    if model is None or endpoint is None:
        return None
    unrecorded = {"model"} if _unclear(model) else set()
    if "llm_stream" not in t:
        unrecorded |= {"stream", "max_tokens"}
    call = LoggedLlmCall(endpoint.lstrip("/"), model, bool(t.get("llm_stream")), t.get("llm_max_tokens"))
    return _logged(call, unrecorded)


Key = tuple[str, str, str, str, str | None, str | None]  # before, after, agent, upstream, old rule, new rule
Undecided = tuple[str, str, str]  # agent, upstream, what the event did not record


@dataclass
class Changes:
    """Counts and a few examples per (change, agent, upstream, rule); bounded by the distinct keys."""

    events: int = 0
    redecided: int = 0
    rule_only: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    counts: Counter[Key] = field(default_factory=Counter)
    examples: dict[Key, list[str]] = field(default_factory=dict)
    undecidable: Counter[Undecided] = field(default_factory=Counter)
    undecidable_examples: dict[Undecided, list[str]] = field(default_factory=dict)

    def add(self, key: Key, example: str) -> None:
        self.counts[key] += 1
        _example(self.examples, key, example)

    def undecided(self, key: Undecided, example: str) -> None:
        self.undecidable[key] += 1
        _example(self.undecidable_examples, key, example)

    @property
    def tightened(self) -> int:
        return sum(n for k, n in self.counts.items() if (k[0], k[1]) in TIGHTER)


def _example(examples: dict[Any, list[str]], key: Any, example: str) -> None:
    shown = examples.setdefault(key, [])
    if len(shown) < EXAMPLES:
        shown.append(example)


# -- events -> described requests ---------------------------------------------------------

def events(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, trust-decision event) of every event line; other JSON log lines are skipped."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise BadEvent(f"line {number}: not valid JSON") from None
        if isinstance(event, dict) and event.get("event") == "trust_decision":
            yield number, event
        elif not isinstance(event, dict) or "event" not in event:
            raise BadEvent(f"line {number}: expected a JSON object with an \"event\" field")


def logged_effect(event: dict[str, Any]) -> str:
    return LOGGED_EFFECT.get(event.get("reason") or "", "allow")


@dataclass
class Candidate:
    """The candidate policy set with the config that routes it, and the logged agents seen so far."""

    config: Config
    policy: PolicySet
    router: Router
    agents: dict[bytes, AgentInfo] = field(default_factory=dict)  # bounded by the fleet's distinct agents


def described(event: dict[str, Any], candidate: Candidate) -> Described:
    """The logged request as ``explain`` describes one; raises BadEvent naming a missing field."""
    try:
        return _described(event, candidate)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BadEvent(f"not a trust-decision event of schema {SCHEMA_VERSIONS}: missing or malformed "
                       f"{exc.args[0] if isinstance(exc, KeyError) else 'field'!s}") from None


def _described(event: dict[str, Any], candidate: Candidate) -> Described:
    t, agent = event["target"], event["agent"]
    query = t.get("query") or ""
    url = t["path"] if event["direction"] == "inbound" else f"/{t['upstream']}{t['path']}"
    body, headers = _mcp_body(t)
    override = t.get("override")
    principal, task = event.get("principal"), event.get("task")
    return Described(
        url=url + (f"?{query}" if query else ""), direction=event["direction"], method=t["method"], headers=headers,
        body=body, agent=_agent(agent, candidate), caller=(event.get("caller") or {}).get("id"),
        principal=(principal["iss"], principal["sub"]) if principal else None, delegation=event["delegation"],
        task_id=task["id"] if task else None, task_trigger=task["trigger"] if task else None,
        at=datetime.fromisoformat(event["ts"].replace("Z", "+00:00")), size=t.get("size"),
        reading=Reading(override.get("method"), override.get("path")) if override else NONE,
        recorded_headers=RecordedHeaders(t.get("headers"), t.get("header_names")), a2a=logged_a2a(t),
        llm=logged_llm(t),
        mcp_server_request=t.get("mcp_server_request") if t.get("mcp_method") == SERVER_REQUEST_METHOD else None)


def _mcp_body(t: dict[str, Any]) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The logged MCP request's body again: its method and what it named (arguments as logged: masked values
    stay masked, arguments too large to log are decided as none)."""
    method = t.get("mcp_method")
    if method is None or method == SERVER_REQUEST_METHOD:
        return b"", ()
    body = described_body(method, t.get("mcp_tool"), t.get("mcp_resource"), t.get("mcp_prompt"),
                          t.get("mcp_arguments"))
    return body, (("Content-Type", "application/json"),)


def _agent(agent: dict[str, Any], candidate: Candidate) -> AgentInfo:
    """The logged agent, its trust level ranked by this config's declared trust_levels."""
    key = orjson.dumps(agent, option=orjson.OPT_SORT_KEYS)
    known = candidate.agents.get(key)
    if known is None:
        names = agent["id"], agent["name"], agent["environment"]  # a missing one is a BadEvent, checked first
        levels, level = candidate.config.agent.trust_levels, agent.get("trust_level")
        if level is not None and level not in levels:
            raise UndeclaredLevel(level)
        labels = tuple(sorted((agent.get("labels") or {}).items()))
        meta = AgentMeta(agent.get("owner"), agent.get("purpose"), level, levels,
                         tuple(agent.get("data_classes") or ()), labels)
        known = candidate.agents[key] = AgentInfo(*names, meta)
    return known


# -- replaying ----------------------------------------------------------------------------

def replay(stream: IO[bytes], config: Config, policy: PolicySet) -> Changes:
    changes, candidate = Changes(), Candidate(config, policy, router_for(config))
    for number, event in events(stream):
        changes.events += 1
        try:
            _replay_one(event, candidate, changes)
        except BadEvent as exc:
            raise BadEvent(f"line {number}: {exc}") from None
    return changes


def _replay_one(event: dict[str, Any], candidate: Candidate, changes: Changes) -> None:
    version = event.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise BadEvent(f"schema_version {version!r} is not one replay reads ({', '.join(map(str, SCHEMA_VERSIONS))})")
    if event.get("rule_id") is None or event.get("target") is None:
        changes.skipped["refused before policy when logged"] += 1
        return
    try:
        request = described(event, candidate)
    except UndeclaredLevel as exc:
        changes.skipped[f"trust level {exc.args[0]!r} is not in this config's agent.trust_levels"] += 1
        return
    agent = event["agent"].get("name") or event["agent"]["id"]
    upstream = event["target"].get("upstream") or "(inbound)"
    example = f"{request.method} {request.url} ({event.get('ts')}, decision {event.get('decision_id')})"
    try:
        verdict = decide(request, candidate.config, candidate.policy, candidate.router)
    except NotRecorded as exc:
        changes.undecided((agent, upstream, exc.what), example)
        return
    except (KeyError, TypeError, AttributeError, ValueError):
        raise BadEvent("its request cannot be decided: a field of target has the wrong type") from None
    if verdict.refusal is not None:
        changes.skipped[f"refused before policy by this config ({verdict.refusal.reason})"] += 1
        return
    changes.redecided += 1
    before, after = logged_effect(event), verdict.effect
    old_rule, new_rule = event["rule_id"], verdict.rule_id
    if before == after:
        changes.rule_only += old_rule != new_rule
        return
    changes.add((before, after, agent, upstream, old_rule, new_rule), example)


def render(changes: Changes, policy: PolicySet) -> str:
    lines = [f"replayed {changes.events} event(s) under policy {policy.version}: {changes.redecided} re-decided, "
             f"{sum(changes.undecidable.values())} undecidable, {sum(changes.skipped.values())} not re-decided"]
    by_kind = Counter[tuple[str, str]]()
    for key, n in changes.counts.items():
        by_kind[key[0], key[1]] += n
    lines.append("changes: " + (", ".join(f"{n} {a} -> {b}" for (a, b), n in sorted(by_kind.items())) or "none")
                 + (f"; {changes.rule_only} decided by another rule with the same effect" if changes.rule_only else ""))
    for key, n in sorted(changes.counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        before, after, agent, upstream, old_rule, new_rule = key
        lines.append(f"  {before} -> {after}: {n}  agent {agent}  upstream {upstream}  rule {old_rule} -> {new_rule}")
        lines += [f"      e.g. {example}" for example in changes.examples[key]]
    if changes.undecidable:
        lines.append("undecidable (the candidate reads what the event did not record; not counted as changes):")
        for (agent, upstream, what), n in sorted(changes.undecidable.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n}  agent {agent}  upstream {upstream}  reads {what}")
            lines += [f"      e.g. {example}" for example in changes.undecidable_examples[(agent, upstream, what)]]
    if changes.skipped:
        lines.append("not re-decided:")
        lines += [f"  {why}: {n}" for why, n in sorted(changes.skipped.items())]
    return "\n".join(lines)


def replay_command(args: argparse.Namespace) -> int:
    """``sidecar replay``: 3 when something allowed would be denied or held, 0 otherwise, 1 on bad input."""
    loaded = load_candidate(args.config, args.policy)
    if loaded is None:
        return 1
    config, policy = loaded
    try:
        if args.events == "-":
            changes = replay(sys.stdin.buffer, config, policy)
        else:
            with open(args.events, "rb") as stream:
                changes = replay(stream, config, policy)
    except BadEvent as exc:
        print(f"error: replay: {args.events}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: replay: cannot read {args.events}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(render(changes, policy))
    return 3 if changes.tightened else 0
