"""The SigV4 signer against AWS's published test suite, botocore's canonical request, and its own edges.

Each vector's request line is passed to the signer as the wire path and query, the way
botocore's own harness feeds them: the canonical URI encodes it once more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from sidecar.credentials.sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    AwsCredentials,
    canonical_query,
    canonical_request,
    canonical_uri,
    payload_sha256,
    sign,
    signing_key,
    signing_steps,
)
from sidecar.errors import CredentialUnavailable, RequestRefused

ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
SERVICE = "service"
NOW = datetime(2015, 8, 30, 12, 36, 0, tzinfo=timezone.utc)
TOKEN_PREFIX = "x-amz-security-token:"


def _suite_dir() -> Path:
    shared = os.environ.get("SIDECAR_SHARED_DIR")
    base = Path(shared) if shared else Path(__file__).parents[2].parent / "shared"
    return base / "conformance" / "aws-sigv4"


SUITE = _suite_dir()


@dataclass(frozen=True, slots=True)
class RawRequest:
    """One ``.req`` file: request line, headers in order (repeats kept) and body."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


def parse_req(text: str) -> RawRequest:
    """Parse a vector's raw request; continuation lines join their header's value."""
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    request_line, _, _version = lines[0].rpartition(" ")  # the target may hold spaces
    method, _, target = request_line.partition(" ")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers.pop()
            headers.append((name, f"{value}\n{line}"))
        elif line:
            name, _, value = line.partition(":")
            headers.append((name, value))
    path, _, query = target.partition("?")
    return RawRequest(method, path, query, headers, body.encode("utf-8"))


def _cases() -> list[Path]:
    return sorted(SUITE.rglob("*.req")) if SUITE.is_dir() else []


def _read(case: Path, suffix: str) -> str:
    return case.with_suffix(suffix).read_text(encoding="utf-8").rstrip("\n")


def _token_from_creq(creq: str) -> str | None:
    for line in creq.split("\n"):
        if line.startswith(TOKEN_PREFIX):
            return line[len(TOKEN_PREFIX) :]
    return None


needs_suite = pytest.mark.skipif(
    not SUITE.is_dir(), reason=f"AWS SigV4 test suite not found at {SUITE} (set SIDECAR_SHARED_DIR)"
)


@needs_suite
def test_suite_is_complete() -> None:
    """The whole published suite is present, so no vector silently drops out."""
    assert len(_cases()) >= 30


@needs_suite
@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_vector(case: Path) -> None:
    """Canonical request, string to sign and Authorization match AWS's expected files."""
    raw = parse_req(case.read_text(encoding="utf-8"))
    creq = _read(case, ".creq")
    creds = AwsCredentials(ACCESS_KEY, SECRET, _token_from_creq(creq), None)
    host = next(v for n, v in raw.headers if n.lower() == "host")
    steps = signing_steps(
        raw.method, host, raw.path, raw.query, raw.headers,
        payload_sha256(raw.body), creds, REGION, SERVICE, NOW,
    )  # fmt: skip
    assert steps.canonical_request == creq
    assert steps.string_to_sign == _read(case, ".sts")
    assert dict(steps.headers)["Authorization"] == _read(case, ".authz")


def test_sign_returns_signing_headers_with_session_token() -> None:
    """sign() adds the date and the session token, and signs both."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, "tok", None)
    added = dict(sign("GET", "h.example", "/", "", [], EMPTY_SHA256, creds, REGION, SERVICE, NOW))
    assert added["X-Amz-Date"] == "20150830T123600Z"
    assert added["X-Amz-Security-Token"] == "tok"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in added["Authorization"]
    assert "X-Amz-Content-Sha256" not in added


def test_sign_s3_declares_payload_hash() -> None:
    """For S3 the payload hash is sent and signed as X-Amz-Content-Sha256."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, None, None)
    added = dict(sign("PUT", "b.s3", "/k", "", [], UNSIGNED_PAYLOAD, creds, REGION, "s3", NOW))
    assert added["X-Amz-Content-Sha256"] == UNSIGNED_PAYLOAD
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date," in added["Authorization"]


