"""The SigV4 signer against a real verifier: moto's server with IAM authentication on.

moto recomputes each signature with botocore from what it received, so a request our signer
signed must pass, and the same request changed after signing must not. Setup (a user with an
access key, a role it may assume, a bucket) runs with authentication off; then
``POST /moto-api/reset-auth`` with body ``0`` turns it on for every later request.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from sidecar.credentials.sigv4 import UNSIGNED_PAYLOAD, AwsCredentials, payload_sha256, sign
from tests.peers.moto import moto_server

REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "agent-bucket"
FORM = ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
STS_WHOAMI = urlencode({"Action": "GetCallerIdentity", "Version": "2011-06-15"}).encode()
DDB_JSON = ("Content-Type", "application/x-amz-json-1.0")
DDB_DESCRIBE_LIMITS = "DynamoDB_20120810.DescribeLimits"
WRONG_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
BOTO3_LIST_QUERY = "list-type=2&prefix=reports%2Fordinary&encoding-type=url"  # boto3's ListObjectsV2, as sent

pytestmark = pytest.mark.peer("moto")


@dataclass(frozen=True, slots=True)
class Moto:
    """A running moto server and the credentials created in it."""

    base: str
    host: str
    user: AwsCredentials
    assumed: AwsCredentials


@dataclass(frozen=True, slots=True)
class Wire:
    """A request exactly as it goes on the wire, signing headers included."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


def signed(
    moto: Moto,
    method: str,
    path: str,
    *,
    service: str,
    query: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    creds: AwsCredentials | None = None,
    unsigned: bool = False,
) -> Wire:
    """Sign a request for moto with ``sign()``; the user's key unless ``creds`` is given."""
    payload = UNSIGNED_PAYLOAD if unsigned else payload_sha256(body)
    added = sign(
        method, moto.host, path, query, list(headers), payload,
        creds or moto.user, REGION, service, datetime.now(timezone.utc),
    )  # fmt: skip
    return Wire(method, path, query, [*headers, *added], body)


def _url(base: str, wire: Wire) -> URL:
    return URL(base + wire.path + (f"?{wire.query}" if wire.query else ""), encoded=True)


def _send_sync(base: str, wire: Wire) -> str:
    """Send with requests during setup; fail loudly on any error status."""
    url = str(_url(base, wire))
    response = requests.request(wire.method, url, data=wire.body, headers=dict(wire.headers))
    response.raise_for_status()
    return response.text


# --- the moto peer ---------------------------------------------------------------------


def _query_api(moto: Moto, service: str, **params: str) -> str:
    """Call an AWS query-protocol API (IAM, STS) during setup; return the XML answer."""
    body = urlencode(params).encode()
    wire = signed(moto, "POST", "/", service=service, headers=(FORM,), body=body)
    return _send_sync(moto.base, wire)


def _iam(moto: Moto, action: str, **params: str) -> str:
    return _query_api(moto, "iam", Action=action, Version="2010-05-08", **params)


def _xml(text: str, tag: str) -> str:
    match = re.search(f"<{tag}>([^<]*)</{tag}>", text)
    assert match, f"no <{tag}> in moto's answer"
    return match.group(1)


