"""What of the agent's AWS request is signed, and how its body is.

**Agent headers.** The agent's own signature (``Authorization``, ``X-Amz-Date``,
``X-Amz-Security-Token``, ``X-Amz-Content-Sha256``) is dropped; its payload declaration is read
first (body modes). Signed: ``content-type``, ``content-md5``, ``content-encoding`` and every
``x-amz-*`` header.

**Body modes** (S3, ``X-Amz-Content-Sha256`` as the agent declared it):

- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (boto3's default for uploads over TLS): signed as the
  literal declared; the ``aws-chunked`` framing goes on untouched and unbuffered, and S3
  decodes it and checks the trailing checksum.
- any other ``STREAMING-*`` mode (chunk signatures that chain from the agent's own signature):
  refused, 400, naming the mode;
- a framing declared without a streaming payload, or a streaming payload without its framing
  (``Content-Encoding: aws-chunked``, ``X-Amz-Decoded-Content-Length``, ``X-Amz-Trailer``):
  refused, 400: S3 would store the framing as the object;
- otherwise the body is whole: its SHA-256 is signed (or ``UNSIGNED-PAYLOAD`` where configured).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping
from urllib.parse import unquote

from multidict import CIMultiDict

from sidecar.errors import RequestRefused

# The agent's own signature: dropped before signing (X-Amz-Content-Sha256 is read first).
AGENT_SIGNATURE = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
_SIGNED_PLAIN = frozenset({"content-type", "content-md5", "content-encoding"})
_PRESIGN_PARAMS = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-security-token"})
_SHOW_MAX = 64

STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_FRAMING_HEADERS = ("x-amz-decoded-content-length", "x-amz-trailer")
_DIGITS = re.compile(r"[0-9]{1,19}")


# --- agent headers ---------------------------------------------------------------------


@lru_cache(maxsize=256)  # header names repeat; bounded against an agent inventing names
def is_signed(header: str) -> bool:
    """Whether a header that goes upstream is signed: ``x-amz-*`` and the content headers S3 acts on."""
    lower = header.lower()
    return lower.startswith("x-amz-") or lower in _SIGNED_PLAIN


def refuse_presigned(query: str) -> None:
    """A presigned URL carries the agent's own key: refused rather than sent beside ours."""
    lower = query.lower()
    if "x-amz-" not in lower and "%" not in lower:  # the fast path: no name can decode to one
        return
    for part in query.split("&"):
        name = unquote(part.partition("=")[0]).lower()
        if name in _PRESIGN_PARAMS:
            raise RequestRefused("bad_request", f"credentials: the query carries its own aws signature "
                                                f"({name}); expected an unsigned request, the sidecar signs it")


def _show(text: str) -> str:
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX] + "..."


# --- body modes ------------------------------------------------------------------------


def declares_streaming(headers: Mapping[str, str]) -> bool:
    """Whether the agent declared a streaming payload (then its body is never buffered for signing)."""
    return headers.get("x-amz-content-sha256", "").upper().startswith("STREAMING-")


def streaming_payload(headers: CIMultiDict[str], *, s3: bool) -> str | None:
    """The streaming payload literal to sign as declared; None for a whole body; RequestRefused when the
    declared mode cannot be signed faithfully or the declarations disagree."""
    declared = headers.getall("x-amz-content-sha256", [])
    framed = "aws-chunked" in _codings(headers)
    if len(declared) > 1:
        raise _body_refused("more than one X-Amz-Content-Sha256 header")
    if not declares_streaming(headers):
        if framed or any(name in headers for name in _FRAMING_HEADERS):
            raise _body_refused("an aws-chunked framing (Content-Encoding: aws-chunked, X-Amz-Decoded-Content-"
                                "Length, X-Amz-Trailer) without a streaming X-Amz-Content-Sha256")
        return None
    mode = _show(declared[0])
    if mode != STREAMING_UNSIGNED_TRAILER:
        raise _body_refused(f"the streaming mode {mode}, which the sidecar cannot sign as sent (its chunk "
                            f"signatures chain from the agent's own)")
    if not s3:
        raise _body_refused(f"{mode}, which only s3 services take")
    if not framed or not _DIGITS.fullmatch(headers.get("x-amz-decoded-content-length", "")) \
            or "x-amz-trailer" not in headers:
        raise _body_refused(f"{mode} without its aws-chunked framing (Content-Encoding: aws-chunked, "
                            f"X-Amz-Decoded-Content-Length, X-Amz-Trailer)")
    return mode


def _codings(headers: CIMultiDict[str]) -> set[str]:
    return {c.strip().lower() for value in headers.getall("Content-Encoding", []) for c in value.split(",")}


def _body_refused(what: str) -> RequestRefused:
    return RequestRefused("bad_request", f"credentials: the upload declares {what}; expected a whole body or "
                                         f"{STREAMING_UNSIGNED_TRAILER} with aws-chunked framing")

