"""MCP authorization done for the agent: RFC 9728 protected-resource metadata, RFC 8707 resource indicators.

An MCP server that wants a token for itself answers 401 with ``WWW-Authenticate: Bearer
resource_metadata="https://..."``. The sidecar, not the agent, then:

1. fetches that metadata document, over verified TLS only (the upstream's ``ca`` for its own host, the
   system store otherwise), from the upstream's own host or the host of one of its
   ``authorization_servers``; no redirect is followed, the answer is at most 64 KiB of JSON;
2. checks it: ``resource`` is the upstream's URL (same origin, and the upstream's path at or below the
   resource's path), ``authorization_servers`` names one of the upstream's allowed issuers (config
   ``authorization_servers``; by default its credential's ``issuer``): the first such is used;
3. has the upstream's credential (``oauth2_client_credentials`` or ``oauth2_token_exchange``) obtain a
   token with ``resource=`` that resource: cached as every credential, per upstream, resource, scopes and
   task; then the request is sent again, once.

What was learnt is kept per upstream for an hour, so later requests carry the resource's token from the
start. The agent sees neither the dance nor the token: a refusal is ``auth_metadata_unreachable`` (the
document could not be had), ``auth_metadata_refused`` (not from an allowed host, not JSON, another
resource, no allowed authorization server) or ``auth_token_refused`` (the server refused the new token
too), answered as JSON-RPC errors on MCP.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from sidecar.config_model import Upstream
from sidecar.errors import RequestRefused
from sidecar.http.tls import client_ssl_context

MAX_METADATA_BYTES = 64 * 1024
METADATA_TTL = 3600.0
FETCH_TIMEOUT = 10.0
OAUTH_TYPES = frozenset({"oauth2_client_credentials", "oauth2_token_exchange"})
_RESOURCE_METADATA = re.compile(r'(?:^|[\s,])resource_metadata\s*=\s*"([^"]{1,2048})"', re.IGNORECASE)
_DEFAULT_PORTS = {"https": 443, "http": 80}


def resource_metadata_url(headers: CIMultiDictProxy[str]) -> str | None:
    """The ``resource_metadata`` parameter of a Bearer challenge in ``WWW-Authenticate``, or None."""
    for value in headers.getall("WWW-Authenticate", ()):
        if value.lstrip().lower().startswith("bearer"):
            found = _RESOURCE_METADATA.search(value)
            if found is not None:
                return found.group(1)
    return None


def _refused(reason: str, message: str) -> RequestRefused:
    return RequestRefused(reason, f"mcp auth: {message}")


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower().rstrip("."), parts.port or _DEFAULT_PORTS.get(scheme, 0)


@dataclass(frozen=True, slots=True)
class Discovered:
    resource: str
    authorization_server: str
    until: float


class McpAuthorization:
    """What each MCP upstream's protected-resource metadata said, learnt on a 401 and kept a while."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._known: dict[str, Discovered] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._clock = clock

    def resource(self, upstream: str) -> str | None:
        """The resource the upstream's metadata named (its tokens are asked for it), while still fresh."""
        known = self._known.get(upstream)
        return known.resource if known is not None and known.until > self._clock() else None

    async def discover(self, up: Upstream, metadata_url: str) -> str:
        """Fetch and check the metadata a 401 pointed at; the resource to ask a token for."""
        async with self._locks.setdefault(up.name, asyncio.Lock()):  # one fetch at a time per upstream
            document = await _fetch(up, _allowed_url(up, metadata_url))
            resource, server = _checked(up, document)
            self._known[up.name] = Discovered(resource, server, self._clock() + METADATA_TTL)
            return resource


def _allowed_url(up: Upstream, url: str) -> str:
    """https, on the upstream's own host or an allowed issuer's, without userinfo."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.username is not None or parts.fragment:
        raise _refused("auth_metadata_refused", "resource_metadata must be an https URL without userinfo")
    hosts = {_origin(up.url)[1:], *(_origin(server)[1:] for server in up.authorization_servers)}
    if _origin(url)[1:] not in hosts:
        raise _refused("auth_metadata_refused", "resource_metadata is on neither the upstream's host nor an "
                                                "allowed authorization server's")
    return url


async def _fetch(up: Upstream, url: str) -> object:
    own = _origin(url)[1:] == _origin(up.url)[1:]
    ssl = await asyncio.to_thread(client_ssl_context, str(up.ca) if own and up.ca else None)  # reads files
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, ssl=ssl, allow_redirects=False, headers={"Accept": "application/json"}) as r:
            if r.status != 200:
                raise _refused("auth_metadata_unreachable", f"the resource metadata answered http {r.status}")
            body = await r.content.read(MAX_METADATA_BYTES + 1)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise _refused("auth_metadata_unreachable", f"the resource metadata could not be fetched "
                                                    f"({type(exc).__name__})") from None
    if len(body) > MAX_METADATA_BYTES:
        raise _refused("auth_metadata_refused", f"the resource metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _refused("auth_metadata_refused", "the resource metadata is not JSON") from None


def _checked(up: Upstream, document: object) -> tuple[str, str]:
    """The metadata's resource (this upstream) and the first authorization server the upstream allows."""
    if not isinstance(document, dict):
        raise _refused("auth_metadata_refused", "the resource metadata must be a JSON object")
    resource, servers = document.get("resource"), document.get("authorization_servers")
    if not isinstance(resource, str) or not _covers(resource, up.url):
        raise _refused("auth_metadata_refused", "the resource metadata names another resource than the upstream")
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise _refused("auth_metadata_refused", "the resource metadata needs authorization_servers")
    allowed = set(up.authorization_servers)
    chosen = next((s.rstrip("/") for s in servers if s.rstrip("/") in allowed), None)
    if chosen is None:
        raise _refused("auth_metadata_refused", "the resource metadata names no authorization server this "
                                                "upstream allows (authorization_servers)")
    return resource, chosen


def _covers(resource: str, url: str) -> bool:
    """The resource is the upstream: same origin, and the upstream's path at or below the resource's."""
    if "#" in resource or _origin(resource) != _origin(url):
        return False
    base = urlsplit(resource).path.rstrip("/")
    path = urlsplit(url).path.rstrip("/")
    return path == base or path.startswith(base + "/")
