"""What a response must never carry back to the agent: the secret the sidecar attached.

Upstreams echo what they received: the ordinary "same URL plus a slash" redirect keeps the
query (and a ``static`` query credential in it), a ``Link`` to the next page or a
``Content-Location`` repeats the URL, a ``Refresh`` names it, Apache's ``Header echo`` repeats
a request header. Every credential that carries a secret gets an :class:`EchoGuard`, built
once with the credential (at load for static ones, when minted for the others); per response
only that guard looks, and only at the response headers:

- the secret is found raw or percent-encoded (either case of the hex, ``+`` for a space,
  encoded twice);
- a query parameter whose value is the secret is removed from the header, so that a redirect
  stays useful; a header that still carries the secret in any form is dropped.

A redirect whose headers echoed the secret is relayed without its body, which repeats the URL for
humans (``sidecar.forward.relay``). A short body sent whole (``relay.SMALL_BODY``, framed by its
``Content-Length``; gzip and deflate decoded to look) is searched too: an error page that repeats the
request (S3's ``SignatureDoesNotMatch`` holds the canonical request, session token and all; a debug
endpoint prints its headers) gets every form of the secret replaced by ``<redacted>``. Streamed and
long bodies are not searched: they are the upstream's data, relayed as they arrive.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from itertools import chain
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from multidict import CIMultiDict

# sep, name=value of one query parameter, wherever a URL appears in a header value
# (Location, Link's <...>, Refresh's url=...); a value stops where a URL or a header part ends.
_PARAM = re.compile(r"[?&;][^=&#;?\s<>\"',]*=([^&#;?\s<>\"',]*)")
_LEADING_AMP = re.compile(r"\?&+")
_BARE_QUERY = re.compile(r"\?(?=[#>\s\"',;]|$)")
_DECODINGS = 2  # percent-decoded up to twice: a value encoded twice is found too
_HEX = re.compile(r"%[0-9A-F]{2}")
REDACTED = b"<redacted>"


class EchoGuard:
    """One secret value, and the response headers that would hand it back."""

    __slots__ = ("_secret", "_in_bodies")

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._in_bodies = _body_forms(secret)

    def __repr__(self) -> str:
        return "EchoGuard(<redacted>)"

    def carried(self, text: str) -> bool:
        """Does ``text`` hold the secret, raw or percent-encoded in any way listed above?"""
        return any(self._secret in form for form in _forms(text))

    def scrub(self, headers: CIMultiDict[str]) -> tuple[CIMultiDict[str], tuple[str, ...]]:
        """The headers without the secret, and what was done (``"location: query parameter removed"``)."""
        if not self._maybe_in(headers):
            return headers, ()
        if not any(self.carried(name) or self.carried(value) for name, value in headers.items()):
            return headers, ()
        kept: CIMultiDict[str] = CIMultiDict()
        done: list[str] = []
        for name, value in headers.items():
            if not (self.carried(name) or self.carried(value)):
                kept.add(name, value)
                continue
            cleaned = self._without_param(value)
            if self.carried(name) or self.carried(cleaned):
                what = "a header whose name carries it" if self.carried(name) else name.lower()
                done.append(f"{what}: dropped")
                continue
            kept.add(name, cleaned)
            done.append(f"{name.lower()}: query parameter removed")
        return kept, tuple(done)

    def scrub_body(self, body: bytes) -> bytes | None:
        """``body`` with every form of the secret replaced by ``<redacted>``; None when it holds none."""
        if all(body.find(form) == -1 for form in self._in_bodies):  # find: bytes' `in` raises a TypeError inside
            return None
        for form in self._in_bodies:  # longest first: no form is left half-replaced by a shorter one
            body = body.replace(form, REDACTED)
        return body

    def _maybe_in(self, headers: CIMultiDict[str]) -> bool:
        """One look at every name and value at once: False only when none can carry the secret in any
        form (nothing to decode and no raw copy). A match across two joined headers is only a false
        alarm: the header-by-header look above decides."""
        text = "\n".join(chain.from_iterable(headers.items()))
        return "%" in text or "+" in text or self._secret in text

    def _without_param(self, value: str) -> str:
        def drop(m: re.Match[str]) -> str:
            if not any(self._secret == form for form in _forms(m.group(1))):
                return m.group(0)
            return "?" if m.group(0)[0] == "?" else ""

        cleaned = _PARAM.sub(drop, value)
        if cleaned == value:
            return value
        return _BARE_QUERY.sub("", _LEADING_AMP.sub("?", cleaned))


def _forms(text: str) -> Iterator[str]:
    """``text`` as it is, then percent-decoded (plain and form-style), up to twice."""
    yield text
    for _ in range(_DECODINGS):
        if "%" not in text and "+" not in text:
            return
        yield unquote_plus(text)
        text = unquote(text)
        yield text


def _body_forms(secret: str) -> tuple[bytes, ...]:
    """The secret as a body may repeat it: raw, percent-encoded (either case of the hex, ``+`` for a
    space, twice), JSON-escaped (``\\/``), HTML/XML-escaped; longest first."""
    encoded = quote(secret, safe="")
    forms = {secret, encoded, _HEX.sub(lambda m: m.group(0).lower(), encoded), quote_plus(secret),
             quote(encoded, safe=""), html.escape(secret), json.dumps(secret)[1:-1],
             json.dumps(secret)[1:-1].replace("/", "\\/")}
    return tuple(sorted((form.encode() for form in forms), key=len, reverse=True))


def guard_for(secret: str | None) -> EchoGuard | None:
    """The guard of one attached secret (none without a value). A very short secret makes the guard
    drop unrelated headers that happen to contain it: failing closed, never handing it back."""
    return EchoGuard(secret) if secret else None
