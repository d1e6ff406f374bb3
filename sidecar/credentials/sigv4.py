"""AWS Signature Version 4 request signing, without botocore.

    sign(method, host, path, query, headers, payload_hash, creds, region, service, now)
      -> the headers to add: Authorization, X-Amz-Date, X-Amz-Security-Token (when the
         credentials carry a session token) and X-Amz-Content-Sha256 (S3 only).

The caller sends exactly what it signed: the same method, ``Host``, path, query, the signed
headers with their values, and a body whose SHA-256 is ``payload_hash`` (or declares
``UNSIGNED_PAYLOAD``, which S3 accepts over TLS).

Canonical URI: ``path`` is the request path as it goes on the wire. For every service but
S3 it is normalized (empty and dot segments removed) and URI-encoded once more, so a ``%20``
on the wire signs as ``%2520`` (AWS's "encode twice"); S3 signs the wire path unchanged.
Canonical query: each name and value is percent-decoded and re-encoded with AWS's rules
(a literal ``+`` is a plus, not a space), then pairs are sorted.

Per request the work is string building and two SHA-256 based steps; the derived signing
key is cached per (secret, date, region, service) in a small bounded cache.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from urllib.parse import quote, unquote_to_bytes

from sidecar.errors import CredentialUnavailable, RequestRefused

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
S3_SERVICES = frozenset({"s3", "s3-object-lambda", "s3-outposts"})

# Headers whose values the signer itself decides; the caller's copies are dropped.
_OWN_HEADERS = frozenset(
    {"authorization", "host", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
_SIGNING_KEY_CACHE_SIZE = 64
# Strings that are already canonical: nothing to decode, normalize or encode.
_UNRESERVED = r"[A-Za-z0-9\-._~]"
_PLAIN_COMPONENT = re.compile(f"{_UNRESERVED}*")
_PLAIN_PAIR = f"{_UNRESERVED}+(?:={_UNRESERVED}*)?"
_PLAIN_QUERY = re.compile(f"{_PLAIN_PAIR}(?:&{_PLAIN_PAIR})*")
_PLAIN_PATH = re.compile(f"(?:/[A-Za-z0-9\\-_~]{_UNRESERVED}*)*/?")  # no empty or dot segments


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """An AWS access key; its secret and session token never appear in a repr."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # seconds since the epoch, None for a standing key

    def expired(self, now: float) -> bool:
        """Whether these credentials have expired at ``now`` (seconds since the epoch)."""
        return self.expires_at is not None and self.expires_at <= now


def payload_sha256(body: bytes) -> str:
    """The hex SHA-256 of a request body, as SigV4 signs it."""
    return hashlib.sha256(body).hexdigest()


def amz_date(now: datetime) -> str:
    """``now`` as the ``X-Amz-Date`` basic ISO 8601 UTC form, e.g. ``20150830T123600Z``."""
    if now.tzinfo is None:
        raise ValueError("sigv4: expected a timezone-aware datetime for the signing time")
    if now.utcoffset():
        now = now.astimezone(timezone.utc)
    date = f"{now.year:04d}{now.month:02d}{now.day:02d}"
    return f"{date}T{now.hour:02d}{now.minute:02d}{now.second:02d}Z"


def credential_scope(date: str, region: str, service: str) -> str:
    """The credential scope ``YYYYMMDD/region/service/aws4_request``."""
    return f"{date}/{region}/{service}/aws4_request"


# --- canonical request -----------------------------------------------------------------


def canonical_uri(path: str, *, s3: bool) -> str:
    """The canonical URI of a wire path: S3 signs it unchanged; others normalize and re-encode."""
    if not path.startswith("/"):
        raise RequestRefused("bad_request", "sigv4: expected a request path starting with '/'")
    if s3 or _PLAIN_PATH.fullmatch(path):
        return path
    return quote(_remove_dot_segments(path), safe="/")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal, also dropping empty segments (as AWS services do)."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = "/" if out and path.endswith("/") else ""
    return "/" + "/".join(out) + trailing


def canonical_query(query: str) -> str:
    """The canonical query string: each part decoded, AWS-encoded, then sorted."""
    if not query:
        return ""
    split = _split_pair if _PLAIN_QUERY.fullmatch(query) else _encode_pair
    pairs = sorted(split(part) for part in query.split("&") if part)
    return "&".join([f"{name}={value}" for name, value in pairs])