def test_sign_replaces_callers_signing_headers() -> None:
    """An agent's own Authorization, Host or X-Amz-Date never reaches the signature."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, None, None)
    clean = sign("GET", "h", "/", "", [], EMPTY_SHA256, creds, REGION, SERVICE, NOW)
    dirty = [("Authorization", "AWS4 x"), ("Host", "evil"), ("x-amz-date", "19700101T000000Z")]
    assert sign("GET", "h", "/", "", dirty, EMPTY_SHA256, creds, REGION, SERVICE, NOW) == clean


@pytest.mark.parametrize(
    ("path", "s3", "expected"),
    [
        # a wire escape is encoded again for ordinary services (AWS "encode twice")
        ("/a%20b/", False, "/a%2520b/"),
        # S3 signs the wire path exactly, escapes and empty segments included
        ("/bucket/a%20b//c/./d", True, "/bucket/a%20b//c/./d"),
        # dot segments above the root stay at the root
        ("/../../x", False, "/x"),
        # a trailing dot segment leaves no trailing slash (as botocore and AWS do)
        ("/a/b/.", False, "/a/b"),
        # an already canonical path is kept as it is, trailing slash included
        ("/a-b/c_d~e.f/", False, "/a-b/c_d~e.f/"),
        # a segment that merely starts with a dot is not a dot segment
        ("/.well-known/...", False, "/.well-known/..."),
        # reserved characters on the wire are encoded for ordinary services
        ("/a$b:c", False, "/a%24b%3Ac"),
    ],
)
def test_canonical_uri(path: str, s3: bool, expected: str) -> None:
    """The canonical URI follows AWS's per-service rules for a wire path."""
    assert canonical_uri(path, s3=s3) == expected


def test_canonical_uri_refuses_relative_path() -> None:
    """A path not starting with '/' is refused rather than signed."""
    with pytest.raises(RequestRefused) as info:
        canonical_uri("x/y", s3=False)
    assert info.value.reason == "bad_request"
    assert info.value.message.startswith("sigv4: ")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # a name without '=' signs with an empty value
        ("flag", "flag="),
        # escapes are normalized to uppercase and unreserved ones decoded
        ("a=%7e%2f", "a=~%2F"),
        # a literal plus is a plus, not a space
        ("q=a+b", "q=a%2Bb"),
        # a space escape stays %20
        ("q=a%20b", "q=a%20b"),
        # empty parts are dropped
        ("b=2&&a=1", "a=1&b=2"),
        # plain pairs sort by name, then by value
        ("b=2&a=1&a=0", "a=0&a=1&b=2"),
        # a second '=' belongs to the value and is encoded
        ("a==b", "a=%3Db"),
        # an empty name is kept
        ("=x", "=x"),
        # bytes that are not UTF-8 keep their exact escapes
        ("k=%FF", "k=%FF"),
    ],
)
def test_canonical_query(query: str, expected: str) -> None:
    """Query parts are decoded, AWS-encoded and sorted."""
    assert canonical_query(query) == expected


def test_canonical_request_returns_signed_headers() -> None:
    """canonical_request returns the signed-header list it used, names lowercased and sorted."""
    text, signed = canonical_request(
        "get", "/", "", [("X-B", " 1 "), ("x-a", "2"), ("X-A", "3")], EMPTY_SHA256, s3=False
    )
    assert signed == "x-a;x-b"
    assert text.split("\n")[:5] == ["GET", "/", "", "x-a:2,3", "x-b:1"]


