"""The credential provider protocol: turn an allowed decision into the right proof.

A provider is three things (STYLE.md example 1):

- ``cache_key(req)``: what makes two requests share a credential (audience, scopes, and the
  task or certificate when the credential is bound to one);
- ``async fetch(req) -> Credential``: mint or obtain one (called by the cache, never per
  request while a cached one is fresh);
- ``apply(out, credential)``: attach it to the outgoing request (a header, a query
  parameter, a signature).

Providers declare what they need as class attributes: ``needs_body`` (request signing
buffers the body; a provider that can sign some requests unread also has
``needs_body_for(headers)``, see :func:`body_needed`), ``standing`` (a static secret),
``task_bound`` (cached under the task, dropped when it ends).

A provider class is built from ``(name, spec, deps)``, its spec read from config by
``sidecar.credentials.specs``; ``sidecar.credentials.registry`` holds the one table that pairs
each ``type:`` with its spec parser and its builder.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Mapping, Protocol

from multidict import CIMultiDict

from sidecar.credentials.echo import EchoGuard, guard_for
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret
from sidecar.http.headers import framed_length
from sidecar.http.reframe import Reframer
from sidecar.http.target import format_authority


@dataclass(frozen=True, slots=True)
class TaskRef:
    """What a provider may know of the task a request belongs to."""

    id: str
    principal_iss: str | None
    principal_sub: str | None
    subject_token: Secret | None  # the human's verified token; None for an asserted task
    delegation: str  # delegated | asserted


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """What the pipeline asks of a provider for one allowed request."""

    upstream: str
    scopes: tuple[str, ...]
    agent_id: str
    task: TaskRef | None = None
    impersonation_allowed: bool = False
    resource: str | None = None  # RFC 8707: the resource an MCP server's metadata named (the spec's otherwise)


@dataclass(frozen=True, slots=True)
class Credential:
    """A proof for one upstream. ``token`` and ``material`` never appear in a repr.

    ``echo`` guards the responses to requests that carry it (``sidecar.credentials.echo``):
    built here, once per credential, from ``token`` unless the provider passes its own.
    """

    type: str
    provider: str
    id: str | None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    expires_at: float | None = None  # unix time; None: does not expire (standing)
    issued_at: float | None = None
    standing: bool = False
    delegation: str | None = None  # delegated | impersonated, for token exchange results
    act_chain: tuple[str, ...] = ()
    bound_cert_sha256: str | None = None  # RFC 8705 cnf.x5t#S256: only over a connection presenting it
    token: Secret | None = field(default=None, repr=False)
    material: Any = field(default=None, repr=False)
    echo: EchoGuard | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.echo is None and self.token is not None:
            object.__setattr__(self, "echo", guard_for(self.token.reveal()))


@dataclass(slots=True)
class OutboundRequest:
    """The request as it will be sent upstream, after every header rewrite."""

    method: str
    scheme: str
    host: str  # upstream host name, as in the Host header
    port: int
    path: str  # the upstream's base path + the canonical path, as sent
    query: str  # raw query, as sent
    headers: CIMultiDict[str]
    body: bytes | None = None  # only when the provider needs_body
    client_cert_sha256: str | None = None  # the certificate our upstream connection presents
    pass_headers: frozenset[str] = frozenset()  # the upstream's pass_headers: agent headers it may receive
    reframe: Reframer | None = None  # a signer's rewrite of the streamed body (S3's signed aws-chunked uploads)

    @property
    def host_header(self) -> str:
        return format_authority(self.host, self.port, self.scheme)


class CredentialProvider(Protocol):
    name: str
    type: ClassVar[str]
    needs_body: ClassVar[bool]
    task_bound: ClassVar[bool]

    @property
    def standing(self) -> bool:
        """A class attribute, except where the config decides it (``aws_sigv4``'s static source)."""

    def cache_key(self, req: CredentialRequest) -> Hashable: ...

    async def fetch(self, req: CredentialRequest) -> Credential: ...

    def apply(self, out: OutboundRequest, credential: Credential) -> None: ...

    async def aclose(self) -> None: ...


def body_needed(provider: CredentialProvider, headers: Mapping[str, str]) -> bool:
    """Whether to buffer the request body before ``apply``: ``needs_body``, or the provider's own
    ``needs_body_for(headers)`` where it can sign some requests unread (an S3 streaming upload)."""
    per_request = getattr(provider, "needs_body_for", None)
    return provider.needs_body if per_request is None else bool(per_request(headers))


@dataclass(slots=True)
class ProviderDeps:
    """What providers may use, handed over by the application at start-up."""

    agent_id: str
    signer: Any = None  # sidecar.identity.signing.Signer: signs JWTs with identity.signing_key
    svid: Any = None  # current SVID source: .client_context(), .cert_sha256()
    client_session: Callable[..., Any] | None = None  # factory for token-endpoint sessions
    id_key: bytes = b""  # key for keyed hashes of credentials that have no jti
    clock: Callable[[], float] | None = None


def frame_for_signing(provider: str, type_: str, out: OutboundRequest, what: str) -> bytes:
    """The body as ``sidecar.forward.http11`` will send it, with the ``Content-Length`` it will send:
    a signer that covers the body or its length signs these, not the agent's framing."""
    if out.body is None:
        raise CredentialUnavailable(f"credentials: {provider}: the request body was not read; expected it whole "
                                    f"to sign {what}", detail=f"{type_}: no body")
    length = framed_length(out.method, out.body)
    if length is None:
        out.headers.popall("Content-Length", None)
    else:
        out.headers["Content-Length"] = length
    return out.body


def read_token_file(provider: str, path: Path, what: str) -> str:
    """A projected token, read afresh each time it is sent: the kubelet rotates the file in place."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialUnavailable(f"credentials: {provider}: cannot read the {what} {path}",
                                    detail=f"token_file: {type(exc).__name__}") from None
    if not token:
        raise CredentialUnavailable(f"credentials: {provider}: the {what} {path} is empty", detail="token_file: empty")
    return token


def keyed_id(key: bytes, value: str) -> str:
    """A stable credential id that reveals nothing about a secret: HMAC-SHA256, truncated."""
    return "h:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:24]
