"""The one readable sequence, per direction: identify -> authorize -> credential -> forward -> record.

Outbound (the agent calling out)::

    limits -> trust boundary -> route (upstream, canonical path) -> task -> revocation
           -> MCP (session, body) or form body -> strip (the forwarded headers) -> overrides -> policy (and an
           S3 copy's source, as a read) -> credential -> attach -> forward -> record

Inbound (callers of the agent)::

    limits -> peer (mTLS, verified at the handshake) -> bearer token -> revocation
           -> A2A (body, the caller's task; inbound.protocol a2a) or form body
           -> strip (the human's token, identity headers) -> overrides -> policy -> open task
           -> forward to the agent (an A2A answer binds its task ids, a card is checked) -> record

Policy decides on the headers that will be forwarded (computed once, shared with the forwarder),
and on every other reading of the request a passed method or URL override gives it.

Every exit, refused or not, passes through ``record`` exactly once: one trust-decision
event, the metrics. Stages raise :class:`~sidecar.errors.Refusal`; nothing else is caught
on the trust path except to turn it into a refusal.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Awaitable, Callable, Coroutine

import orjson
import structlog
from multidict import CIMultiDict
from yarl import URL

from sidecar.a2a_transport import CARD_PATHS, A2aTasks, card_observer
from sidecar.credentials.aws_request import COPY_SOURCE, CopySource, copy_source
from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, body_needed
from sidecar.errors import PolicyRefused, RecordedFailure, Refusal, RequestRefused
from sidecar.exchange import Exchange, mark_cut
from sidecar.forward.body import LimitedBody, RequestBody
from sidecar.forward.relay import ChunkFilter, WholeAnswer, relay_exchange
from sidecar.forward.transport import UpstreamResponse, open_upstream
from sidecar.forward.websocket import is_websocket, proxy_websocket
from sidecar.grpc import (
    EXPIRED, TIMEOUT, call_timeout, format_timeout, grpc_refusal, grpc_status, is_grpc, note_call,
)
from sidecar.http.headers import VIA, clean_request_headers, echo_method
from sidecar.http.incoming import Answer, IncomingRequest, refusal_answer
from sidecar.http.target import DEFAULT_OPTIONS, canonical_path, check_header_names, normalize_host
from sidecar.identity.inbound import Caller, InboundIdentity, agent_headers
from sidecar.identity.x509 import PeerIdentity
from sidecar.llm_usage import TokenBudgets, api_refusal, usage_observer
from sidecar.mcp_auth import OAUTH_TYPES, McpAuthorization, resource_metadata_url
from sidecar.mcp_filter import answer_filter
from sidecar.mcp_server import ServerRequests
from sidecar.mcp_transport import McpSessions, rpc_error, rpc_refusal, session_id
from sidecar.observe.decision_log import admission
from sidecar.policy.a2a import MESSAGE_METHODS, parse_a2a_request
from sidecar.policy.engine import Decision
from sidecar.policy.facts import Facts, McpDetail, build_facts
from sidecar.policy.llm import LLM_PROTOCOLS, endpoint_of, parse_llm_request
from sidecar.policy.mcp import check_routing_headers, parse_mcp_request, transport_method
from sidecar.policy.readings import screen
from sidecar.routing import Route
from sidecar.runtime import Runtime
from sidecar.tasks import TASK_HEADER, Task
from sidecar.tracing import traceparent_for

READS_ANSWERS = frozenset({"mcp", "a2a", "openai", "anthropic"})  # upstreams whose answers the sidecar reads
log = structlog.get_logger("sidecar.pipeline")
RPC_PROTOCOLS = frozenset({"mcp", "a2a"})  # refusals of one JSON-RPC request are JSON-RPC errors
DENY_MESSAGES = {
    "no_matching_rule": "policy: no rule allows this request (default deny)",
    "rule_denied": "policy: denied by rule {rule}",
    "condition_error": "policy: a condition of rule {rule} could not be evaluated",
    "rate_limited": "policy: rate limit of rule {rule} exceeded",
}


def check_headers(request: IncomingRequest, max_headers: int, max_bytes: int) -> None:
    """One pass over the raw headers: the configured limits, and no '_' in a name (either direction)."""
    raw = request.raw_headers
    if len(raw) > max_headers:
        raise RequestRefused("headers_too_large", f"request: more than {max_headers} headers")
    size = 0
    for name, value in raw:
        size += len(name) + len(value) + 4
        if name.find(b"_") != -1:  # not `in`: bytes' `in` first tries the operand as an int (a raised TypeError)
            check_header_names((name.decode("latin-1"),))
    if size > max_bytes:
        raise RequestRefused("headers_too_large", f"request: headers exceed {max_bytes} bytes")


def refuse_decision(decision: Decision) -> None:
    """Raise the refusal a non-allow decision stands for."""
    template = DENY_MESSAGES.get(decision.reason, "policy: denied ({reason})")
    raise PolicyRefused(decision.reason, template.format(rule=decision.rule_id, reason=decision.reason),
                        rule_id=decision.rule_id, retry_after=decision.retry_after)


def authorize_copy_source(rt: Runtime, facts: Facts, source: CopySource) -> None:
    """An S3 copy reads its source: refused unless policy allows a GET of it (a copy is never held for approval)."""
    read = rt.policy.decide(replace(facts, method="GET", path=source.path, query=source.query, size=0))
    if read.effect == "allow":
        return
    about = f"policy: reading the copy source {source.shown}"
    if read.effect == "require_approval":
        raise PolicyRefused("rule_denied", f"{about} needs an approval (rule {read.rule_id}); a copy is not held "
                                           f"for one", rule_id=read.rule_id)
    template = DENY_MESSAGES.get(read.reason, "policy: denied ({reason})").removeprefix("policy: ")
    raise PolicyRefused(read.reason, f"{about}: " + template.format(rule=read.rule_id, reason=read.reason),
                        rule_id=read.rule_id, retry_after=read.retry_after)


async def serve_exchange(rt: Runtime, request: IncomingRequest, ex: Exchange, run: Callable[[], Awaitable[Answer]],
                         *, on_end: Callable[[Exchange], None] | None = None) -> Answer:
    """The envelope of every exchange: cuttable while it runs, refusals answered, recorded once (once the
    answer it returns is written: Recorder.record_soon)."""
    rt.exchanges.track(ex)
    try:
        waiting = admission()
        if waiting is not None:  # stdout is behind (logging.on_backpressure): wait for room or be refused
            await waiting
        ex.kept = True
        return await run()
    except Refusal as refusal:
        ex.refuse(refusal)
        if ex.protocol in LLM_PROTOCOLS:  # in the API's own error shape: the SDK shows the sidecar's message
            return api_refusal(request, ex, refusal)
        rpc = ex.protocol in RPC_PROTOCOLS  # the JSON-RPC session goes on
        answer = rpc_refusal(request, ex, refusal) if rpc else grpc_refusal(request, ex, refusal)
        return answer or refusal_answer(request, refusal)
    except asyncio.CancelledError:
        mark_cut(ex)
        raise
    except Exception as exc:  # a defect, not a decision: fail closed, one event, never a traceback
        mark_failed(ex, exc)
        raise RecordedFailure() from exc
    finally:
        rt.exchanges.untrack(ex)
        if on_end is not None:
            on_end(ex)
        rt.recorder.record_soon(ex, rt.exchanges.loop)  # after the answer is written


def mark_failed(ex: Exchange, exc: Exception) -> None:
    """An exchange ended by a defect: refused as internal_error, or cut if its response had begun."""
    detail = f"internal error ({type(exc).__name__})"
    if ex.status is not None and ex.outcome != "refused":
        ex.outcome, ex.reason_detail = "cut", detail
        return
    ex.refuse(Refusal("internal_error", "sidecar: internal error", detail=detail))


def apply_decision(ex: Exchange, decision: Decision) -> bool:
    """Record the decision and refuse, or let the request on; True: hold it for approval first."""
    ex.rule_id, ex.policy_version = decision.rule_id, decision.policy_version
    ex.audit = dict(decision.audit) if decision.audit else None
    if decision.detail:
        ex.reason_detail = decision.detail
    ex.credential_scopes = decision.scopes
    if decision.effect == "allow":
        ex.allow()
        return False
    if decision.effect != "require_approval":
        refuse_decision(decision)
    ex.allow("approved")  # holds only if the approval succeeds: hold() raises otherwise
    return True


class Outbound:
    """The agent's calls out: never an open proxy, never the agent's own credentials."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.mcp_sessions = McpSessions()
        self.server_requests = ServerRequests(rt)
        self.mcp_auth = McpAuthorization()
        self.a2a_tasks = A2aTasks()
        self.budgets = TokenBudgets()  # outside the compiled policy: a reload keeps what was spent

    def handle(self, request: IncomingRequest) -> Awaitable[Answer]:
        """A request on the outbound listener (CONNECT goes to ``sidecar.connect`` first)."""
        ex = Exchange("outbound", method=request.method)
        return serve_exchange(self.rt, request, ex, lambda: self.forward_route(request, ex, self._route(request)))

    def _route(self, request: IncomingRequest) -> Route:
        """Limits, the trust boundary, then which upstream and which canonical path."""
        rt = self.rt
        limits = rt.config.outbound.limits
        check_headers(request, limits.max_headers, limits.max_header_bytes)
        rt.router.check_boundary(request.headers)
        return rt.router.route(request.target, request.headers)

    async def forward_route(self, request: IncomingRequest, ex: Exchange, route: Route) -> Answer:
        """From a resolved route on: shared by the plain listener and CONNECT interception."""
        rt, up = self.rt, route.upstream
        ex.upstream, ex.host, ex.path = up.name, up.host, route.path
        echo = echo_method(request.method, up.allow_trace)
        ex.trace_id, traceparent = traceparent_for(request.headers)
        rt.revocations.check_agent(rt.agent.id)
        task = self._task(request, ex)
        deadline = None  # a gRPC call's own (grpc-timeout), on the loop's clock
        if up.protocol == "grpc":
            note_call(ex, route.path)
            timeout = call_timeout(request.headers)
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        body = RequestBody(request, rt.config.outbound.limits, up.timeouts.idle)
        await self._inspect(request, ex, route, task, body)
        if body.form:
            await body.read()
        forwarded = clean_request_headers(request.headers, rt.drop_sets[up.name])
        reading = screen(forwarded, route.query, body.whole if body.form else None, up.pass_headers, up.paths,
                         up.base_path)
        ex.override = reading.event()
        ex.facts = self._facts(request, ex, route, body, forwarded)
        source = self._copy_source(forwarded, ex, route)
        decision = rt.policy.decide(ex.facts, *reading.alternatives(ex.facts))
        held = apply_decision(ex, decision)
        self._budget(ex, decision)
        if source is not None:
            authorize_copy_source(rt, ex.facts, source)
        if held:  # the approver sees the digest of the very body that is then sent
            await rt.approvals.hold(ex, await body.read() if body.present else None)
        credential = await self._credential(ex, decision, up.credential, task) if not echo else None
        out = self._outbound_request(request, route, traceparent, forwarded)
        if deadline is not None:  # what is left of it goes upstream (before any signer signs the headers)
            out.headers[TIMEOUT] = format_timeout(_remaining(deadline))
        if source is not None:
            out.headers[COPY_SOURCE] = source.header  # what policy decided on is what S3 reads
        if credential is not None:
            provider = rt.providers[credential.provider]
            if body_needed(provider, out.headers):
                await body.read()
            out.body = body.whole
            provider.apply(out, credential)
        return await self._send(request, ex, route, out, body, task, decision, deadline)

    def _task(self, request: IncomingRequest, ex: Exchange) -> Task | None:
        values = request.headers.getall(TASK_HEADER, ())
        if not values:
            return None
        if len(values) > 1:
            raise RequestRefused("bad_request", "tasks: more than one X-Sidecar-Task header")
        ex.task_id = values[0]
        task = self.rt.tasks.get(values[0])
        self.rt.revocations.check_task(task)
        ex.task_trigger, ex.principal, ex.actor_type = task.trigger, task.principal, task.actor_type
        ex.delegation, ex.act_chain = task.delegation, task.act_chain
        return task

    def _copy_source(self, forwarded: CIMultiDict[str], ex: Exchange, route: Route) -> CopySource | None:
        """S3 CopyObject and UploadPartCopy name a second object they read (recorded in the event)."""
        values = forwarded.getall(COPY_SOURCE, ())
        if not values:
            return None
        source = copy_source(values, route.upstream.paths, route.upstream.host)
        ex.copy_source = source.shown
        return source

    async def _inspect(self, request: IncomingRequest, ex: Exchange, route: Route, task: Task | None,
                       body: RequestBody) -> None:
        """The body stage of the upstream's protocol: MCP, A2A, or none for plain HTTP."""
        protocol = route.upstream.protocol
        if protocol == "mcp":
            await self._mcp(request, ex, route, task, body)
        elif protocol == "a2a":
            await self._a2a(request, ex, route, task, body)
        elif protocol in LLM_PROTOCOLS:
            await self._llm(request, ex, route, body)

    async def _llm(self, request: IncomingRequest, ex: Exchange, route: Route, body: RequestBody) -> None:
        """A POST to an LLM API endpoint: its body must parse, and policy sees the model and token cap."""
        ex.protocol = route.upstream.protocol
        endpoint = endpoint_of(route.path, ex.protocol)
        if request.method != "POST" or endpoint is None:
            return  # the model list and other reads: HTTP rules
        limits = self.rt.config.outbound.limits
        ex.llm = parse_llm_request(await body.read(), request.headers.get("Content-Type"), endpoint,
                                   limits.max_body_bytes)

    def _budget(self, ex: Exchange, decision: Decision) -> None:
        """An allowing rule's token budget: refused once spent, else charged with this answer's usage."""
        if decision.budget is None or ex.llm is None or decision.effect == "deny":
            return
        key = (decision.rule_id, self.rt.agent.id, ex.task_id, ex.principal)
        self.budgets.check(key, decision.budget)
        ex.budget = (key, decision.budget)

    async def _a2a(self, request: IncomingRequest, ex: Exchange, route: Route, task: Task | None,
                   body: RequestBody) -> None:
        """A POST is one A2A call, parsed strictly; its task id must be this agent's (and task's)."""
        ex.protocol = "a2a"
        if is_websocket(request):
            raise RequestRefused("bad_request", "a2a: WebSocket upgrades to an A2A upstream are refused")
        if request.method != "POST":
            return  # the agent card and other plain reads: HTTP rules
        limits = self.rt.config.outbound.limits
        call = parse_a2a_request(await body.read(), request.headers.get("Content-Type"), limits.max_body_bytes)
        ex.a2a, ex.rpc = call, call.rpc
        if call.task_id is not None:
            self.a2a_tasks.check(route.upstream.name, call.task_id, self._a2a_owner(task))

    def _a2a_owner(self, task: Task | None) -> tuple[str | None, ...]:
        return (self.rt.agent.id, task.id if task else None)

    async def _mcp(self, request: IncomingRequest, ex: Exchange, route: Route, task: Task | None,
                   body: RequestBody) -> None:
        ex.protocol = "mcp"
        if is_websocket(request):  # frames would pass unparsed, past every tool rule: fail closed
            raise RequestRefused("bad_request", "mcp: WebSocket upgrades to an MCP upstream are refused; its "
                                                "messages could not be checked against tool rules")
        sid = session_id(request.headers)
        if sid is not None:
            self.mcp_sessions.check(route.upstream.name, sid, self.rt.agent.id, task)
        if request.method != "POST":
            ex.mcp_method = transport_method(request.method, route.path)
            return
        limits = self.rt.config.outbound.limits
        call = parse_mcp_request(await body.read(), request.headers.get("Content-Type"), limits.max_body_bytes)
        check_routing_headers(call, request.headers.getall("Mcp-Method", ()), request.headers.getall("Mcp-Name", ()))
        ex.mcp_method, ex.mcp_tool, ex.mcp_arguments, ex.rpc = call.method, call.tool, call.arguments, call.rpc
        ex.mcp_detail = McpDetail.of(call.resource, call.prompt, call.arguments, call.size)

    def _facts(self, request: IncomingRequest, ex: Exchange, route: Route, body: RequestBody,
               forwarded: CIMultiDict[str]) -> Facts:
        """What policy decides on: the headers are the ones that will be forwarded, nothing else."""
        size = body.size
        return build_facts(direction="outbound", method=request.method, scheme=route.upstream.scheme,
                           host=route.upstream.host, path=route.path, query=route.query, headers=forwarded,
                           size=size, upstream=route.upstream.name, agent=self.rt.agent, principal=ex.principal,
                           delegation=ex.delegation,
                           task_id=ex.task_id, task_trigger=ex.task_trigger, mcp_method=ex.mcp_method,
                           mcp_tool=ex.mcp_tool, grpc_service=ex.grpc_service, grpc_method=ex.grpc_method,
                           a2a=ex.a2a, llm=ex.llm, mcp=ex.mcp_detail)

    async def _credential(self, ex: Exchange, decision: Decision, default: str | None,
                          task: Task | None) -> Credential | None:
        rt = self.rt
        name = decision.credential or default
        if name is None:
            return None
        rt.check_credential_for(name, ex.upstream or "")
        provider = rt.providers[name]
        resource = self.mcp_auth.resource(ex.upstream or "") if ex.protocol == "mcp" else None
        req = CredentialRequest(upstream=ex.upstream or "", scopes=decision.scopes or (), agent_id=rt.agent.id,
                                task=task.ref() if task else None,
                                impersonation_allowed=decision.delegation == "impersonation_allowed",
                                resource=resource if provider.type in OAUTH_TYPES else None)
        hit = rt.credentials.cached(provider, req)
        credential, source = hit if hit is not None else await rt.credentials.get(provider, req)
        ex.credential, ex.credential_source = credential, source  # logged even when refused below
        rt.revocations.check_credential(credential)
        if credential.delegation:
            ex.delegation = credential.delegation
        return credential

    def _outbound_request(self, request: IncomingRequest, route: Route, traceparent: str,
                          forwarded: CIMultiDict[str]) -> OutboundRequest:
        up = route.upstream
        headers = forwarded.copy()  # policy's view stays as it decided; the sidecar's own headers go here
        headers["Host"] = route.host_header
        headers["Via"] = VIA
        headers["traceparent"] = traceparent
        if up.protocol in READS_ANSWERS:  # the answer is read (filtered, usage counted): never compressed
            headers["Accept-Encoding"] = "identity"
        cert = self.rt.identity.state.cert_sha256 if up.client_cert == "svid" and up.scheme == "https" else None
        return OutboundRequest(request.method, up.scheme, route.host, up.port, route.forward_path, route.query,
                               headers, client_cert_sha256=cert, pass_headers=up.pass_headers)

    async def _send(self, request: IncomingRequest, ex: Exchange, route: Route, out: OutboundRequest,
                    body: RequestBody, task: Task | None, decision: Decision, deadline: float | None = None) -> Answer:
        up = route.upstream
        data = body.to_send(out.reframe)  # a whole body is framed (Content-Length) where the head is written
        if is_websocket(request):
            ex.protocol = "websocket"
            url = URL(f"{up.scheme}://{out.host_header}{out.path}" + (f"?{out.query}" if out.query else ""),
                      encoded=True)
            response = await proxy_websocket(request, self.rt.sessions.websocket(up.name), url, out.headers,
                                             up.timeouts, lambda status: _opened(ex, status),
                                             lambda: _ws_closed(ex))
            if ex.outcome != "completed":
                ex.outcome, ex.reason_detail = "cut", "websocket: a side went away without a close frame"
            return response
        target = f"{out.path}?{out.query}" if out.query else out.path
        opening = open_upstream(self.rt.sessions.get(up.name), out.method, target, out.headers, data)
        upstream = await (opening if deadline is None else _by(deadline, opening))
        if ex.protocol == "mcp" and upstream.status == 401 and not isinstance(data, LimitedBody):
            upstream = await self._authorized(ex, route, out, data, upstream, (decision, task))
        if ex.protocol == "mcp":
            self.mcp_sessions.answered(ex, session_id(request.headers), upstream.status, upstream.headers,
                                       self.rt.agent.id, task)
        transform = self._response_filter(ex, upstream, task, (route, out, decision))
        relaying = relay_exchange(request, ex, upstream, self.rt.metrics, transform)
        answer = await (relaying if deadline is None else _relayed(deadline, ex, relaying))
        if ex.protocol == "grpc":
            ex.grpc_status = grpc_status(upstream)
        return answer

    async def _authorized(self, ex: Exchange, route: Route, out: OutboundRequest, data: bytes | None,
                          refused: UpstreamResponse, why: tuple[Decision, Task | None]) -> UpstreamResponse:
        """An MCP server's 401 pointing at its protected-resource metadata: a token for that resource from the
        upstream's OAuth credential, and the request once more (``sidecar.mcp_auth``); else the 401 as it is."""
        decision, task = why
        up = route.upstream
        name = decision.credential or up.credential
        metadata = resource_metadata_url(refused.headers)
        if metadata is None or name is None or self.rt.providers[name].type not in OAUTH_TYPES:
            return refused
        refused.release()
        await self.mcp_auth.discover(up, metadata)
        credential = await self._credential(ex, decision, up.credential, task)
        assert credential is not None
        self.rt.providers[credential.provider].apply(out, credential)
        target = f"{out.path}?{out.query}" if out.query else out.path
        again = await open_upstream(self.rt.sessions.get(up.name), out.method, target, out.headers, data)
        if again.status == 401:
            again.release()
            raise RequestRefused("auth_token_refused", "mcp auth: the server refused the token obtained for its "
                                                       "resource")
        return again

    def _used(self, ex: Exchange, tokens_in: int, tokens_out: int) -> None:
        """The usage an LLM answer reported: in the event, and charged to the rule's budget. A stream may
        report it more than once, each time the whole so far: only what is new is charged."""
        charged = (ex.tokens_in or 0) + (ex.tokens_out or 0)
        ex.tokens_in, ex.tokens_out = tokens_in, tokens_out
        if ex.budget is not None and tokens_in + tokens_out > charged:
            key, budget = ex.budget
            self.budgets.charge(key, budget, tokens_in + tokens_out - charged)

    def _response_filter(self, ex: Exchange, upstream: UpstreamResponse, task: Task | None,
                         sent: tuple[Route, OutboundRequest, Decision]) -> ChunkFilter | WholeAnswer | None:
        """LLM answers report usage for the budget; A2A answers to a message bind the task ids they name to this
        agent and task; MCP answers keep only the tools, resources and prompts policy lets the agent use (every
        page), and the server's requests to the agent are decided (``sidecar.mcp_server``)."""
        if ex.llm is not None and upstream.status == 200:
            return usage_observer(_media_type(upstream), lambda tokens_in, tokens_out: self._used(ex, tokens_in,
                                                                                                  tokens_out))
        if ex.a2a is not None and ex.a2a.method in MESSAGE_METHODS and upstream.status == 200:
            return self.a2a_tasks.observer(ex.upstream or "", self._a2a_owner(task), _media_type(upstream))
        if ex.protocol != "mcp" or ex.facts is None or upstream.status != 200:
            return None
        route, out, decision = sent

        def credential(sub: Exchange) -> Awaitable[Credential | None]:
            return self._credential(sub, decision, route.upstream.credential, task)

        gate = self.server_requests.gate(ex, out, self.rt.sessions.get(route.upstream.name), credential)
        ref = ex.rpc if out.method == "POST" else None
        ending = None
        if ref is not None and ref.expects_reply:
            def ending(refusal: Refusal) -> bytes:  # the request's JSON-RPC error, so the agent is not left waiting
                error = rpc_error(ref, refusal, ex.rule_id, ex.decision_id, ex.protocol)
                return b"event: message\ndata: " + orjson.dumps(error) + b"\n\n"

        return answer_filter(self.rt.policy, ex.facts, ex.mcp_method, upstream.headers, gate, ending)


