"""CEL conditions (``when.expr``): compiled and checked at load, evaluated per request.

The engine is ``common-expression-language`` (import name ``cel``: Rust bindings), chosen over
the pure-Python ``cel-python`` because it evaluates a precompiled program 20-40x faster (see
``tests/bench/bench_policy.py``). At load an expression is compiled once and checked:

- syntax errors, variables other than the ones PRODUCT.md lists (:data:`VARIABLES`), fields
  those variables do not have (``request.sise``), and functions the engine does not provide
  (``foo(1)`` would otherwise compile and fail on every request) are load errors;
- the variables, and where the expression only ever selects fields (``request.size``) the
  fields, it needs are recorded, so that a request builds only those values: converting values
  into the engine costs about 1-2 us each, and ``request.headers`` is the largest of them. They
  are read from the expression's syntax tree (:mod:`sidecar.policy.cel_syntax`), never from its
  text: names in string literals and comments do not count, comprehension variables are scoped.

Per request, any failure (a null ``task``, a missing header key, an overflow, a result that is
not a boolean) raises :class:`ConditionFailed`; the engine turns it into ``condition_error``.
Its message names what went wrong without repeating request values (they may be secrets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sidecar.policy.a2a import A2aCall
from sidecar.policy.cel_syntax import CelSyntaxError, References, references
from sidecar.policy.facts import ConditionFailed as ConditionFailed
from sidecar.policy.facts import Facts
from sidecar.policy.llm import LlmCall
from sidecar.policy.mcp import MAX_ARGUMENTS_BYTES

FIELDS: dict[str, tuple[str, ...]] = {
    "request": ("method", "scheme", "host", "path", "query", "headers", "size"),
    "agent": ("id", "name", "environment", "owner", "purpose", "trust_level", "trust_rank", "data_classes",
              "labels"),
    "caller": ("id",),
    "principal": ("iss", "sub"),
    "task": ("id", "trigger"),
    "mcp": ("method", "tool", "resource", "prompt", "arguments", "server_request"),
    "grpc": ("service", "method"),
    "a2a": ("method", "task_id", "context_id", "part_kinds", "metadata", "push_url"),
    "llm": ("endpoint", "model", "stream", "max_tokens"),
}
VARIABLES: tuple[str, ...] = ("request", "agent", "caller", "principal", "delegation", "task", "mcp", "grpc", "a2a",
                              "llm", "now", "trust_levels")
FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bytes",
    "type", "dyn", "timestamp", "duration", "getFullYear", "getMonth", "getDate", "getDayOfMonth",
    "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
})
INSTALL_HINT = ("cel: CEL conditions need the common-expression-language package "
                "(pip install common-expression-language)")

class CelCompileError(ValueError):
    """An expression that cannot be used: the message says what was expected."""


Builder = Callable[["Facts", datetime], Any]


@dataclass(frozen=True, slots=True)
class Condition:
    """One compiled expression and the activation values it needs."""

    source: str
    program: Any
    builders: tuple[tuple[str, Builder], ...]
    header_keys: frozenset[str] | None = frozenset()  # the headers it reads by name; None: it may read any

    def evaluate(self, facts: Facts, now: datetime) -> bool:
        activation = {name: build(facts, now) for name, build in self.builders}
        try:
            result = self.program.execute(activation)
        except Exception as exc:  # the engine raises many types; every one refuses the request
            raise ConditionFailed(_describe(exc, self.source)) from None
        if result is True or result is False:
            return result
        raise ConditionFailed(f"cel: expression returned {type(result).__name__}, expected a boolean")


def compile_condition(source: str) -> Condition:
    """Compile and check ``source``; raises :class:`CelCompileError` with a readable message."""
    cel = _engine()
    try:
        program = cel.compile(source)
    except Exception as exc:  # ValueError on syntax errors; anything else is as unusable
        raise CelCompileError(f"cel: cannot compile: {_first_line(exc)}") from None
    refs = _references(source, program.variables())
    _check_names(set(refs.fields), program.functions())
    plan = tuple((name, _needed_fields(name, refs.fields[name])) for name in VARIABLES if name in refs.fields)
    keys = None if refs.header_keys is None else frozenset(refs.header_keys)
    return Condition(source, program, tuple((name, _builder(name, fields, keys)) for name, fields in plan), keys)


def _engine() -> Any:
    try:
        import cel
    except ImportError:
        raise CelCompileError(INSTALL_HINT) from None
    return cel


def _references(source: str, identifiers: list[str]) -> References:
    """The expression's references from its syntax tree, which must name what the engine's names."""
    try:
        refs = references(source)
    except CelSyntaxError as exc:
        raise CelCompileError(f"{exc} (the engine compiled it; rewrite it in plain CEL)") from None
    if refs.identifiers != set(identifiers):
        raise CelCompileError("cel: cannot tell which variables the expression reads "
                              f"({', '.join(sorted(set(identifiers) ^ refs.identifiers))}); rewrite it in plain CEL")
    return refs


def _check_names(variables: set[str], functions: list[str]) -> None:
    unknown = sorted(variables - set(VARIABLES))
    if unknown:
        raise CelCompileError(f"cel: unknown variable {unknown[0]!r}; expected one of {', '.join(VARIABLES)}")
    named = sorted(f for f in functions if f[:1].isalpha() and f not in FUNCTIONS)
    if named:
        raise CelCompileError(f"cel: unknown function {named[0]!r}; available: {', '.join(sorted(FUNCTIONS))}")


def _needed_fields(name: str, selected: set[str] | None) -> tuple[str, ...] | None:
    """The fields of ``name`` the expression selects, or None when it uses the value otherwise."""
    if name not in FIELDS or selected is None:
        return None
    unknown = sorted(selected - set(FIELDS[name]))
    if unknown:
        raise CelCompileError(f"cel: {name} has no field {unknown[0]!r}; expected one of {', '.join(FIELDS[name])}")
    return tuple(f for f in FIELDS[name] if f in selected)


def _builder(name: str, fields: tuple[str, ...] | None, header_keys: frozenset[str] | None) -> Builder:
    if name == "now":
        return lambda facts, now: now
    if name == "delegation":
        return lambda facts, now: facts.delegation
    if name == "trust_levels":  # declared level -> rank: agent.trust_rank >= trust_levels.internal
        return lambda facts, now: {level: i for i, level in enumerate(facts.agent.meta.trust_levels)}
    getters = tuple((f, _GETTERS[name][f]) for f in (FIELDS[name] if fields is None else fields))
    if name == "request" and header_keys is not None:  # only the headers it names: fewer values to convert
        getters = tuple((f, _named_headers(header_keys) if f == "headers" else get) for f, get in getters)
    present = _PRESENT.get(name)

    def build(facts: Facts, now: datetime) -> Any:
        if present is not None and not present(facts):
            return None
        return {field: get(facts) for field, get in getters}

    return build


def _headers(facts: Facts) -> dict[str, Any]:
    return dict(facts.headers)


def _named_headers(keys: frozenset[str]) -> Callable[[Facts], dict[str, Any]]:
    """The headers an expression reads only by literal name: the same answers as all of them."""
    def headers(facts: Facts) -> dict[str, Any]:
        found = {}
        for key in keys:
            values = facts.headers.get(key)
            if values is not None:
                found[key] = values
        return found

    return headers


_PRESENT: dict[str, Callable[[Facts], bool]] = {
    "caller": lambda f: f.caller_id is not None,
    "principal": lambda f: f.principal is not None,
    "task": lambda f: f.task_id is not None,
    "mcp": lambda f: f.mcp_method is not None,
    "grpc": lambda f: f.grpc_method is not None,
    "a2a": lambda f: f.a2a is not None,
    "llm": lambda f: f.llm is not None,
}
def _a2a(facts: Facts) -> A2aCall:
    """The A2A call, present whenever ``a2a`` is built (:data:`_PRESENT`)."""
    assert facts.a2a is not None
    return facts.a2a


def _llm(facts: Facts) -> LlmCall:
    """The LLM call, present whenever ``llm`` is built (:data:`_PRESENT`)."""
    assert facts.llm is not None
    return facts.llm


def _arguments(facts: Facts) -> Any:
    """``mcp.arguments``: a tools/call's arguments as parsed (an empty map when it sent none), null for other
    methods; a call whose body exceeds :data:`MAX_ARGUMENTS_BYTES` is not converted (condition_error)."""
    detail = facts.mcp
    if detail is None or detail.arguments is None:
        return {} if facts.mcp_method == "tools/call" else None
    if detail.arguments_size > MAX_ARGUMENTS_BYTES:
        raise ConditionFailed(f"cel: mcp.arguments of a call larger than {MAX_ARGUMENTS_BYTES} bytes are not "
                              "shown to conditions")
    return detail.arguments


_ABSENT = ("", "")  # never read: principal is null, not built, without one (_PRESENT)
_GETTERS: dict[str, dict[str, Callable[[Facts], Any]]] = {
    "request": {"method": lambda f: f.method, "scheme": lambda f: f.scheme, "host": lambda f: f.host,
                "path": lambda f: f.path, "query": lambda f: f.query, "headers": _headers, "size": lambda f: f.size},
    "agent": {"id": lambda f: f.agent.id, "name": lambda f: f.agent.name, "environment": lambda f: f.agent.environment,
              "owner": lambda f: f.agent.meta.owner, "purpose": lambda f: f.agent.meta.purpose,
              "trust_level": lambda f: f.agent.meta.trust_level, "trust_rank": lambda f: f.agent.meta.trust_rank,
              "data_classes": lambda f: list(f.agent.meta.data_classes), "labels": lambda f: dict(f.agent.meta.labels)},
    "caller": {"id": lambda f: f.caller_id},
    "principal": {"iss": lambda f: (f.principal or _ABSENT)[0], "sub": lambda f: (f.principal or _ABSENT)[1]},
    "task": {"id": lambda f: f.task_id, "trigger": lambda f: f.task_trigger},
    "mcp": {"method": lambda f: f.mcp_method, "tool": lambda f: f.mcp_tool,
            "resource": lambda f: f.mcp.resource if f.mcp else None,
            "prompt": lambda f: f.mcp.prompt if f.mcp else None,
            "arguments": _arguments, "server_request": lambda f: f.mcp.server_request if f.mcp else None},
    "grpc": {"service": lambda f: f.grpc_service, "method": lambda f: f.grpc_method},
    "a2a": {"method": lambda f: _a2a(f).method, "task_id": lambda f: _a2a(f).task_id,
            "context_id": lambda f: _a2a(f).context_id, "part_kinds": lambda f: list(_a2a(f).part_kinds),
            "metadata": lambda f: _a2a(f).metadata or {}, "push_url": lambda f: _a2a(f).push_url},
    "llm": {"endpoint": lambda f: _llm(f).endpoint, "model": lambda f: _llm(f).model,
            "stream": lambda f: _llm(f).stream, "max_tokens": lambda f: _llm(f).max_tokens},
}


def _describe(exc: Exception, source: str) -> str:
    """What failed, without request values: only keys that appear in the expression itself."""
    if isinstance(exc, KeyError):
        key = str(exc.args[0]) if exc.args else ""
        return f"cel: no such key or field {key!r}" if key and key in source else "cel: no such key or field"
    if isinstance(exc, TypeError):
        return "cel: no matching overload (a null value, or operands of different types)"
    if isinstance(exc, ZeroDivisionError):
        return "cel: division by zero"
    if isinstance(exc, OverflowError):
        return "cel: arithmetic overflow"
    return f"cel: evaluation failed ({type(exc).__name__})"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
