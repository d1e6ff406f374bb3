"""The canonical request: paths, hosts and header names (PRODUCT.md, "Canonical path").

What is matched is what is forwarded, and what is signed: the matcher, the forwarder and the
request signer all take their path from :func:`canonical_path`, never from aiohttp's decoded
``request.path`` (callers pass ``request.raw_path``).

    raw target --split_route_prefix--> (upstream, raw rest, raw query)
    raw rest --canonical_path--> rule path --join_base--> upstream path (+ "?" + raw query)
    forward-proxy raw path --canonical_path--> --strip_base--> rule path

Choices made where PRODUCT.md is silent (what an Envoy or nginx user would expect, stricter):

- Raw characters outside RFC 3986 ``pchar`` (space, ``"``, ``<``, ``>``, ``[``, ``]``, ``^``,
  backquote, ``{``, ``|``, ``}``, ``?``) are refused rather than re-encoded: the client must
  percent-encode them, so the bytes forwarded are the bytes the client meant.
- ``//`` is merged *before* dot segments are removed (``/a//../b`` -> ``/b``, as nginx does).
- With ``allow_encoded_slash``, a segment that would become a dot segment once an upstream
  decodes ``%2F`` (``/a/..%2Fadmin``) is refused: the upstream might treat it as one.
- The raw query is forwarded byte for byte; it is only refused for control characters,
  whitespace, ``#`` and non-ASCII (header/request-line injection), see :func:`check_query`.
- Hosts: a last label that is all digits or ``0x...`` must form a valid dotted-quad IPv4
  address (``2130706433``, ``0x7f.1`` and ``127.1`` are refused: resolvers read them as IPs).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.errors import RequestRefused

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
# RFC 3986 section 3.3 pchar without ";" (refused) and "%" (escapes are handled apart), plus "/".
_RAW_OK = frozenset(_UNRESERVED + "!$&'()*+,=:@/")
# Fast path: only safe characters, starts with "/", checked further for "/." and "//".
_CLEAN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9\-._~]+")
_QUERY_BAD = re.compile(r"[\x00-\x20\x7f#]|[^\x00-\x7f]")
_SHOW_MAX = 80


@dataclass(frozen=True, slots=True)
class PathOptions:
    """Per-upstream path handling (``upstreams.<name>.paths`` in sidecar.yaml)."""

    allow_encoded_slash: bool = False
    merge_slashes: bool = True


DEFAULT_OPTIONS = PathOptions()


def _hex_spellings(byte: int) -> set[str]:
    """'2f', '2F' for 0x2F; every upper/lower case mix of the two hex digits."""
    digits = f"{byte:02x}"
    high, low = digits[0], digits[1]
    return {a + b for a in {high, high.upper()} for b in {low, low.upper()}}


def _escape_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Every 2-hex-digit escape (any case) -> its canonical text, or -> why it is refused."""
    decode: dict[str, str] = {}
    refused: dict[str, str] = {}
    for byte in range(256):
        canon, char = f"%{byte:02X}", chr(byte)
        for digits in _hex_spellings(byte):
            if byte < 0x20 or byte == 0x7F:
                refused[digits] = f"encoded control character ({canon}) is not allowed"
            elif byte == 0x5C:
                refused[digits] = "encoded backslash (%5C) is not allowed"
            elif byte == 0x2F:
                refused[digits] = "encoded slash (%2F) is not allowed for this upstream"
            else:
                decode[digits] = char if char in _UNRESERVED else canon
    return decode, refused


_DECODE, _REFUSED_ESCAPES = _escape_tables()
_SLASH_ESCAPES = frozenset({"2f", "2F"})


def _show(text: str) -> str:
    """A path for a message: escaped and truncated."""
    if len(text) > _SHOW_MAX:
        return ascii(text[:_SHOW_MAX]) + "..."
    return ascii(text)


def _refuse(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"paths: {message}")


def _char_problem(char: str) -> str:
    """Why a raw character is refused in a path."""
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"control character (\\x{code:02x}) is not allowed"
    if code > 0x7F:
        return "non-ASCII characters must arrive percent-encoded (UTF-8)"
    named = {"\\": "backslash is not allowed", "#": "fragment (#) is not allowed",
             ";": "path parameters (;) are not allowed", "?": "unexpected '?' in a path"}
    return named.get(char, f"character {char!r} must be percent-encoded")


def _check_raw(text: str, raw_path: str) -> None:
    """Refuse any raw character outside pchar (minus ';') and '/'."""
    if not _RAW_OK.issuperset(text):
        bad = next(c for c in text if c not in _RAW_OK)
        raise _refuse(f"{_char_problem(bad)} in path {_show(raw_path)}")


