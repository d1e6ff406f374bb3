"""The canonical string of an ``hmac_signing`` scheme: declared parts, read from the request as sent.

    parts = canonical_parts(["method", "path", "sorted_query", "header:content-type", "body_hash"])
    message = b"".join(canonical_chunks(parts, Signing(out, "sha256", timestamp="1700000000"), b"\\n"))

Compiled once at config load (an unknown part is a config error); per request each part reads
its value from the :class:`~sidecar.credentials.base.OutboundRequest` after every rewrite, so the
string signed is the request ``sidecar.forward.http11`` writes. The parts:

================  ==============================================================================
``method``        the method, as sent
``host``          ``Host`` as sent
``path``          the forwarded path
``query``         the raw query as sent (with the sidecar's own timestamp, nonce, key id parameters)
``sorted_query``  the query's ``name=value`` pairs sorted by name, then value, joined with ``&``
``target``        the path, and ``?query`` when there is one
``body``          the body bytes as sent
``body_hash``     lowercase hex digest of the body with the scheme's algorithm
``header:NAME``   the header's value as sent, ``""`` when absent; repeated fields joined with ``, ``
``form:NAME``     a field of a form-encoded body as written (a nonce the agent puts in its body)
``timestamp``     the timestamp the sidecar places on this request (``nonce``, ``key_id`` likewise)
``literal:TEXT``  the text itself
``sha256(A, B)``  the raw SHA-256 digest of the listed parts, concatenated (``sha512(...)`` too)
================  ==============================================================================
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from sidecar.credentials.base import OutboundRequest

DIGEST_ALGORITHMS = ("sha256", "sha512")


@dataclass(frozen=True, slots=True)
class Signing:
    """One request being signed, with the values the sidecar places on it."""

    out: OutboundRequest
    algorithm: str  # hashlib name: sha256 | sha512
    timestamp: str = ""
    nonce: str = ""
    key_id: str = ""


Part = Callable[[Signing], bytes]


def _query_pairs(query: str) -> list[str]:
    return [pair for pair in query.split("&") if pair]


def _sorted_query(s: Signing) -> bytes:
    pairs = sorted(_query_pairs(s.out.query), key=lambda pair: pair.partition("=")[::2])
    return "&".join(pairs).encode()


def _body(s: Signing) -> bytes:
    return s.out.body or b""


PARTS: dict[str, Part] = {
    "method": lambda s: s.out.method.encode(),
    "host": lambda s: s.out.headers.get("Host", s.out.host_header).encode(),
    "path": lambda s: s.out.path.encode(),
    "query": lambda s: s.out.query.encode(),
    "sorted_query": _sorted_query,
    "target": lambda s: (f"{s.out.path}?{s.out.query}" if s.out.query else s.out.path).encode(),
    "body": _body,
    "body_hash": lambda s: hashlib.new(s.algorithm, _body(s)).hexdigest().encode(),
    "timestamp": lambda s: s.timestamp.encode(),
    "nonce": lambda s: s.nonce.encode(),
    "key_id": lambda s: s.key_id.encode(),
}
BODY_PARTS = frozenset({"body", "body_hash", "form"})
_NESTED = re.compile(r"(sha256|sha512)\((.*)\)")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True)
class CanonicalParts:
    """The compiled parts, in order, and whether any of them reads the body."""

    parts: tuple[Part, ...]
    reads_body: bool


def canonical_parts(texts: tuple[str, ...]) -> CanonicalParts:
    """Compile the declared parts; ``ValueError`` names the first one that is not a part."""
    compiled, kinds = [], set()
    for text in texts:
        part, used = _part(text.strip(), nested=True)
        compiled.append(part)
        kinds |= used
    return CanonicalParts(tuple(compiled), bool(kinds & BODY_PARTS))


def _part(text: str, *, nested: bool) -> tuple[Part, set[str]]:
    """One part and the kinds it reads (``form`` for ``form:NAME``)."""
    kind, colon, arg = text.partition(":")
    if text in PARTS:
        return PARTS[text], {text}
    if colon and kind == "header" and _HEADER_NAME.fullmatch(arg):
        return lambda s: ", ".join(v.strip() for v in s.out.headers.getall(arg, ())).encode(), {"header"}
    if colon and kind == "form" and arg:
        return lambda s: _form_field(_body(s), arg.encode()), {"form"}
    if colon and kind == "literal":
        value = arg.encode()
        return lambda s: value, {"literal"}
    group = _NESTED.fullmatch(text)
    if group is not None and nested:
        return _digest_of(group.group(1), group.group(2))
    raise ValueError(f"{text!r} is not a canonical part: expected one of {', '.join(PARTS)}, header:NAME, "
                     "form:NAME, literal:TEXT or sha256(PART, ...)")


def _digest_of(algorithm: str, inner: str) -> tuple[Part, set[str]]:
    compiled = [_part(text.strip(), nested=False) for text in inner.split(",")]
    parts = tuple(part for part, _ in compiled)
    kinds = set().union(*(used for _, used in compiled))
    return lambda s: hashlib.new(algorithm, b"".join(p(s) for p in parts)).digest(), kinds


def _form_field(body: bytes, name: bytes) -> bytes:
    """The first ``name=value`` field of a form body, value as written (not decoded); ``b""`` if none."""
    for field_ in body.split(b"&"):
        key, _, value = field_.partition(b"=")
        if key == name:
            return value
    return b""


def canonical_chunks(parts: CanonicalParts, signing: Signing, separator: bytes) -> Iterator[bytes]:
    """The message the scheme's HMAC is computed over, in pieces: a 1 MiB body is fed, not copied."""
    for i, part in enumerate(parts.parts):
        if i and separator:
            yield separator
        yield part(signing)


def without_params(query: str, names: frozenset[str]) -> str:
    """The query without the named parameters (the agent's own signature or timestamp); untouched
    when it has none of them."""
    pairs = _query_pairs(query)
    if not any(pair.partition("=")[0] in names for pair in pairs):
        return query
    return "&".join(pair for pair in pairs if pair.partition("=")[0] not in names)