def test_credentials_repr_hides_secrets() -> None:
    """Neither the secret key nor the session token appears in a repr."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, "session-token-value", 1.0)
    text = repr(creds)
    assert ACCESS_KEY in text
    assert SECRET not in text
    assert "session-token-value" not in text


def test_steps_repr_hides_token() -> None:
    """The intermediate texts, which carry the session token, are not in a repr."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, "session-token-value", None)
    steps = signing_steps("GET", "h", "/", "", [], EMPTY_SHA256, creds, REGION, SERVICE, NOW)
    assert "session-token-value" not in repr(steps)


def test_expired_credentials_are_refused() -> None:
    """Credentials past their expiry are not used to sign."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, None, NOW.timestamp())
    with pytest.raises(CredentialUnavailable) as info:
        sign("GET", "h", "/", "", [], EMPTY_SHA256, creds, REGION, SERVICE, NOW)
    assert info.value.status == 503
    assert SECRET not in str(info.value)


def test_naive_time_is_rejected() -> None:
    """A signing time without a timezone is a programming error, not a guess."""
    creds = AwsCredentials(ACCESS_KEY, SECRET, None, None)
    with pytest.raises(ValueError, match="^sigv4: "):
        sign("GET", "h", "/", "", [], EMPTY_SHA256, creds, REGION, SERVICE, datetime(2015, 8, 30))


def test_signing_key_is_cached() -> None:
    """The derived key is computed once per (secret, date, region, service)."""
    signing_key.cache_clear()
    first = signing_key(SECRET, "20150830", REGION, SERVICE)
    assert signing_key(SECRET, "20150830", REGION, SERVICE) is first
    assert signing_key(SECRET, "20150831", REGION, SERVICE) != first
    assert signing_key.cache_info().hits == 1


# --- botocore as the oracle: the canonical request of what boto3 sends ---------------------

LIST_PREFIXES = {
    # the boto3 pipeline test's ListObjectsV2: boto3 sends prefix=reports%2Fordinary&encoding-type=url
    "slash": "reports/ordinary",
    # reserved characters a key prefix may hold: each escaped in the query boto3 sends
    "space-plus-equals-amp": "a b+c=d&e/",
    # non-ASCII (UTF-8 escapes), a tilde (unreserved: sent as is) and the sub-delims quote() keeps by default
    "unicode-tilde-subdelims": "rapports/été~*'()!$,;:@",
}


class _Stopped(Exception):
    """Raised before boto3's request leaves: the request is captured, nothing is sent."""

    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


def _stop(request: Any, **_: Any) -> None:
    raise _Stopped(request)


def _boto3_list_url(prefix: str) -> str:
    """The URL of the ListObjectsV2 boto3 sends at its defaults, path-style, for ``prefix``."""
    client = boto3.client("s3", endpoint_url="https://s3.sidecar.test", region_name=REGION,
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                          config=Config(s3={"addressing_style": "path"}))
    client.meta.events.register("before-send.s3", _stop)
    with pytest.raises(_Stopped) as stopped:
        client.list_objects_v2(Bucket="aws-provider-bucket", Prefix=prefix)
    return str(stopped.value.request.url)


@pytest.mark.parametrize("prefix", LIST_PREFIXES.values(), ids=LIST_PREFIXES.keys())
def test_s3_canonical_request_is_botocores(prefix: str) -> None:
    """For the query boto3 sends, the signer's canonical request is the one botocore computes, byte for
    byte (escapes kept, pairs sorted by name: encoding-type, list-type, prefix)."""
    url = _boto3_list_url(prefix)
    wire = urlsplit(url)
    date_time = "20150830T123600Z"
    creds = AwsCredentials(ACCESS_KEY, SECRET, None, None)
    ours = signing_steps("GET", wire.netloc, wire.path, wire.query, [], EMPTY_SHA256, creds, REGION, "s3", NOW)
    request = AWSRequest("GET", url, headers={"X-Amz-Date": date_time, "X-Amz-Content-SHA256": EMPTY_SHA256})
    theirs = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", REGION).canonical_request(request)
    assert ours.canonical_request == theirs
    assert ours.canonical_request.split("\n")[2].startswith("encoding-type=url&list-type=2&prefix=")