class Inbound:
    """Callers of the agent: mTLS peer, optional human token, policy, then the agent on loopback."""

    def __init__(self, rt: Runtime, identity: InboundIdentity) -> None:
        self.rt, self.identity = rt, identity
        self.a2a_tasks = A2aTasks()  # inbound.protocol a2a: the agent's tasks, bound to their caller

    def handle(self, request: IncomingRequest) -> Awaitable[Answer]:
        ex = Exchange("inbound", method=request.method)
        return serve_exchange(self.rt, request, ex, lambda: self._exchange(request, ex), on_end=self._end_task)

    async def _exchange(self, request: IncomingRequest, ex: Exchange) -> Answer:
        rt = self.rt
        inbound = rt.config.inbound
        assert inbound is not None
        check_headers(request, inbound.limits.max_headers, inbound.limits.max_header_bytes)
        peer = self.identity.peer(request)
        ex.caller_id = str(peer.spiffe_id)
        ex.trace_id, traceparent = traceparent_for(request.headers)
        raw_path, _, query = request.target.partition("?")
        ex.path = canonical_path(raw_path)
        deadline = None  # a gRPC caller's own (grpc-timeout), as outbound
        if is_grpc(request):  # a gRPC caller of the agent: its service and method, its status
            note_call(ex, ex.path)
            timeout = call_timeout(request.headers)
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        echo_method(request.method, False)
        caller = await self._caller(request, ex, peer)
        rt.revocations.check_agent(rt.agent.id)
        rt.revocations.check_subject(ex.principal)
        body = RequestBody(request, inbound.limits, inbound.timeouts.idle)
        if inbound.protocol == "a2a":
            await self._a2a(request, ex, body, inbound.limits.max_body_bytes)
        if body.form:
            await body.read()
        forwarded = clean_request_headers(request.headers, rt.inbound_drop)
        reading = screen(forwarded, query, body.whole, inbound.pass_headers, DEFAULT_OPTIONS, rt.sessions.agent_base_path)
        ex.override = reading.event()
        ex.facts = facts = build_facts(
            direction="inbound", method=request.method, scheme="https", host=_inbound_host(request), path=ex.path,
            query=query, headers=forwarded, size=body.size, upstream=None,
            agent=rt.agent, caller_id=ex.caller_id, principal=ex.principal, delegation=ex.delegation,
            grpc_service=ex.grpc_service, grpc_method=ex.grpc_method, a2a=ex.a2a)
        decision = rt.policy.decide(facts, *reading.alternatives(facts))
        if apply_decision(ex, decision):
            await rt.approvals.hold(ex)
        headers = agent_headers(forwarded, request, rt.agent.id, caller.peer, traceparent)
        if caller.actor_type == "human":
            task = self._open_task(caller, request)
            ex.task_id, ex.task_trigger = task.id, task.trigger
            headers[TASK_HEADER] = task.id
        data = body.to_send()
        pool = rt.sessions.agent()
        headers["Host"] = pool.host_header
        target = rt.sessions.agent_base_path + ex.path + (f"?{query}" if query else "")
        if deadline is not None:
            headers[TIMEOUT] = format_timeout(_remaining(deadline))
        opening = open_upstream(pool, request.method, target, headers, data)
        upstream = await (opening if deadline is None else _by(deadline, opening))
        learn = self._a2a_filter(request, ex, upstream)
        relaying = relay_exchange(request, ex, upstream, rt.metrics, learn)
        answer = await (relaying if deadline is None else _relayed(deadline, ex, relaying))
        if ex.protocol == "grpc":
            ex.grpc_status = grpc_status(upstream)
        return answer

    def _a2a_filter(self, request: IncomingRequest, ex: Exchange, upstream: UpstreamResponse) -> ChunkFilter | None:
        """The agent's answer to a message binds its task ids to the caller; its card is checked to
        name the address the caller reached the sidecar at."""
        if ex.protocol != "a2a" or upstream.status != 200:
            return None
        if ex.a2a is not None:
            if ex.a2a.method not in MESSAGE_METHODS:
                return None
            return self.a2a_tasks.observer("", self._a2a_owner(ex), _media_type(upstream))
        if request.method != "GET" or ex.path not in CARD_PATHS:
            return None
        try:
            host, port = normalize_host(request.headers.get("Host", ""), "https")
        except Refusal:
            host, port = "", 0  # no address to compare with: every URL the card names is reported

        def astray(urls: list[str]) -> None:
            self.rt.metrics.a2a_card_mismatches.inc()
            log.warning("a2a_card_points_around_sidecar", path=ex.path, urls=urls[:8],
                        expected=f"https://{host}:{port}", decision_id=ex.decision_id)

        return card_observer(host, port, astray)

    async def _a2a(self, request: IncomingRequest, ex: Exchange, body: RequestBody, max_bytes: int) -> None:
        """The agent serves A2A: a POST is one call, parsed as strictly as outbound, and a task it names
        must have been created for this caller (peer and human)."""
        ex.protocol = "a2a"
        if is_websocket(request):
            raise RequestRefused("bad_request", "a2a: WebSocket upgrades to an A2A agent are refused")
        if request.method != "POST":
            return  # the agent card and other plain reads: HTTP rules
        call = parse_a2a_request(await body.read(), request.headers.get("Content-Type"), max_bytes)
        ex.a2a, ex.rpc = call, call.rpc
        if call.task_id is not None:
            self.a2a_tasks.check("", call.task_id, self._a2a_owner(ex), who="caller (peer and principal)")

    @staticmethod
    def _a2a_owner(ex: Exchange) -> tuple[str | None, ...]:
        """Whom an inbound task belongs to: the calling peer and the human it acts for (if any)."""
        principal = ex.principal
        return (ex.caller_id, *(principal if principal is not None else (None, None)))

    async def _caller(self, request: IncomingRequest, ex: Exchange, peer: PeerIdentity) -> Caller:
        """The verified peer and the token it carries: whom it acts for."""
        caller = Caller(peer, await self.identity.token(request, peer))
        ex.principal, ex.actor_type, ex.act_chain = caller.principal, caller.actor_type, caller.act_chain
        ex.delegation = caller.delegation
        return caller

    def _open_task(self, caller: Caller, request: IncomingRequest) -> Task:
        """A human's call opens a task: the agent's outbound calls name it, and act for that human."""
        rt, token = self.rt, caller.token
        inbound = rt.config.inbound
        assert inbound is not None and token is not None
        task = rt.tasks.open(principal=(token.issuer, token.subject), subject_token=token.token,
                             delegation="delegated", actor_type=token.actor_type,
                             trigger=request.headers.get(inbound.task_trigger_header), ttl=rt.config.tasks.ttl,
                             token_exp=token.expires_at, act_chain=token.act_chain)
        rt.metrics.active_tasks.set(rt.tasks.open_count)
        return task

    def _end_task(self, ex: Exchange) -> None:
        if ex.task_id and self.rt.config.tasks.end == "response":
            self.rt.tasks.end(ex.task_id)


