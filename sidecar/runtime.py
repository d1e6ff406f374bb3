"""The running sidecar's state, as the pipeline stages see it.

Built once from a validated config by ``sidecar.app``; the policy set is swapped whole on
reload (a request reads it once, so requests in flight finish under the policy they
started with). Also here: the register of exchanges in flight (so that a revocation can
cut them), the relay of responses, and ``record``, the one exit of every exchange.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import Config
from sidecar.credentials.base import CredentialProvider
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import CredentialUnavailable, IdentityRefused, UpstreamFailed
from sidecar.exchange import AgentInfo, Exchange
from sidecar.mcp_filter import tools_list_filter
from sidecar.forward.relay import ClientGone, HeaderFilter, UpstreamReset, relay
from sidecar.forward.sessions import Sessions
from sidecar.http.headers import VIA, inbound_drop_set, request_drop_set
from sidecar.observe.decision_log import emit_event
from sidecar.observe.metrics import Metrics
from sidecar.policy.engine import Decision, Facts, PolicySet
from sidecar.revocation import Revocation, Revocations
from sidecar.routing import Router
from sidecar.tasks import Task, TaskRegistry
from sidecar.forward.http11 import UpstreamResponse

log = structlog.get_logger("sidecar.runtime")


def mark_cut(ex: Exchange) -> None:
    """A cancelled exchange: cut by a revocation (already marked) or by the client going away.

    One already completed stays so: a WebSocket closed normally whose client then went away before
    the closing handshake had finished on the other side."""
    if ex.outcome not in ("cut", "completed"):
        ex.outcome, ex.reason_detail = "cut", "client gone"


class ActiveExchanges:
    """Exchanges in flight, so that a revocation can cut the ones it names."""

    def __init__(self) -> None:
        self._active: dict[int, tuple[Exchange, asyncio.Task[Any]]] = {}

    def track(self, ex: Exchange) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active[id(ex)] = (ex, task)

    def untrack(self, ex: Exchange) -> None:
        self._active.pop(id(ex), None)

    def cut(self, predicate: Callable[[Exchange], bool], why: str) -> int:
        victims = [(ex, task) for ex, task in self._active.values() if predicate(ex)]
        for ex, task in victims:
            ex.outcome, ex.reason_detail = "cut", why
            task.cancel()
        return len(victims)

    def __len__(self) -> int:
        return len(self._active)


@dataclass
class Runtime:
    config: Config
    agent: AgentInfo
    metrics: Metrics
    router: Router
    policy: PolicySet
    providers: dict[str, CredentialProvider]
    credentials: CredentialCache
    tasks: TaskRegistry
    revocations: Revocations
    sessions: Sessions
    exchanges: ActiveExchanges
    verifier: Any = None  # sidecar.identity.jwt.JwtVerifier, when inbound.jwt has issuers
    acceptor: Any = None  # sidecar.identity.mtls.MtlsAcceptor of the inbound listener
    approvals: Any = None  # sidecar.approvals.Approvals
    signer: Any = None  # sidecar.identity.signing.Signer
    interceptor: Any = None  # sidecar.connect.Interceptor: CONNECT with TLS interception
    identity: Any = None  # sidecar.identity.source.IdentitySource: our SVID

    def __post_init__(self) -> None:
        out = self.config.outbound
        self.drop_sets = {name: request_drop_set(out.strip_headers, up.pass_headers)
                          for name, up in out.upstreams.items()}
        self.upstream_credentials = frozenset((up.credential, name) for name, up in out.upstreams.items()
                                              if up.credential)
        inbound = self.config.inbound
        self.inbound_drop = inbound_drop_set(inbound.pass_headers if inbound else ())
        self.tasks.on_end(self._task_ended)
        self.revocations.on_apply(self._enforce_revocation)

    # -- stages ---------------------------------------------------------------------------
    def decide(self, facts: Facts, *others: Facts) -> Decision:
        return self.policy.decide(facts, *others)

    def check_credential_for(self, credential: str, upstream: str) -> None:
        """A credential goes only to an upstream it is configured for: the upstream's own
        ``credential:``, or a rule that names both (a check of its own, after policy's)."""
        pair = (credential, upstream)
        if pair not in self.upstream_credentials and pair not in self.policy.credential_upstreams:
            raise CredentialUnavailable(f"credentials: {credential} is not configured for upstream {upstream}; "
                                        "it is never sent there", detail="credential not configured for upstream")

    def peer_of(self, request: web.BaseRequest) -> Any:
        peer = self.acceptor.peer_of(request.transport) if self.acceptor is not None else None
        if peer is None:
            raise IdentityRefused("peer_unverified", "identity: no verified client certificate on this connection")
        if peer.not_after.timestamp() <= time.time():  # a kept-alive connection does not outlive the SVID
            raise IdentityRefused("peer_unverified", "identity: the caller's certificate has expired since the "
                                                     "handshake; reconnect with a current SVID")
        self.revocations.check_caller(peer.spiffe_id)
        return peer

    async def inbound_token(self, request: web.BaseRequest, peer: Any) -> Any:
        from sidecar.identity.jwt import bearer_token

        inbound = self.config.inbound
        assert inbound is not None
        values = request.headers.getall("Authorization", ())
        if self.verifier is None:
            return None
        token = bearer_token(values)
        if token is None:
            if inbound.jwt_required:
                raise IdentityRefused("token_invalid", "identity: a bearer token is required on this listener")
            return None
        verified = await self.verifier.verify(token)
        check_certificate_binding(verified.claims, peer.cert_sha256)
        return verified

    def agent_headers(self, forwarded: CIMultiDict[str], request: web.BaseRequest, peer: Any,
                      traceparent: str) -> CIMultiDict[str]:
        """The caller's forwarded headers (a copy: policy decided on them) plus the ones the sidecar writes."""
        from sidecar.identity.x509 import xfcc_value

        headers = forwarded.copy()
        headers["X-Forwarded-Client-Cert"] = xfcc_value(self.agent.id, peer)
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = "https"
        headers["traceparent"] = traceparent
        headers["Via"] = VIA
        return headers

    def open_task_for(self, token: Any, request: web.BaseRequest) -> Task:
        inbound = self.config.inbound
        assert inbound is not None
        task = self.tasks.open(principal=(token.issuer, token.subject), subject_token=token.token,
                               delegation="delegated", actor_type=token.actor_type,
                               trigger=request.headers.get(inbound.task_trigger_header), ttl=self.config.tasks.ttl,
                               token_exp=token.expires_at, act_chain=token.act_chain)
        self.metrics.active_tasks.set(self.tasks.open_count)
        return task

    def end_inbound_task(self, ex: Exchange) -> None:
        if ex.task_id and self.config.tasks.end == "response":
            self.tasks.end(ex.task_id)

    async def relay(self, request: web.BaseRequest, ex: Exchange,
                    upstream: UpstreamResponse) -> web.StreamResponse:
        ex.upstream_status = upstream.status
        try:
            transform = self._response_filter(ex, upstream)
            response = await relay(request, upstream, transform, on_prepared=lambda s: _set_status(ex, s),
                                   scrub=_echo_scrub(ex))
            ex.outcome = "completed"
            return response
        except UpstreamReset as exc:
            ex.outcome = "upstream_reset"
            ex.reason_detail = ("upstream sent nothing for the idle timeout mid-response" if exc.timed_out
                                else "upstream reset the connection mid-response")
            self.metrics.upstream_errors.labels(self.metrics.upstream_label(ex.upstream),
                                                "idle_timeout" if exc.timed_out else "reset").inc()
            if not exc.started:
                raise UpstreamFailed("upstream_unreachable", "upstream: connection reset before the response") from None
            _abort(request)
            return exc.response  # type: ignore[return-value]
        except ClientGone as exc:
            ex.outcome, ex.reason_detail = "cut", "client gone"
            return exc.response  # type: ignore[return-value]
        except asyncio.CancelledError:  # cut (a revocation, the end of the drain): never a short "whole" response
            _abort(request)
            raise
        finally:
            upstream.release()

    def _response_filter(self, ex: Exchange, upstream: UpstreamResponse) -> Any:
        if ex.mcp_method != "tools/list" or ex.facts is None or upstream.status != 200:
            return None
        return tools_list_filter(self, ex, upstream.headers)

    # -- the one exit ----------------------------------------------------------------------
    def record(self, ex: Exchange) -> None:
        m = self.metrics
        upstream = "agent" if ex.direction == "inbound" else m.upstream_label(ex.upstream)
        if ex.outcome == "refused" and ex.status is None:
            ex.status = 500
        m.observe_request(ex.direction, ex.decision, upstream, time.perf_counter() - ex.started)
        if ex.rule_id is not None:
            m.count_decision(ex.direction, ex.decision, ex.rule_id)
        if ex.direction == "outbound" and ex.decision == "allow" and ex.delegation in ("delegated", "impersonated"):
            m.delegated_requests.labels(ex.delegation).inc()
        if ex.reason in ("upstream_unreachable", "upstream_protocol_error", "upstream_timeout"):
            m.upstream_errors.labels(upstream, ex.reason).inc()
        emit_event(ex.event(self.agent), kept=ex.kept)

    # -- ends and revocations --------------------------------------------------------------
    def _task_ended(self, task: Task) -> None:
        self.credentials.drop_task(task.id)
        self.metrics.active_tasks.set(self.tasks.open_count)
        if task.ended == "revoked":
            self.exchanges.cut(lambda ex: ex.task_id == task.id, "revoked: task")

    def _enforce_revocation(self, entry: Revocation) -> None:
        kind, ident = entry.kind, entry.id
        if kind == "task":
            self.tasks.revoke(ident)
        elif kind == "subject":
            self.tasks.revoke_subject(ident)
            self.exchanges.cut(lambda ex: ex.principal is not None and ex.principal[1] == ident, "revoked: subject")
        elif kind == "credential":
            self.credentials.drop_where(lambda c, r: ident in (c.id, c.provider))
            self.exchanges.cut(lambda ex: ex.credential is not None and ident in (ex.credential.id,
                                                                                  ex.credential.provider),
                               "revoked: credential")
        elif kind == "agent" and ident == self.agent.id:
            self.credentials.drop_all()
            self.exchanges.cut(lambda ex: True, "revoked: agent")
        elif kind == "agent":  # another agent: cut its calls into ours
            self.exchanges.cut(lambda ex: ex.caller_id == ident, "revoked: caller")


def check_certificate_binding(claims: Any, cert_sha256_hex: str) -> None:
    """RFC 8705: a token bound to a certificate is only good from a caller presenting that certificate."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or "x5t#S256" not in cnf:
        return
    presented = base64.urlsafe_b64encode(bytes.fromhex(cert_sha256_hex)).rstrip(b"=").decode()
    if not hmac.compare_digest(str(cnf["x5t#S256"]), presented):
        raise IdentityRefused("token_invalid", "identity: the token is bound to another client certificate "
                                               "(cnf.x5t#S256)")


def _echo_scrub(ex: Exchange) -> HeaderFilter | None:
    """Response headers never hand the agent the credential attached to its request; the event says what went."""
    guard = ex.credential.echo if ex.credential is not None else None
    if guard is None:
        return None

    def scrub(headers: CIMultiDict[str]) -> CIMultiDict[str]:
        kept, done = guard.scrub(headers)
        if done:
            note = "response headers echoed the attached credential: " + "; ".join(done)
            ex.reason_detail = f"{ex.reason_detail}; {note}" if ex.reason_detail else note
        return kept

    return scrub


def _set_status(ex: Exchange, status: int) -> None:
    ex.status = status


RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP reset


def _abort(request: web.BaseRequest) -> None:
    """The response broke off (upstream reset, or cut): the client must see a broken response, not a short one.

    A reset, not an orderly close: a response framed by the connection's close (an HTTP/1.0 client)
    would otherwise end as if whole."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")  # under TLS too: the TCP socket
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        except OSError:  # already closed by the peer: nothing left to tell it
            pass
    transport.abort()
