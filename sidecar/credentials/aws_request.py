"""What of the agent's AWS request is signed, and what an S3 request reads besides its target.

**Agent headers.** S3 acts on every ``x-amz-*`` header it receives, and SigV4 signs them all:
each one the sidecar signs is a power it hands the agent, beyond what policy saw.

- The agent's own signature (``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``,
  ``X-Amz-Content-Sha256``) is dropped; its payload declaration is read first (body modes).
- Signed and forwarded: ``content-type``, ``content-md5``, ``content-encoding`` and the
  ``x-amz-*`` headers boto3's ordinary calls send (:data:`AGENT_HEADERS`,
  :data:`AGENT_PREFIXES`: checksums, object metadata, storage class, encryption, the JSON
  protocols' ``X-Amz-Target``, copy parameters, whose source policy decides on).
- Any other agent ``x-amz-*`` header (``x-amz-acl``, ``x-amz-grant-*``, ``x-amz-tagging``,
  ``x-amz-object-lock-*``, ``x-amz-website-redirect-location``, ...) is refused with a 400
  naming it, unless the upstream lists it in ``pass_headers``: never signed unseen, never
  dropped in a way that changes what the request does.

**Body modes** (S3, ``X-Amz-Content-Sha256`` as the agent declared it):

- ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (boto3's default for uploads over TLS): signed as the
  literal declared; the ``aws-chunked`` framing goes on untouched and unbuffered, and S3
  decodes it and checks the trailing checksum.
- ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` and its ``-TRAILER`` variant: the head is signed with
  the literal, and every chunk (and the trailer) re-signed with the sidecar's key as it streams
  (``sidecar.credentials.aws_chunked``);
- any other ``STREAMING-*`` mode (SigV4a's ECDSA chunk signatures): refused, 400, naming the mode;
- a framing declared without a streaming payload, or a streaming payload without its framing
  (``Content-Encoding: aws-chunked``, ``X-Amz-Decoded-Content-Length``, ``X-Amz-Trailer``):
  refused, 400: S3 would store the framing as the object;
- otherwise the body is whole: its SHA-256 is signed (or ``UNSIGNED-PAYLOAD`` where configured).

**Copy source.** ``x-amz-copy-source`` (CopyObject, UploadPartCopy) names a second object the
request reads: :func:`copy_source` gives the path policy decides a GET of on the same upstream,
and the header value forwarded in its place (what is decided is what is sent). The path is
``/<bucket>/<key>`` (path-style), or ``/<key>`` when the upstream's host is one bucket's
virtual-hosted AWS endpoint (``<bucket>.s3.<region>.amazonaws.com``), which a source in any other
bucket cannot be read through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Mapping
from urllib.parse import unquote

from multidict import CIMultiDict

from sidecar.credentials.aws_chunked import SignedUpload
from sidecar.credentials.sigv4 import MAX_EXPIRES, PRESIGN_PARAMS
from sidecar.errors import RequestRefused
from sidecar.http.target import PathOptions, canonical_path

# The agent's own signature: dropped before signing (X-Amz-Content-Sha256 is read first).
AGENT_SIGNATURE = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
AGENT_HEADERS = frozenset({
    "x-amz-sdk-checksum-algorithm", "x-amz-trailer", "x-amz-decoded-content-length",  # checksums, streaming
    "x-amz-storage-class", "x-amz-expected-bucket-owner", "x-amz-source-expected-bucket-owner",
    "x-amz-metadata-directive",  # CopyObject: keep or replace the metadata
    "x-amz-object-attributes", "x-amz-max-parts", "x-amz-part-number-marker",  # GetObjectAttributes
    "x-amz-optional-object-attributes",  # ListObjectsV2
    "x-amz-target",  # the operation of JSON-protocol services (DynamoDB, KMS, ...)
    "x-amz-user-agent",  # the JavaScript SDK's user agent
})
AGENT_PREFIXES = (
    "x-amz-meta-",  # object metadata
    "x-amz-checksum-",  # x-amz-checksum-crc32, -mode, -algorithm, -type, ...
    "x-amz-server-side-encryption",  # SSE-S3, SSE-KMS, SSE-C
    "x-amz-copy-source",  # the source (decided by policy), its range and conditions
)
_SIGNED_PLAIN = frozenset({"content-type", "content-md5", "content-encoding"})
_PRESIGN_PARAMS = frozenset(name.lower() for name in PRESIGN_PARAMS)
_SHOW_MAX = 64

STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_MODES = frozenset({STREAMING_UNSIGNED_TRAILER, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER})
_TRAILER_NAME = re.compile(r"x-amz-[a-z0-9-]{1,64}")
_FRAMING_HEADERS = ("x-amz-decoded-content-length", "x-amz-trailer")
_DIGITS = re.compile(r"[0-9]{1,19}")

COPY_SOURCE = "x-amz-copy-source"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_VERSION_ID = re.compile(r"versionId=([A-Za-z0-9._\-~]{1,1024})")
_VIRTUAL_HOST = re.compile(r"([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])\.s3(?:[.\-][a-z0-9\-]+)*\.amazonaws\.com(?:\.cn)?")
_KEEP_IN_HEADER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/%")


# --- agent headers ---------------------------------------------------------------------


@lru_cache(maxsize=256)  # header names repeat; bounded against an agent inventing names
def is_signed(header: str) -> bool:
    """Whether a header that goes upstream is signed: ``x-amz-*`` and the content headers S3 acts on."""
    lower = header.lower()
    return lower.startswith("x-amz-") or lower in _SIGNED_PLAIN


@lru_cache(maxsize=256)
def _sent_by_default(lower: str) -> bool:
    """Not an ``x-amz-*`` header, one the sidecar signs by default, or the agent's signature (dropped)."""
    if not lower.startswith("x-amz-"):
        return True
    return lower in AGENT_HEADERS or lower.startswith(AGENT_PREFIXES) or lower in AGENT_SIGNATURE


