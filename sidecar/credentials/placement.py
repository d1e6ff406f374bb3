"""Where a secret goes on the outgoing request: a header, after a scheme such as ``Bearer ``, or
a query parameter.

Read once at config load (``header:``, ``query:``, ``scheme:``) into a frozen :class:`Placement`.
:meth:`Placement.format` builds what is placed once per credential (when it is minted, or at
load for a static one); per request :meth:`Placement.apply` only sets it. ``static`` places its
value in a header or the query, ``jwt_assertion`` its token in a header, and the OAuth grants
their access token in ``Authorization: Bearer`` (:data:`BEARER`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from sidecar.credentials.base import OutboundRequest
from sidecar.fields import Fields

AUTHORIZATION = "Authorization"
BEARER_SCHEME = "Bearer "


@dataclass(frozen=True, slots=True)
class Placement:
    """A header (``scheme`` goes before the secret) or, with ``header`` None, a query parameter."""

    header: str | None
    query: str | None = None
    scheme: str = ""

    def format(self, secret: str) -> str:
        """The header value, or the query's ``name=value`` pair (both percent-encoded)."""
        if self.header is not None:
            return self.scheme + secret
        return f"{quote(self.query or '', safe='')}={quote(secret, safe='')}"

    def apply(self, out: OutboundRequest, placed: str) -> None:
        """Set what :meth:`format` built: the header replaces the agent's, the pair joins the query."""
        if self.header is not None:
            out.headers[self.header] = placed
        else:
            out.query = f"{out.query}&{placed}" if out.query else placed


BEARER = Placement(AUTHORIZATION, scheme=BEARER_SCHEME)


def header_or_query(f: Fields) -> Placement | None:
    """``header: NAME`` (with an optional ``scheme``) or ``query: NAME``: exactly one."""
    header, query = f.text("header"), f.text("query")
    scheme = f.text("scheme", "")
    named_once = (header is None) != (query is None)
    if not named_once:
        f.error("", "needs exactly one of header: NAME or query: NAME")
    if header is not None and not _header_name(f, header):
        return None
    return Placement(header, query, scheme) if named_once else None


def header_only(f: Fields, default: str = AUTHORIZATION) -> Placement | None:
    """``header: NAME`` (default ``Authorization``) and ``scheme``, ``Bearer `` for Authorization."""
    name = f.text("header", default)
    valid = _header_name(f, name)
    scheme = f.text("scheme", BEARER_SCHEME if name.lower() == AUTHORIZATION.lower() else "")
    return Placement(name, scheme=scheme) if valid else None


def _header_name(f: Fields, name: str) -> bool:
    if "_" in name or ":" in name or not name.isascii() or not name.strip() or " " in name:
        f.error("header", "must be an HTTP header name without '_', ':' or spaces")
        return False
    return True