def _remaining(deadline: float) -> float:
    """Seconds left before a gRPC call's deadline; ``deadline_exceeded`` once none are."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise EXPIRED
    return left


async def _by(deadline: float, opening: Coroutine[Any, Any, UpstreamResponse]) -> UpstreamResponse:
    """The upstream's response head before a gRPC call's deadline (and the upstream's own timeouts), else
    ``deadline_exceeded`` (without a deadline, ``opening`` is awaited as it is: one coroutine less)."""
    try:
        _remaining(deadline)
    except BaseException:
        opening.close()  # never started: no "never awaited" warning
        raise
    try:
        async with asyncio.timeout_at(deadline):
            return await opening
    except TimeoutError:
        raise EXPIRED from None


async def _relayed(deadline: float, ex: Exchange, relaying: Awaitable[Answer]) -> Answer:
    """The relay; a response still streaming at a gRPC call's deadline is cut then, as a revocation cuts one."""
    current = asyncio.current_task()
    assert current is not None
    expiry = asyncio.get_running_loop().call_at(deadline, _expire, ex, current)
    current = None  # a cut task's exception holds this frame: no cycle back to the task (the handle has it)
    try:
        return await relaying
    finally:
        expiry.cancel()


def _expire(ex: Exchange, task: asyncio.Task[Any]) -> None:
    ex.outcome, ex.reason_detail = "cut", "grpc: the call's grpc-timeout ran out mid-response"
    task.cancel()


def _inbound_host(request: IncomingRequest) -> str:
    """The Host the caller named, normalized and without its port (rules name hosts, not ports)."""
    try:
        return normalize_host(request.headers.get("Host", ""), "https")[0]
    except Refusal:
        return ""


def _media_type(upstream: UpstreamResponse) -> str:
    return upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _opened(ex: Exchange, status: int) -> None:
    ex.status = ex.upstream_status = status


def _ws_closed(ex: Exchange) -> None:
    ex.outcome = "completed"