def check_agent_headers(headers: CIMultiDict[str], passed: frozenset[str]) -> None:
    """Refuse an agent ``x-amz-*`` header outside the signed set and the upstream's ``pass_headers``."""
    for name in headers:
        lower = name.lower()
        if not _sent_by_default(lower) and lower not in passed:
            raise RequestRefused("bad_request", f"credentials: the agent header {_show(lower)} is not one the "
                                                f"sidecar signs; expected it listed in the upstream's pass_headers "
                                                f"(an S3 operation parameter policy does not see)")


@dataclass(frozen=True, slots=True)
class Presigned:
    """A presigned URL the agent sent: its query without the signing parameters, and how long it lives."""

    query: str  # the other parameters, as sent
    expires: int  # X-Amz-Expires, seconds from its X-Amz-Date
    signed_at: float  # X-Amz-Date, seconds since the epoch


def presigned(query: str) -> Presigned | None:
    """The agent's presigned URL (any of sigv4's signing parameters in the query), or None."""
    lower = query.lower()
    if "x-amz-" not in lower and "%" not in lower:  # the fast path: no name can decode to one
        return None
    kept, found = [], {}
    for part in query.split("&"):
        name = unquote(part.partition("=")[0]).lower()
        if name not in _PRESIGN_PARAMS:
            kept.append(part)
        elif name in found:
            raise _presign_refused(f"{name} twice")
        else:
            found[name] = unquote(part.partition("=")[2])
    if not found:
        return None
    return Presigned("&".join(kept), *_lifetime(found))