def _split_pair(part: str) -> tuple[str, str]:
    name, _, value = part.partition("=")
    return name, value


def _encode_pair(part: str) -> tuple[str, str]:
    name, _, value = part.partition("=")
    return _aws_encode(name), _aws_encode(value)


def _aws_encode(component: str) -> str:
    """Percent-decode one query component, then encode all but unreserved characters."""
    if _PLAIN_COMPONENT.fullmatch(component):
        return component
    return quote(unquote_to_bytes(component), safe="")


def canonical_headers(headers: list[tuple[str, str]]) -> tuple[str, str]:
    """The canonical header block (with its final newline) and the signed-headers list.

    Names are lowercased and sorted; a repeated name keeps its values in order, joined by
    commas; each value is trimmed with inner runs of whitespace collapsed to one space.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    block = "".join([f"{name}:{','.join(merged[name])}\n" for name in names])
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    payload_hash: str,
    *,
    s3: bool,
) -> tuple[str, str]:
    """The canonical request text and its signed-headers list, for the headers given."""
    block, signed = canonical_headers(headers)
    uri = canonical_uri(path, s3=s3)
    text = f"{method.upper()}\n{uri}\n{canonical_query(query)}\n{block}\n{signed}\n{payload_hash}"
    return text, signed


def string_to_sign(date_time: str, scope: str, canonical: str) -> str:
    """The string to sign: algorithm, request time, scope and the canonical request's hash."""
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{date_time}\n{scope}\n{digest}"


# --- signing ---------------------------------------------------------------------------


