"""The inbound identity stage: who is calling the agent, as one typed :class:`Caller`.

The caller's workload is the peer verified at its mTLS handshake (``sidecar.identity.mtls``; a
kept-alive connection does not outlive the certificate it was made with). A human (or another
workload acting for one) is the bearer token it carries, verified against the configured issuers
and, when the token is bound to a certificate (RFC 8705 ``cnf.x5t#S256``), to the one presented.
Both are checked against revocations before anything else happens.
"""

from __future__ import annotations

import base64
import hmac
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from multidict import CIMultiDict

from sidecar.config_model import InboundConfig
from sidecar.errors import IdentityRefused
from sidecar.http.headers import VIA
from sidecar.http.incoming import IncomingRequest
from sidecar.identity.jwt import JwtVerifier, VerifiedToken, bearer_token
from sidecar.identity.x509 import PeerIdentity, xfcc_value
from sidecar.revocation import Revocations

PeerLookup = Callable[[object], PeerIdentity | None]
"""The peer verified on a connection (``MtlsAcceptor.peer_of``), None if none was."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: its workload and, when it carries one, the token of whom it acts for."""

    peer: PeerIdentity
    token: VerifiedToken | None

    @property
    def actor_type(self) -> str:
        return self.token.actor_type if self.token is not None else "workload"

    @property
    def principal(self) -> tuple[str, str] | None:
        return (self.token.issuer, self.token.subject) if self.token is not None else None

    @property
    def delegation(self) -> str:
        return "delegated" if self.actor_type == "human" else "none"

    @property
    def act_chain(self) -> tuple[str, ...]:
        return self.token.act_chain if self.token is not None else ()


class InboundIdentity:
    """Identifies the callers of one inbound listener."""

    def __init__(self, config: InboundConfig, peers: PeerLookup, verifier: JwtVerifier | None,
                 revocations: Revocations) -> None:
        self._config, self._peers, self._verifier, self._revocations = config, peers, verifier, revocations

    def peer(self, request: IncomingRequest) -> PeerIdentity:
        """The workload: verified at the handshake, its certificate still current, not revoked."""
        peer = self._peers(request.connection)
        if peer is None:
            raise IdentityRefused("peer_unverified", "identity: no verified client certificate on this connection")
        if peer.not_after.timestamp() <= time.time():  # a kept-alive connection does not outlive the SVID
            raise IdentityRefused("peer_unverified", "identity: the caller's certificate has expired since the "
                                                     "handshake; reconnect with a current SVID")
        self._revocations.check_caller(str(peer.spiffe_id))
        return peer

    async def token(self, request: IncomingRequest, peer: PeerIdentity) -> VerifiedToken | None:
        """The bearer token, verified (and bound to the peer's certificate if it says so); None: none sent."""
        if self._verifier is None:
            return None
        token = bearer_token(request.headers.getall("Authorization", ()))
        if token is None:
            if self._config.jwt_required:
                raise IdentityRefused("token_invalid", "identity: a bearer token is required on this listener")
            return None
        verified = await self._verifier.verify(token)
        check_certificate_binding(verified.claims, peer.cert_sha256)
        return verified


def check_certificate_binding(claims: Mapping[str, Any], cert_sha256_hex: str) -> None:
    """RFC 8705: a token bound to a certificate is only good from a caller presenting that certificate."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or "x5t#S256" not in cnf:
        return
    presented = base64.urlsafe_b64encode(bytes.fromhex(cert_sha256_hex)).rstrip(b"=").decode()
    if not hmac.compare_digest(str(cnf["x5t#S256"]), presented):
        raise IdentityRefused("token_invalid", "identity: the token is bound to another client certificate "
                                               "(cnf.x5t#S256)")


def agent_headers(forwarded: CIMultiDict[str], request: IncomingRequest, agent_id: str, peer: PeerIdentity,
                  traceparent: str) -> CIMultiDict[str]:
    """The caller's forwarded headers (a copy: policy decided on them) plus the ones the sidecar writes."""
    headers = forwarded.copy()
    headers["X-Forwarded-Client-Cert"] = xfcc_value(agent_id, peer)
    headers["X-Forwarded-For"] = request.remote or ""
    headers["X-Forwarded-Proto"] = "https"
    headers["traceparent"] = traceparent
    headers["Via"] = VIA
    return headers