def _decode(raw_path: str, opts: PathOptions) -> str:
    """Steps 2 and 3: validate characters and escapes, decode unreserved, uppercase the rest."""
    pieces = raw_path.split("%")
    _check_raw(pieces[0], raw_path)
    out = [pieces[0]]
    for piece in pieces[1:]:
        digits = piece[:2]
        text = _DECODE.get(digits)
        if text is None:
            text = _undecodable(digits, opts, raw_path)
        tail = piece[2:]
        _check_raw(tail, raw_path)
        out.append(text)
        out.append(tail)
    return "".join(out)


def _undecodable(digits: str, opts: PathOptions, raw_path: str) -> str:
    """The text of an escape not in the decode table: kept %2F, or a refusal."""
    if digits in _SLASH_ESCAPES and opts.allow_encoded_slash:
        return "%2F"
    problem = _REFUSED_ESCAPES.get(digits)
    if problem is None:
        problem = "invalid percent-escape (expected % and two hex digits)"
    raise _refuse(f"{problem} in path {_show(raw_path)}")


def _remove_dot_segments(path: str, merge_slashes: bool) -> str:
    """Step 4: RFC 3986 section 5.2.4 on an absolute path; merge '//' first when asked."""
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg == "." or (not seg and merge_slashes):
            continue
        else:
            out.append(seg)
    last = segments[-1]
    trailing = last in (".", "..") or (not last and merge_slashes)
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


def _check_hidden_dots(path: str, raw_path: str) -> None:
    """With %2F kept, refuse segments an upstream decoding %2F would read as dot segments."""
    for seg in path.split("/"):
        if "%2F" in seg and any(p in (".", "..") for p in seg.split("%2F")):
            raise _refuse(f"dot segment next to an encoded slash (%2F) in path {_show(raw_path)}")


def has_dot_segment(path: str) -> bool:
    """Whether '.' or '..' appears as a whole segment ('/.well-known' does not count)."""
    if "/." not in path:
        return False
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))


def canonical_path(raw_path: str, opts: PathOptions = DEFAULT_OPTIONS) -> str:
    """The canonical form of a raw request path (no query), or RequestRefused(bad_request)."""
    if _CLEAN.fullmatch(raw_path) and "//" not in raw_path and not has_dot_segment(raw_path):
        return raw_path
    if not raw_path.startswith("/"):
        raise _refuse(f"a path must start with '/', got {_show(raw_path)}")
    decoded = _decode(raw_path, opts)
    if opts.allow_encoded_slash and "%2F" in decoded:
        _check_hidden_dots(decoded, raw_path)
    return _remove_dot_segments(decoded, opts.merge_slashes)


_SLASHES = re.compile(r"//+")
_QUOTED_PAIR = re.compile(r"\\(.)")  # RFC 9110 §5.6.4: a backslash quotes the next character


def equivalent_paths(path: str) -> tuple[str, ...]:
    """Other spellings of a canonical path that an upstream may serve as the same resource: with
    the trailing slash toggled, ``//`` merged (where the upstream keeps them), a kept ``%2F``
    decoded. Deny and approval rules match these too; allow rules match the path as it is."""
    forms = [path]
    if "%2F" in path:
        forms.append(_SLASHES.sub("/", path.replace("%2F", "/")))
    if "//" in path:
        forms.append(_SLASHES.sub("/", path))
    for form in tuple(forms):
        if form != "/":
            forms.append(form[:-1] if form.endswith("/") else form + "/")
    return tuple(dict.fromkeys(f for f in forms if f != path))


def check_query(raw_query: str) -> None:
    """Refuse a raw query with control characters, whitespace, '#' or non-ASCII characters."""
    if _QUERY_BAD.search(raw_query):
        raise _refuse("query contains a control character, whitespace, '#' or non-ASCII "
                      "characters; expected a percent-encoded query")


def split_route_prefix(raw_target: str) -> tuple[str, str, str]:
    """Route-prefix mode: '/name/rest?q' -> (name, raw '/rest' or '/', raw query 'q')."""
    if not raw_target.startswith("/"):
        raise _refuse(f"route-prefix target must start with '/', got {_show(raw_target)}")
    path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise _refuse(f"fragment (#) is not allowed in request target {_show(path)}")
    name, slash, rest = path[1:].partition("/")
    if not name or name in (".", "..") or not _UPSTREAM_NAME.fullmatch(name):
        raise _refuse(f"expected /<upstream>/<path> with a plain upstream name "
                      f"(letters, digits, '-', '.', '_', '~'), got {_show(path)}")
    check_query(query)
    return name, "/" + rest if slash else "/", query