@lru_cache(maxsize=_SIGNING_KEY_CACHE_SIZE)
def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived key for one (secret, date, region, service); cached, never logged."""
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for step in (region, service, "aws4_request"):
        key = _hmac(key, step)
    return key


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.digest(key, message.encode("utf-8"), "sha256")


def signature(key: bytes, to_sign: str) -> str:
    """The hex HMAC-SHA256 signature of a string to sign under a derived key."""
    return hmac.digest(key, to_sign.encode("utf-8"), "sha256").hex()


@dataclass(frozen=True, slots=True)
class SigningSteps:
    """The intermediate texts of one signature and the headers to add (none in a repr)."""

    canonical_request: str = field(repr=False)
    string_to_sign: str = field(repr=False)
    headers: list[tuple[str, str]] = field(repr=False)
    signature: str = field(default="", repr=False)  # the seed of a streaming upload's chunk signatures


def sign(
    method: str,
    host: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    payload_hash: str,
    creds: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
) -> list[tuple[str, str]]:
    """Sign a request; return the headers to add to it (the caller sends ``Host: host``).

    ``headers`` are the request headers to sign besides ``host``; any ``Authorization``,
    ``Host`` and ``X-Amz-*`` signing headers among them are replaced by the signer's own.
    """
    steps = signing_steps(
        method, host, path, query, headers, payload_hash, creds, region, service, now
    )
    return steps.headers


def signing_steps(
    method: str,
    host: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    payload_hash: str,
    creds: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
) -> SigningSteps:
    """Sign a request as :func:`sign` does, keeping the canonical request and string to sign."""
    date_time = amz_date(now)
    if creds.expired(now.timestamp()):
        raise CredentialUnavailable("sigv4: credentials have expired; expected a fresh key")
    s3 = service in S3_SERVICES
    added = _signing_headers(date_time, creds, payload_hash, s3=s3)
    to_sign = [(n, v) for n, v in headers if n.lower() not in _OWN_HEADERS]
    to_sign += [("host", host), *added]
    canonical, signed = canonical_request(method, path, query, to_sign, payload_hash, s3=s3)
    scope = credential_scope(date_time[:8], region, service)
    to_sign_text = string_to_sign(date_time, scope, canonical)
    key = signing_key(creds.secret_access_key, date_time[:8], region, service)
    seed = signature(key, to_sign_text)
    authz = f"{ALGORITHM} Credential={creds.access_key_id}/{scope}, SignedHeaders={signed}, Signature={seed}"
    return SigningSteps(canonical, to_sign_text, [("Authorization", authz), *added], seed)


def _signing_headers(
    date_time: str, creds: AwsCredentials, payload_hash: str, *, s3: bool
) -> list[tuple[str, str]]:
    """The ``X-Amz-*`` headers the signer adds and signs."""
    added = [("X-Amz-Date", date_time)]
    if creds.session_token:
        added.append(("X-Amz-Security-Token", creds.session_token))
    if s3:
        added.append(("X-Amz-Content-Sha256", payload_hash))
    return added


# --- presigned URLs ----------------------------------------------------------------------

PRESIGN_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
                  "X-Amz-Security-Token", "X-Amz-Signature")
MAX_EXPIRES = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


def presign(
    method: str,
    host: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    creds: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
    expires: int,
) -> str:
    """The query of a presigned URL for the request: ``query`` (which must carry none of
    :data:`PRESIGN_PARAMS`) followed by the signing parameters, ``X-Amz-Signature`` last.

    S3's form: the payload is ``UNSIGNED-PAYLOAD``, ``host`` and ``headers`` are signed and
    listed in ``X-Amz-SignedHeaders``, a session token goes in the query and is signed.
    """
    date_time = amz_date(now)
    if creds.expired(now.timestamp()):
        raise CredentialUnavailable("sigv4: credentials have expired; expected a fresh key")
    scope = credential_scope(date_time[:8], region, service)
    to_sign = [(n, v) for n, v in headers if n.lower() not in _OWN_HEADERS] + [("host", host)]
    _, signed = canonical_headers(to_sign)
    params = [("X-Amz-Algorithm", ALGORITHM), ("X-Amz-Credential", f"{creds.access_key_id}/{scope}"),
              ("X-Amz-Date", date_time), ("X-Amz-Expires", str(expires)), ("X-Amz-SignedHeaders", signed)]
    if creds.session_token:
        params.append(("X-Amz-Security-Token", creds.session_token))
    encoded = "&".join([f"{name}={quote(value, safe='')}" for name, value in params])
    full = f"{query}&{encoded}" if query else encoded
    s3 = service in S3_SERVICES
    canonical, _ = canonical_request(method, path, full, to_sign, UNSIGNED_PAYLOAD if s3 else EMPTY_SHA256, s3=s3)
    key = signing_key(creds.secret_access_key, date_time[:8], region, service)
    return f"{full}&X-Amz-Signature={signature(key, string_to_sign(date_time, scope, canonical))}"


# --- streaming uploads: chunk and trailer signatures ------------------------------------

CHUNK_ALGORITHM = "AWS4-HMAC-SHA256-PAYLOAD"
TRAILER_ALGORITHM = "AWS4-HMAC-SHA256-TRAILER"


class ChunkSigner:
    """The chained signatures of one ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`` upload.

    Each chunk's signature covers its data and the previous signature, starting from the seed
    (the request's own signature), so chunks cannot be reordered, dropped or replaced; the
    trailer's covers its canonical headers and the final chunk's signature.
    """

    __slots__ = ("_key", "_prefix", "previous")

    def __init__(self, key: bytes, date_time: str, scope: str, seed: str) -> None:
        self._key = key
        self._prefix = f"{date_time}\n{scope}\n"
        self.previous = seed

    def __repr__(self) -> str:
        return "ChunkSigner(<redacted>)"

    def chunk(self, data: bytes | bytearray | memoryview) -> str:
        """The next chunk's signature (the final, empty chunk included)."""
        digest = hashlib.sha256(data).hexdigest()
        return self._chain(f"{CHUNK_ALGORITHM}\n{self._prefix}{self.previous}\n{EMPTY_SHA256}\n{digest}")

    def trailer(self, canonical: bytes) -> str:
        """The trailer's signature over its canonical headers (``name:value\\n`` each)."""
        digest = hashlib.sha256(canonical).hexdigest()
        return self._chain(f"{TRAILER_ALGORITHM}\n{self._prefix}{self.previous}\n{digest}")

    def _chain(self, to_sign: str) -> str:
        self.previous = signature(self._key, to_sign)
        return self.previous


def chunk_signer(steps: SigningSteps, creds: AwsCredentials, region: str, service: str) -> ChunkSigner:
    """The chunk signer of a streaming upload whose head ``steps`` signed (the seed signature)."""
    date_time = steps.string_to_sign.split("\n", 2)[1]
    key = signing_key(creds.secret_access_key, date_time[:8], region, service)
    return ChunkSigner(key, date_time, credential_scope(date_time[:8], region, service), steps.signature)