def _policy(*statements: dict[str, object]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _creds(xml: str, *, token: bool) -> AwsCredentials:
    """Credentials from an IAM CreateAccessKey or STS AssumeRole answer."""
    session_token = _xml(xml, "SessionToken") if token else None
    key_id, secret = _xml(xml, "AccessKeyId"), _xml(xml, "SecretAccessKey")
    return AwsCredentials(key_id, secret, session_token, None)


def _provision(moto: Moto) -> Moto:
    """Create a user with full rights and a key, a role it may assume, and a bucket."""
    allow_all = _policy({"Effect": "Allow", "Action": "*", "Resource": "*"})
    trust = _policy({"Effect": "Allow", "Action": "sts:AssumeRole",
                     "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/agent"}})  # fmt: skip
    _iam(moto, "CreateUser", UserName="agent")
    _iam(moto, "PutUserPolicy", UserName="agent", PolicyName="all", PolicyDocument=allow_all)
    user = _creds(_iam(moto, "CreateAccessKey", UserName="agent"), token=False)
    _iam(moto, "CreateRole", RoleName="agent-role", AssumeRolePolicyDocument=trust)
    _iam(moto, "PutRolePolicy", RoleName="agent-role", PolicyName="all", PolicyDocument=allow_all)
    role_arn = f"arn:aws:iam::{ACCOUNT}:role/agent-role"
    role = _query_api(moto, "sts", Action="AssumeRole", Version="2011-06-15",
                      RoleArn=role_arn, RoleSessionName="task")  # fmt: skip
    _send_sync(moto.base, signed(moto, "PUT", f"/{BUCKET}", service="s3"))
    return replace(moto, user=user, assumed=_creds(role, token=True))


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """A moto server on a free loopback port, provisioned, with IAM authentication on."""
    with moto_server() as (base, port):
        bootstrap = AwsCredentials("AKIDBOOTSTRAP", "unchecked-while-auth-is-off", None, None)
        peer = _provision(Moto(base, f"127.0.0.1:{port}", bootstrap, bootstrap))
        requests.post(f"{base}/moto-api/reset-auth", data=b"0").raise_for_status()
        yield peer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def send(session: aiohttp.ClientSession, moto: Moto, wire: Wire) -> tuple[int, bytes]:
    """Send a wire request with aiohttp, path and query byte-for-byte as signed."""
    async with session.request(
        wire.method, _url(moto.base, wire), data=wire.body, headers=wire.headers
    ) as response:
        return response.status, await response.read()


def _with_header(wire: Wire, name: str, value: str) -> Wire:
    """The wire request with one header's value replaced after signing."""
    kept = [(n, v) for n, v in wire.headers if n.lower() != name.lower()]
    return replace(wire, headers=[*kept, (name, value)])


def _sts_whoami(moto: Moto, creds: AwsCredentials | None = None) -> Wire:
    return signed(moto, "POST", "/", service="sts", headers=(FORM,), body=STS_WHOAMI, creds=creds)


def _ddb_list_tables(moto: Moto) -> Wire:
    target = ("X-Amz-Target", "DynamoDB_20120810.ListTables")
    return signed(moto, "POST", "/", service="dynamodb", headers=(DDB_JSON, target), body=b"{}")


def _s3(moto: Moto, method: str, path: str, **kwargs: Any) -> Wire:
    return signed(moto, method, path, service="s3", **kwargs)


def _wrong_secret(moto: Moto) -> AwsCredentials:
    return replace(moto.user, secret_access_key=WRONG_SECRET)


# --- accepted ----------------------------------------------------------------------------

ACCEPTED: dict[str, Callable[[Moto], Wire]] = {
    # STS query protocol: form body, payload hash signed in the canonical request only
    "sts-get-caller-identity": _sts_whoami,
    # DynamoDB JSON protocol: the operation travels in a signed X-Amz-Target header
    "dynamodb-list-tables": _ddb_list_tables,
    # S3 ListBuckets: empty payload, hash declared in X-Amz-Content-Sha256
    "s3-list-buckets": lambda m: _s3(m, "GET", "/"),
    # S3 ListObjectsV2: a query with an escaped value, canonicalized and sorted
    "s3-list-objects-query": lambda m: _s3(
        m, "GET", f"/{BUCKET}", query="prefix=a%20b&list-type=2"
    ),
    # S3 ListObjectsV2 as boto3 sends it: an escaped '/' in the prefix, kept escaped when signed
    "s3-list-objects-boto3-query": lambda m: _s3(m, "GET", f"/{BUCKET}", query=BOTO3_LIST_QUERY),
    # S3 PutObject with a hashed payload and a key whose wire form holds %20
    "s3-put-hashed": lambda m: _s3(m, "PUT", f"/{BUCKET}/hashed%20key.txt", body=b"hashed"),
    # S3 PutObject with UNSIGNED-PAYLOAD
    "s3-put-unsigned": lambda m: _s3(m, "PUT", f"/{BUCKET}/u.txt", body=b"u", unsigned=True),
}