def join_base(base_path: str, canonical: str) -> str:
    """The path sent upstream: base path + canonical path, with no doubled slash."""
    base = base_path.rstrip("/")
    return base + canonical if base else canonical


def strip_base(canonical_full_path: str, base_path: str) -> str | None:
    """Forward-proxy/CONNECT mode: the path under base_path (segment-aligned), or None."""
    base = base_path.rstrip("/")
    if not base:
        return canonical_full_path
    if canonical_full_path == base:
        return "/"
    if canonical_full_path.startswith(base) and canonical_full_path[len(base)] == "/":
        return canonical_full_path[len(base):]
    return None


# --- hosts -----------------------------------------------------------------------------

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")


def _refuse_host(message: str) -> RequestRefused:
    return RequestRefused("bad_request", f"hosts: {message}")


def _split_host_port(authority: str) -> tuple[str, str | None, bool]:
    """'[v6]:p' / 'name:p' / 'name' -> (host, port text or None, bracketed)."""
    if authority.startswith("["):
        inner, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _refuse_host("expected [IPv6]:port in an IPv6 authority")
        return inner, rest[1:] if rest else None, True
    host, colon, port = authority.rpartition(":")
    if not colon:
        return authority, None, False
    if ":" in host:
        raise _refuse_host("an IPv6 address must be in brackets ([::1]:443)")
    return host, port, False


def _parse_port(port: str | None, scheme: str) -> int:
    if port is None:
        return DEFAULT_PORTS[scheme]
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise _refuse_host("expected a port number from 1 to 65535")
    return int(port)


def _canonical_name(host: str, bracketed: bool) -> str:
    """A lowercase DNS name or IP literal, one trailing dot removed; else refused."""
    if bracketed:
        if "%" in host:
            raise _refuse_host("IPv6 zone identifiers are not allowed in an authority")
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise _refuse_host("expected an IPv6 address inside brackets") from None
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise _refuse_host("expected a dotted-quad IPv4 address") from None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _refuse_host("expected a DNS name (letters, digits, '-', dots) or an IP literal")
    return name


@functools.lru_cache(maxsize=1024)
def normalize_host(host: str, scheme: str) -> tuple[str, int]:
    """A Host header or URI authority -> (lowercase name or IP without brackets, port).

    Cached: a sidecar sees a handful of hosts; refusals are not cached (they raise).
    """
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _refuse_host("expected an http, https, ws or wss scheme")
    if not host:
        raise _refuse_host("expected a host, got an empty one")
    if "@" in host:
        raise _refuse_host("userinfo (user@host) is not allowed in an authority")
    if not host.isascii() or not host.isprintable() or any(c.isspace() for c in host):
        raise _refuse_host("expected an ASCII host without whitespace or control characters")
    name, port, bracketed = _split_host_port(host)
    return _canonical_name(name, bracketed), _parse_port(port, scheme)


def format_authority(host: str, port: int, scheme: str) -> str:
    """The inverse of normalize_host: brackets for IPv6, no default port."""
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme.lower()) == port else f"{shown}:{port}"


def authority_matches(host_header: str, uri_authority: str, scheme: str) -> bool:
    """Forward-proxy mode: do the Host header and the absolute URI's authority agree?"""
    return normalize_host(host_header, scheme) == normalize_host(uri_authority, scheme)


# --- header values ---------------------------------------------------------------------

def header_elements(values: Iterable[str]) -> set[str]:
    """The elements of list-valued fields (RFC 9110 §5.6.1): split on commas outside quoted
    strings, whitespace trimmed, empty elements dropped; a quoted element also unquoted. With the
    values themselves and their combination (RFC 9110 §5.3: ``a`` and ``b`` are ``a, b``)."""
    values = tuple(values)
    out = set(values)
    out.add(", ".join(values))
    for value in values:
        if "," in value or '"' in value:
            out.update(_list_elements(value))
    return out


def _list_elements(value: str) -> set[str]:
    elements, start, quoted, escaped = set(), 0, False, False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.add(value[start:i].strip(" \t"))
            start = i + 1
    elements.add(value[start:].strip(" \t"))
    elements.discard("")
    return elements | {_QUOTED_PAIR.sub(r"\1", e[1:-1]) for e in elements if len(e) >= 2 and e[0] == e[-1] == '"'}


# --- header names ----------------------------------------------------------------------

def check_header_names(names: Iterable[str]) -> None:
    """Refuse header names containing '_' (naming the header, never its value)."""
    for name in names:
        if "_" in name:
            raise RequestRefused(
                "bad_request",
                f"headers: header name {_show(name)} contains '_'; "
                "underscores are not allowed in header names (use '-')",
            )
