"""Header hygiene, both directions: what is never forwarded, and what the sidecar writes itself.

- Hop-by-hop headers (RFC 9110 §7.6.1) are removed both ways, with every header named in
  ``Connection``; ``Via`` and ``X-Forwarded-*`` are written by the sidecar, never trusted from a client.
- Identity headers a fronting proxy would set (``X-Forwarded-User``, ``X-Auth-Request-*``, ...) are
  removed from requests both ways unless ``pass_headers`` lists them.
- ``Expect`` is answered by the sidecar (``sidecar.forward.body``), never forwarded.
- TRACE and TRACK echo the request, credentials included: refused unless an upstream opts in.

What is left is what policy sees and what is forwarded (:func:`clean_request_headers`).
A foundation module: of the sidecar it imports only the error tree.
"""

from __future__ import annotations

import re

from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import RequestRefused

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade",
})
# Headers the sidecar writes itself: whatever a client sent under these names is dropped.
SIDECAR_WRITTEN = frozenset({
    "via", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-forwarded-client-cert", "x-sidecar-task", "host", "traceparent", "tracestate",
})
# Expectations the sidecar answers itself (as Envoy does): never forwarded.
ANSWERED_HERE = frozenset({"expect"})
# Methods whose answer is the request as received, credentials included (TRACK: IIS's TRACE; aiohttp's
# C parser refuses it and a lowercase trace, its pure-Python parser does not).
ECHO_METHODS = frozenset({"TRACE", "TRACK"})
VIA = "1.1 sidecar"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # framed with a Content-Length even when empty


# Identity that upstreams trust from a fronting proxy (oauth2-proxy, Authelia, Kubernetes' front proxy,
# Grafana's auth proxy, cloud identity-aware proxies): asserted by no agent and no caller, either way.
IDENTITY_HEADERS = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-groups",
    "x-forwarded-access-token", "x-remote-user", "x-remote-group", "x-remote-email", "remote-user",
    "remote-groups", "remote-email", "remote-name", "x-webauth-user", "x-authenticated-user",
    "x-authenticated-userid", "x-consumer-id", "x-consumer-username", "x-credential-identifier",
})
IDENTITY_PREFIXES = ("x-auth-request-", "x-remote-extra-", "x-amzn-oidc-", "x-ms-client-principal",
                     "x-goog-authenticated-user-", "cf-access-")


# never recorded in a trust-decision event (observe/headers.py): they carry credentials
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
                                "x-amz-security-token", "x-goog-iam-authorization-token"})
SECRET_NAME = re.compile(r"token|secret|passw|pwd|signature|credential|auth|session|cookie|key|private|jwt|bearer")


def recordable(name: str, credential_headers: frozenset[str] = frozenset()) -> bool:
    """May the value of header ``name`` (lowercase) be written into an event? Not if it can carry a
    credential: the names above, the headers configured credentials go in, a name that reads like a secret."""
    return name not in CREDENTIAL_HEADERS and name not in credential_headers and SECRET_NAME.search(name) is None


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


@dataclass(frozen=True, slots=True)
class DropSet:
    """Request headers never forwarded: lowercase ``names``, and names starting with one of
    ``prefixes`` unless listed in ``keep`` (an upstream's ``pass_headers``)."""

    names: frozenset[str]
    prefixes: tuple[str, ...] = ()
    keep: frozenset[str] = frozenset()


def request_drop_set(strip: Iterable[str] = (), keep: Iterable[str] = ()) -> DropSet:
    """Hop-by-hop, the headers the sidecar writes or answers, and ``strip`` plus the identity
    headers less ``keep``: an upstream may be passed a stripped header, never a hop-by-hop one."""
    kept = frozenset(h.lower() for h in keep)
    removable = (frozenset(h.lower() for h in strip) | IDENTITY_HEADERS) - kept
    return DropSet(HOP_BY_HOP | SIDECAR_WRITTEN | ANSWERED_HERE | removable, IDENTITY_PREFIXES, kept)


def inbound_drop_set(pass_headers: Iterable[str] = ()) -> DropSet:
    """A caller's Authorization never reaches the agent, verified or not: the agent gets a task id instead."""
    return request_drop_set({"authorization"}, pass_headers)


DEFAULT_DROP = request_drop_set()
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def clean_request_headers(headers: CIMultiDictProxy[str], drop: DropSet = DEFAULT_DROP) -> CIMultiDict[str]:
    """A copy without the ``drop`` set and any header named in ``Connection``: the headers that are
    forwarded, and the only ones policy sees (what is matched is what is forwarded)."""
    names, prefixes, keep = drop.names, drop.prefixes, drop.keep
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        listed = connection_listed(headers) - {"keep-alive", "close"}
        if listed:
            names = names | listed
    return CIMultiDict([(k, v) for k, v in headers.items()
                        if (n := k.lower()) not in names and not (n.startswith(prefixes) and n not in keep)])


def clean_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = RESPONSE_DROP
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        drop = drop | connection_listed(headers)
    out = CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
    if "Content-Length" in headers and "Transfer-Encoding" not in headers:
        out["Content-Length"] = headers["Content-Length"]
    return out


def echo_method(method: str, allowed: bool) -> bool:
    """True for TRACE and TRACK, refused unless ``allowed`` (an upstream's ``allow_trace``); the
    pipeline then attaches no credential, so that the echo has none to hand back."""
    if method.upper() not in ECHO_METHODS:
        return False
    if not allowed:
        raise RequestRefused("method_not_allowed", f"request: {method.upper()} is refused: its answer echoes the "
                                                   "request with the credentials it carries (allow_trace opts in)")
    return True


def framed_length(method: str, body: bytes | None) -> str | None:
    """The Content-Length a whole (or absent) body is written with; None: none is written.

    Signers that cover ``content-length`` sign this value (``sidecar.credentials.http_signature``); the
    HTTP/1.1 writer (``sidecar.forward.http11``) writes it."""
    return str(len(body or b"")) if body or method in BODY_METHODS else None
