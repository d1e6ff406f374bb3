"""What policy knows about one request: :class:`Facts`, and the one way to build them.

Both directions of the pipeline and ``sidecar explain`` (so ``sidecar test`` and ``sidecar replay``
too) call :func:`build_facts`: the agent is passed once, as one object, and the headers policy sees
are always the forwarded ones, viewed through :class:`LazyHeaders`. The policy package reads the
agent through the small :class:`Agent` protocol, so it never depends on the runtime that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sidecar.config_model import AgentMeta
from sidecar.policy.a2a import A2aCall
from sidecar.policy.llm import LlmCall


class Agent(Protocol):
    """The agent a request is made for or to, as policy reads it (``agent.*`` in CEL, ``agents:``)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def environment(self) -> str: ...

    @property
    def meta(self) -> AgentMeta: ...


class ConditionFailed(Exception):
    """A condition that could not be evaluated for this request (``condition_error``): raised by a
    compiled ``when.expr`` (``sidecar.policy.cel``), caught by the engine, which need not import CEL."""


@dataclass(slots=True)
class Facts:
    """What policy knows about one request; paths are canonical, hosts normalized.

    Built once per request and never changed afterwards; not frozen only because a frozen
    dataclass's ``__init__`` costs ~5 µs more per request (PERFORMANCE.md: hot path discipline).
    """

    direction: str  # "inbound" | "outbound"
    method: str  # uppercase
    scheme: str
    host: str  # lowercased, normalized
    path: str  # canonical path (upstream base path removed)
    query: str  # raw query
    headers: Mapping[str, tuple[str, ...]]  # lowercase name -> all values in order
    size: int | None  # request body size (0 if none; None: a body of undeclared length, not buffered)
    upstream: str | None  # configured upstream name (outbound)
    agent: Agent  # id, name, environment, metadata (shared, never copied per request)
    caller_id: str | None = None  # inbound caller SPIFFE ID
    principal: tuple[str, str] | None = None  # (iss, sub) of the human/workload token
    delegation: str = "none"  # "delegated" | "impersonated" | "asserted" | "none"
    task_id: str | None = None
    task_trigger: str | None = None
    mcp_method: str | None = None
    mcp_tool: str | None = None
    grpc_service: str | None = None  # a gRPC call's, from its :path (upstream protocol grpc)
    grpc_method: str | None = None
    now: datetime | None = None  # aware UTC; the engine uses its clock when None
    a2a: A2aCall | None = None  # the parsed A2A call (protocol a2a)
    llm: LlmCall | None = None  # the parsed LLM API call (protocol openai or anthropic)
    mcp: McpDetail | None = None  # what an MCP request names besides method and tool (resource, prompt, arguments)


@dataclass(frozen=True, slots=True)
class McpDetail:
    """``mcp.resource``, ``mcp.prompt``, ``mcp.arguments`` and ``mcp.server_request``: only the MCP requests that
    name one have it, so every other request builds no more facts than before."""

    resource: str | None = None  # params.uri of resources/read, subscribe, unsubscribe
    prompt: str | None = None  # params.name of prompts/get
    arguments: Mapping[str, Any] | None = None  # tools/call params.arguments, as parsed (strict JSON)
    arguments_size: int = 0  # the body's length: over MAX_ARGUMENTS_BYTES, CEL is refused the arguments
    server_request: str | None = None  # the method of a server's request to the agent (mcp.method rpc.server_request)

    @classmethod
    def of(cls, resource: str | None, prompt: str | None, arguments: Mapping[str, Any] | None,
           size: int) -> McpDetail | None:
        """The detail of a parsed request, or None when it names none of these."""
        if resource is None and prompt is None and arguments is None:
            return None
        return cls(resource, prompt, arguments, size)


def build_facts(*, direction: str, method: str, scheme: str, host: str, path: str, query: str,
                headers: Mapping[str, str], size: int | None, upstream: str | None, agent: Agent,
                caller_id: str | None = None, principal: tuple[str, str] | None = None, delegation: str = "none",
                task_id: str | None = None, task_trigger: str | None = None, mcp_method: str | None = None,
                mcp_tool: str | None = None, grpc_service: str | None = None, grpc_method: str | None = None,
                now: datetime | None = None, a2a: A2aCall | None = None, llm: LlmCall | None = None,
                mcp: McpDetail | None = None) -> Facts:
    """The facts of one request; ``headers`` are the ones that will be forwarded (a multidict), nothing else."""
    return Facts(direction, method, scheme, host, path, query, LazyHeaders(headers), size, upstream, agent,
                 caller_id, principal, delegation, task_id, task_trigger, mcp_method, mcp_tool, grpc_service,
                 grpc_method, now, a2a, llm, mcp)


class LazyHeaders(Mapping[str, tuple[str, ...]]):
    """Lowercase header name -> all its values, built only if a rule or condition looks."""

    __slots__ = ("_raw", "_built")

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw
        self._built: dict[str, tuple[str, ...]] | None = None

    def _dict(self) -> dict[str, tuple[str, ...]]:
        if self._built is None:
            built: dict[str, tuple[str, ...]] = {}
            for name, value in self._raw.items():
                key = name.lower()
                built[key] = (*built.get(key, ()), value)
            self._built = built
        return self._built

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())