def _lifetime(found: dict[str, str]) -> tuple[int, float]:
    """X-Amz-Expires and X-Amz-Date of a presigned URL, checked; the algorithm must be SigV4's."""
    if found.get("x-amz-algorithm") != "AWS4-HMAC-SHA256":
        raise _presign_refused("an X-Amz-Algorithm other than AWS4-HMAC-SHA256")
    expires = found.get("x-amz-expires", "")
    if not _DIGITS.fullmatch(expires) or not 1 <= int(expires) <= MAX_EXPIRES:
        raise _presign_refused(f"no X-Amz-Expires of 1 to {MAX_EXPIRES} seconds")
    try:
        signed_at = datetime.strptime(found.get("x-amz-date", ""), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise _presign_refused("no X-Amz-Date of the form 20240101T000000Z") from None
    return int(expires), signed_at.timestamp()


def refuse_presigned(url: Presigned | None, resign: bool, now: float) -> None:
    """A presigned URL is refused unless the credential re-signs them, and then only while it lives."""
    if url is None:
        return
    if not resign:
        raise RequestRefused("bad_request", "credentials: the query carries its own aws signature (a presigned "
                                            "URL); expected an unsigned request, the sidecar signs it (or "
                                            "presigned: resign on the credential)")
    if url.signed_at + url.expires < now:
        raise _presign_refused("an X-Amz-Date and X-Amz-Expires that have passed (the URL has expired)")


def _presign_refused(problem: str) -> RequestRefused:
    return RequestRefused("bad_request", f"credentials: the presigned URL has {problem}; expected one made by an "
                                         f"AWS SDK's presigner")


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
    if mode not in STREAMING_MODES:
        raise _body_refused(f"the streaming mode {mode}, which the sidecar cannot sign (SigV4a chunk signatures "
                            f"need the agent's own key pair)")
    if not s3:
        raise _body_refused(f"{mode}, which only s3 services take")
    trailing = mode.endswith("-TRAILER")
    if not framed or not _DIGITS.fullmatch(headers.get("x-amz-decoded-content-length", "")) \
            or ("x-amz-trailer" in headers) != trailing:
        trailer = "X-Amz-Trailer" if trailing else "no X-Amz-Trailer"
        raise _body_refused(f"{mode} without its aws-chunked framing (Content-Encoding: aws-chunked, "
                            f"X-Amz-Decoded-Content-Length, {trailer})")
    return mode


def signed_upload(headers: CIMultiDict[str], mode: str) -> SignedUpload | None:
    """What a signed streaming upload declared (its chunks are re-signed); None for any other mode."""
    if mode not in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        return None
    names = frozenset(n.strip().lower() for v in headers.getall("x-amz-trailer", []) for n in v.split(","))
    if any(not _TRAILER_NAME.fullmatch(name) for name in names):
        raise _body_refused(f"{mode} with an X-Amz-Trailer other than a list of x-amz-* names")
    return SignedUpload(mode, int(headers["x-amz-decoded-content-length"]), names)


def _codings(headers: CIMultiDict[str]) -> set[str]:
    return {c.strip().lower() for value in headers.getall("Content-Encoding", []) for c in value.split(",")}


def _body_refused(what: str) -> RequestRefused:
    return RequestRefused("bad_request", f"credentials: the upload declares {what}; expected a whole body, or "
                                         f"{STREAMING_UNSIGNED_TRAILER}, {STREAMING_SIGNED} or "
                                         f"{STREAMING_SIGNED_TRAILER} with aws-chunked framing")


# --- copy source -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopySource:
    """The object an S3 copy reads, as policy decides on it and as it is forwarded."""

    path: str  # canonical /<bucket>/<key> (or /<key>): what a GET of the source would be matched on
    query: str  # "" or "versionId=<id>"
    header: str  # the x-amz-copy-source value forwarded: the same object, escaped for S3

    @property
    def shown(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def copy_source(values: list[str], paths: PathOptions, host: str) -> CopySource:
    """The canonical copy source of ``x-amz-copy-source`` values sent to ``host``, or RequestRefused."""
    if len(values) != 1:
        raise _copy_refused("more than one x-amz-copy-source header")
    raw_path, question, query = values[0].strip().partition("?")
    if question and not _VERSION_ID.fullmatch(query):
        raise _copy_refused("expected nothing but ?versionId=<id> after the object")
    try:
        path = canonical_path(raw_path if raw_path.startswith("/") else "/" + raw_path, paths)
    except RequestRefused as refused:
        raise _copy_refused(refused.message.removeprefix("paths: ")) from None
    bucket, _, key = path[1:].partition("/")
    if not _BUCKET.fullmatch(bucket) or not key:
        raise _copy_refused("expected /<bucket>/<key> with an S3 bucket name and a key (an access point "
                            "ARN names no path on this upstream)")
    header = "".join(c if c in _KEEP_IN_HEADER else f"%{ord(c):02X}" for c in path)
    header = f"{header}?{query}" if query else header
    hosted = virtual_hosted_bucket(host)
    if hosted is None:
        return CopySource(path, query, header)
    if bucket != hosted:
        raise _copy_refused(f"expected an object of bucket {hosted}, the one this upstream's host serves")
    return CopySource(path[len(bucket) + 1:], query, header)


@lru_cache(maxsize=64)  # upstream hosts: a configured, bounded set
def virtual_hosted_bucket(host: str) -> str | None:
    """The bucket a virtual-hosted AWS S3 host serves (``reports.s3.eu-west-1.amazonaws.com``), else None."""
    match = _VIRTUAL_HOST.fullmatch(host)
    return match.group(1) if match else None


def _copy_refused(problem: str) -> RequestRefused:
    return RequestRefused("bad_request", f"s3: x-amz-copy-source: {problem}; the copy source is decided as a "
                                         f"read of /<bucket>/<key>[?versionId=<id>]")