@pytest.mark.parametrize("build", ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_signed_request_is_accepted(
    session: aiohttp.ClientSession, moto: Moto, build: Callable[[Moto], Wire]
) -> None:
    """A request signed by sign() passes moto's signature and permission checks."""
    status, body = await send(session, moto, build(moto))
    assert status == 200, body.decode()


async def test_session_token_credentials_are_accepted(
    session: aiohttp.ClientSession, moto: Moto
) -> None:
    """Temporary credentials from AssumeRole sign with their token and act as the role."""
    status, body = await send(session, moto, _sts_whoami(moto, moto.assumed))
    assert status == 200, body.decode()
    assert _xml(body.decode(), "Arn") == f"arn:aws:sts::{ACCOUNT}:assumed-role/agent-role/task"


async def test_put_object_stores_signed_body(session: aiohttp.ClientSession, moto: Moto) -> None:
    """An object written with a signed payload reads back byte for byte."""
    key = f"/{BUCKET}/round%20trip.bin"
    assert (await send(session, moto, _s3(moto, "PUT", key, body=b"\x00\xffdata")))[0] == 200
    assert await send(session, moto, _s3(moto, "GET", key)) == (200, b"\x00\xffdata")


async def test_botocore_signature_of_the_same_query_is_accepted(session: aiohttp.ClientSession, moto: Moto) -> None:
    """The peer judges an escaped '/' in a query as S3 does: botocore's own signature of boto3's
    ListObjectsV2, sent straight to moto, passes (moto up to 5.2.3 refused it, and ours: it rechecked
    the signature over the percent-decoded query, ``prefix=reports/ordinary``)."""
    request = AWSRequest("GET", f"{moto.base}/{BUCKET}?{BOTO3_LIST_QUERY}")
    S3SigV4Auth(Credentials(moto.user.access_key_id, moto.user.secret_access_key), "s3", REGION).add_auth(request)
    wire = Wire("GET", f"/{BUCKET}", BOTO3_LIST_QUERY, list(request.headers.items()), b"")
    status, body = await send(session, moto, wire)
    assert status == 200, body.decode()


# --- refused -----------------------------------------------------------------------------

REFUSED: dict[str, tuple[Callable[[Moto], Wire], str]] = {
    # STS body changed after signing: moto hashes the body it received
    "sts-body-altered": (
        lambda m: replace(_sts_whoami(m), body=STS_WHOAMI + b"&Extra=1"),
        "SignatureDoesNotMatch",
    ),
    # DynamoDB operation header changed after signing
    "dynamodb-target-altered": (
        lambda m: _with_header(_ddb_list_tables(m), "X-Amz-Target", DDB_DESCRIBE_LIMITS),
        "SignatureDoesNotMatch",
    ),
    # request time changed after signing
    "sts-date-altered": (
        lambda m: _with_header(_sts_whoami(m), "X-Amz-Date", "20200101T000000Z"),
        "SignatureDoesNotMatch",
    ),
    # S3 object path changed after signing
    "s3-path-altered": (
        lambda m: replace(_s3(m, "GET", f"/{BUCKET}/a"), path=f"/{BUCKET}/b"),
        "SignatureDoesNotMatch",
    ),
    # S3 query changed after signing
    "s3-query-altered": (
        lambda m: replace(_s3(m, "GET", f"/{BUCKET}", query="prefix=a"), query="prefix=b"),
        "SignatureDoesNotMatch",
    ),
    # S3 declared payload hash changed after signing
    "s3-content-sha256-altered": (
        lambda m: _with_header(
            _s3(m, "PUT", f"/{BUCKET}/x", body=b"x", unsigned=True),
            "X-Amz-Content-Sha256",
            payload_sha256(b"x"),
        ),
        "SignatureDoesNotMatch",
    ),
    # the right access key signed with a wrong secret (STS)
    "sts-wrong-secret": (lambda m: _sts_whoami(m, _wrong_secret(m)), "SignatureDoesNotMatch"),
    # the right access key signed with a wrong secret (S3)
    "s3-wrong-secret": (
        lambda m: _s3(m, "GET", "/", creds=_wrong_secret(m)),
        "SignatureDoesNotMatch",
    ),
    # temporary credentials with a forged session token
    "sts-forged-token": (
        lambda m: _sts_whoami(m, replace(m.assumed, session_token="forged")),
        "InvalidClientTokenId",
    ),
}


@pytest.mark.parametrize(("build", "code"), REFUSED.values(), ids=REFUSED.keys())
async def test_tampered_request_is_refused(
    session: aiohttp.ClientSession, moto: Moto, build: Callable[[Moto], Wire], code: str
) -> None:
    """A request changed after signing, or signed with the wrong secret, gets a 403."""
    status, body = await send(session, moto, build(moto))
    assert status == 403
    assert f"<Code>{code}</Code>".encode() in body
