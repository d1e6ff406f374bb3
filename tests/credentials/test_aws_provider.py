"""The ``aws_sigv4`` provider against moto: STS web identity federation, then signed calls.

moto answers ``AssumeRoleWithWebIdentity`` without checking the web identity token, and only
while IAM authentication is off; the signed calls are then checked with it on
(``POST /moto-api/reset-auth`` with ``0``; ``inf`` turns it off again). What moto cannot show
(the form sent to STS, STS error codes, hostile XML) is checked against a small loopback
stub that answers like STS.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import load_config
from sidecar.credentials import aws
from sidecar.credentials.aws_request import copy_source
from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps
from sidecar.credentials.cache import CredentialCache
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.credentials.sigv4 import UNSIGNED_PAYLOAD, AwsCredentials, payload_sha256
from sidecar.credentials.specs import AwsSigV4Spec, StaticSource, WebIdentitySource, parse_aws_sigv4
from sidecar.errors import ConfigError, ConfigInvalid, CredentialUnavailable, RequestRefused
from sidecar.fields import Fields
from sidecar.identity.signing import Signer, SigningKey
from sidecar.observe.metrics import Metrics
from sidecar.http.target import PathOptions
from tests.credentials.providers import ThreadSpy
from tests.peers.moto import ACCOUNT, BUCKET, FORM, REGION, Moto, free_port, xml_value

ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/agent"
AGENT_ID = "spiffe://example.org/ns/agents/sa/billing-agent"
WHOAMI = urlencode({"Action": "GetCallerIdentity", "Version": "2011-06-15"}).encode()
REQ = CredentialRequest(upstream="aws", scopes=(), agent_id=AGENT_ID)
MOTO = pytest.mark.peer("moto")

# --- the sidecar side --------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(SigningKey("aws-test", "ES256", ec.generate_private_key(ec.SECP256R1())),
                  "https://agents.example.test")


@pytest.fixture
def deps(signer: Signer) -> ProviderDeps:
    return ProviderDeps(agent_id=AGENT_ID, signer=signer, id_key=b"k" * 32)


def parse_spec(raw: dict[str, Any], errors: list[ConfigError] | None = None) -> AwsSigV4Spec | None:
    """Read one credential entry as the loader does (``type`` read, ``done()`` called)."""
    errors = [] if errors is None else errors
    f = Fields({"type": AwsSigV4Spec.type, **raw}, "credentials.aws", errors)
    f.text("type")
    spec = parse_aws_sigv4(f)
    f.done()
    return spec


def web_identity(sts_url: str, service: str = "sts", **source: Any) -> dict[str, Any]:
    return {"region": REGION, "service": service,
            "source": {"type": "web_identity", "role_arn": ROLE_ARN, "sts_url": sts_url, **source}}


@pytest.fixture
async def make(deps: ProviderDeps) -> AsyncIterator[Callable[..., aws.AwsSigV4Provider]]:
    """Build providers from config mappings, through the registry; each is closed after the test."""
    built: list[aws.AwsSigV4Provider] = []

    def build(raw: dict[str, Any], with_deps: ProviderDeps | None = None) -> aws.AwsSigV4Provider:
        errors: list[ConfigError] = []
        spec = parse_spec(raw, errors)
        assert spec is not None and not errors, errors
        provider = PROVIDER_TYPES["aws_sigv4"].build("aws", spec, with_deps or deps)
        assert isinstance(provider, aws.AwsSigV4Provider)
        built.append(provider)
        return provider

    yield build
    for provider in built:
        await provider.aclose()


def outbound(moto: Moto, method: str, path: str, *, query: str = "", body: bytes | None = None,
             headers: tuple[tuple[str, str], ...] = ()) -> OutboundRequest:
    """The request as the pipeline hands it over: cleaned headers plus Host, Via, traceparent."""
    out = OutboundRequest(method, "http", "127.0.0.1", moto.port, path, query, CIMultiDict(headers), body)
    out.headers["Host"] = out.host_header
    out.headers["Via"] = "1.1 sidecar"
    out.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return out


async def send(session: aiohttp.ClientSession, out: OutboundRequest) -> tuple[int, str]:
    """Send exactly what ``out`` describes, as the pipeline's forwarder does."""
    url = URL(f"{out.scheme}://{out.host_header}{out.path}" + (f"?{out.query}" if out.query else ""),
              encoded=True)
    if out.body is not None:
        out.headers["Content-Length"] = str(len(out.body))
    async with session.request(out.method, url, headers=out.headers, data=out.body) as response:
        return response.status, await response.text()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def federated(moto: Moto, make: Callable[..., aws.AwsSigV4Provider]) -> Credential:
    """Temporary credentials from moto's STS (authentication still off)."""
    provider = make(web_identity(moto.base, duration="15m"))
    return await provider.fetch(REQ)


# --- federation ----------------------------------------------------------------------------


@MOTO
async def test_web_identity_federation_gets_temporary_credentials(federated: Credential) -> None:
    """AssumeRoleWithWebIdentity at moto yields a session key with a parsed expiry, never standing."""
    creds = federated.material
    assert isinstance(creds, AwsCredentials)
    assert creds.access_key_id.startswith("ASIA") and creds.secret_access_key and creds.session_token
    assert federated.type == "aws_sigv4" and federated.standing is False
    assert federated.expires_at == creds.expires_at
    assert federated.expires_at is not None and federated.issued_at is not None
    assert abs(federated.expires_at - federated.issued_at - 900) < 120  # duration: 15m
    assert federated.id is not None and federated.id.startswith("h:")
    assert creds.access_key_id not in federated.id
    assert creds.secret_access_key not in repr(federated) and creds.session_token not in repr(federated)


async def test_provider_declares_itself(make: Callable[..., aws.AwsSigV4Provider]) -> None:
    """The registry builds aws_sigv4; a web-identity provider needs the body and is not standing."""
    provider = make(web_identity("https://sts.example.test"))
    assert type(provider) is aws.AwsSigV4Provider
    assert provider.needs_body is True and provider.standing is False and provider.task_bound is False
    assert provider.cache_key(REQ) == provider.cache_key(CredentialRequest("other", ("x",), AGENT_ID))


# --- signed calls against moto with IAM authentication on ----------------------------------


def _sts_whoami(m: Moto) -> OutboundRequest:
    return outbound(m, "POST", "/", body=WHOAMI, headers=(("Content-Type", FORM),))


def _ddb_list_tables(m: Moto) -> OutboundRequest:
    headers = (("Content-Type", "application/x-amz-json-1.0"), ("X-Amz-Target", "DynamoDB_20120810.ListTables"))
    return outbound(m, "POST", "/", body=b"{}", headers=headers)


def _s3_put(m: Moto, key: str = "report.json", body: bytes = b'{"ok": true}') -> OutboundRequest:
    headers = (("Content-Type", "application/json"), ("x-amz-meta-task", "t-1"))
    return outbound(m, "PUT", f"/{BUCKET}/{key}", body=body, headers=headers)


# (build the request, service, unsigned_payload)
ACCEPTED: dict[str, tuple[Callable[[Moto], OutboundRequest], str, bool]] = {
    # STS query protocol: the form body's SHA-256 is signed
    "sts-get-caller-identity": (_sts_whoami, "sts", False),
    # S3 ListBuckets: an empty body (None from the pipeline) hashes as the empty string
    "s3-list-buckets": (lambda m: outbound(m, "GET", "/"), "s3", False),
    # S3 PutObject, 64 KiB hashed, an agent x-amz-meta-* header signed with it
    "s3-put-object": (lambda m: _s3_put(m, "big%20file.bin", b"\x00\xff" * 32768), "s3", False),
    # S3 PutObject with unsigned_payload: true
    "s3-put-unsigned": (_s3_put, "s3", True),
    # S3 ListObjectsV2: a query with an escaped value
    "s3-list-objects": (lambda m: outbound(m, "GET", f"/{BUCKET}", query="list-type=2&prefix=big%20"), "s3", False),
    # DynamoDB: the agent's X-Amz-Target is the operation, kept and signed
    "dynamodb-list-tables": (_ddb_list_tables, "dynamodb", False),
}


@MOTO
@pytest.mark.parametrize(("build", "service", "unsigned"), ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_signed_call_is_accepted(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession, build: Callable[[Moto], OutboundRequest], service: str, unsigned: bool,
) -> None:
    """A request signed by apply() with federated credentials passes moto's IAM authentication."""
    provider = make({**web_identity(moto.base, service), "unsigned_payload": unsigned})
    out = build(moto)
    provider.apply(out, federated)
    iam_auth()
    status, text = await send(session, out)
    assert status == 200, text
    if unsigned:
        assert out.headers["X-Amz-Content-Sha256"] == UNSIGNED_PAYLOAD


@MOTO
async def test_caller_is_the_assumed_role_with_the_agents_session_name(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession,
) -> None:
    """GetCallerIdentity names the role and the session name derived from the agent's SPIFFE ID."""
    out = _sts_whoami(moto)
    make(web_identity(moto.base)).apply(out, federated)
    iam_auth()
    status, text = await send(session, out)
    assert status == 200, text
    assert xml_value(text, "Arn") == f"arn:aws:sts::{ACCOUNT}:assumed-role/agent/billing-agent"


@MOTO
async def test_put_object_reads_back(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession,
) -> None:
    """An object written through apply() reads back byte for byte, with its signed metadata."""
    s3 = make(web_identity(moto.base, "s3"))
    put, get = _s3_put(moto, "round%20trip.bin", b"\x00\x01data"), outbound(moto, "GET", f"/{BUCKET}/round%20trip.bin")
    s3.apply(put, federated)
    s3.apply(get, federated)
    iam_auth()
    assert (await send(session, put))[0] == 200
    async with session.get(URL(f"{moto.base}{get.path}", encoded=True), headers=get.headers) as response:
        assert (response.status, await response.read()) == (200, b"\x00\x01data")
        assert response.headers["x-amz-meta-task"] == "t-1"


def _altered_header(name: str, value: str) -> Callable[[OutboundRequest], None]:
    def alter(out: OutboundRequest) -> None:
        out.headers[name] = value

    return alter


def _set(attribute: str, value: Any) -> Callable[[OutboundRequest], None]:
    return lambda out: setattr(out, attribute, value)


# (build, service, change made after signing)
TAMPERED: dict[str, tuple[Callable[[Moto], OutboundRequest], str, Callable[[OutboundRequest], None]]] = {
    # STS: the form body (moto hashes what it received)
    "sts-body": (_sts_whoami, "sts", _set("body", WHOAMI + b"&Extra=1")),
    # S3: the object path
    "s3-path": (_s3_put, "s3", _set("path", f"/{BUCKET}/other.json")),
    # S3: the query
    "s3-query": (lambda m: outbound(m, "GET", f"/{BUCKET}", query="prefix=a"), "s3", _set("query", "prefix=b")),
    # S3: a signed agent header (object metadata)
    "s3-meta-header": (_s3_put, "s3", _altered_header("x-amz-meta-task", "t-2")),
    # S3: the signed Content-Type
    "s3-content-type": (_s3_put, "s3", _altered_header("Content-Type", "text/plain")),
    # S3: the declared payload hash (moto, unlike S3, does not compare a changed body with it)
    "s3-content-sha256": (_s3_put, "s3", _altered_header("X-Amz-Content-Sha256", payload_sha256(b"other"))),
    # DynamoDB: the operation
    "dynamodb-target": (_ddb_list_tables, "dynamodb",
                        _altered_header("X-Amz-Target", "DynamoDB_20120810.DescribeLimits")),
}


@MOTO
@pytest.mark.parametrize(("build", "service", "alter"), TAMPERED.values(), ids=TAMPERED.keys())
async def test_request_altered_after_signing_is_refused(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession, build: Callable[[Moto], OutboundRequest], service: str,
    alter: Callable[[OutboundRequest], None],
) -> None:
    """Changing a signed part of the request after apply() gets a 403 SignatureDoesNotMatch."""
    out = build(moto)
    make(web_identity(moto.base, service)).apply(out, federated)
    alter(out)
    iam_auth()
    status, text = await send(session, out)
    assert status == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in text, text


@MOTO
async def test_unsigned_headers_may_change_on_the_way(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession,
) -> None:
    """Via, traceparent and User-Agent are not signed: a proxy rewriting them breaks nothing."""
    out = _sts_whoami(moto)
    make(web_identity(moto.base)).apply(out, federated)
    out.headers["Via"] = "1.1 sidecar, 1.1 mesh"
    out.headers["traceparent"] = "00-11111111111111111111111111111111-2222222222222222-01"
    out.headers["User-Agent"] = "rewritten/1.0"
    iam_auth()
    status, text = await send(session, out)
    assert status == 200, text


def _signed_headers(out: OutboundRequest) -> str:
    return re.search(r"SignedHeaders=([^,]+)", out.headers["Authorization"]).group(1)  # type: ignore[union-attr]


@MOTO
async def test_agents_own_signature_is_replaced(
    moto: Moto, federated: Credential, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession,
) -> None:
    """The agent's Authorization, X-Amz-Date, token and payload hash are dropped; ours are sent."""
    agent = (("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAAGENTOWNKEY/x, Signature=00"),
             ("X-Amz-Date", "20200101T000000Z"), ("X-Amz-Security-Token", "agent-own-token"),
             ("X-Amz-Content-Sha256", "0" * 64), ("Content-Type", "application/json"), ("x-amz-meta-task", "t-1"))
    out = outbound(moto, "PUT", f"/{BUCKET}/replaced.json", body=b"{}", headers=agent)
    make(web_identity(moto.base, "s3")).apply(out, federated)
    [authorization] = out.headers.getall("Authorization")
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={federated.material.access_key_id}/")
    assert len(out.headers.getall("X-Amz-Date")) == 1
    assert out.headers.getall("X-Amz-Security-Token") == [federated.material.session_token]
    assert _signed_headers(out) == ("content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-task;"
                                    "x-amz-security-token")
    iam_auth()
    status, text = await send(session, out)
    assert status == 200, text


def test_signed_header_set(make: Callable[..., aws.AwsSigV4Provider], federated_offline: Credential) -> None:
    """host, content-type, content-md5 and the allowed x-amz-* are signed; hop-by-hop-ish and tracing headers
    are not."""
    headers = (("Content-Type", "text/plain"), ("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
               ("Content-Length", "0"), ("User-Agent", "agent/1"), ("Accept-Encoding", "gzip"),
               ("X-Amz-Acl", "private"), ("X-Request-Id", "r-1"))
    out = outbound(Moto("http://127.0.0.1:9", 9, federated_offline.material), "PUT", "/b/k", headers=headers)
    out.pass_headers = frozenset({"x-amz-acl"})  # not signed by default: the upstream lists it (issue 11 item 7)
    make(web_identity("https://sts.example.test", "s3")).apply(out, federated_offline)
    assert _signed_headers(out) == ("content-md5;content-type;host;x-amz-acl;x-amz-content-sha256;"
                                    "x-amz-date;x-amz-security-token")
    assert out.headers["X-Amz-Content-Sha256"] == payload_sha256(b"")


@pytest.fixture
def federated_offline() -> Credential:
    """A session credential as STS would return it, for checks that send nothing."""
    creds = AwsCredentials("ASIAEXAMPLEEXAMPLE", "secret/EXAMPLE+key", "session-token-example", time.time() + 3600)
    return Credential(type="aws_sigv4", provider="aws", id="h:x", expires_at=creds.expires_at, material=creds)


@pytest.mark.parametrize("query", [
    "X-Amz-Signature=abc&X-Amz-Credential=AKIA%2F", # a presigned URL's signature
    "x-amz-security-token=tok",                     # the agent's own session token, lowercase
    "prefix=a&X%2DAmz%2DCredential=AKIA",           # percent-encoded name
])
def test_presigned_query_is_refused(
    make: Callable[..., aws.AwsSigV4Provider], federated_offline: Credential, query: str
) -> None:
    """A query carrying its own AWS signature parameters is refused, not signed over."""
    out = outbound(Moto("http://127.0.0.1:9", 9, federated_offline.material), "GET", "/b", query=query)
    with pytest.raises(RequestRefused) as caught:
        make(web_identity("https://sts.example.test", "s3")).apply(out, federated_offline)
    assert caught.value.reason == "bad_request"
    assert "Authorization" not in out.headers


COPY_SOURCES = [  # (upstream host, x-amz-copy-source, path policy decides a GET of, header forwarded)
    # a path-style endpoint: the bucket is the first segment
    ("s3.eu-west-1.amazonaws.com", "b-1/k", "/b-1/k", "/b-1/k"),
    # one bucket's virtual-hosted endpoint: its key, as a GET through this upstream is matched
    ("b-1.s3.eu-west-1.amazonaws.com", "b-1/reports/a.txt?versionId=v", "/reports/a.txt",
     "/b-1/reports/a.txt?versionId=v"),
    # the same with a dotted bucket name and the dual-stack endpoint
    ("my.bucket.s3.dualstack.eu-west-1.amazonaws.com", "/my.bucket/k", "/k", "/my.bucket/k"),
    # an S3-compatible server under another name is read path-style
    ("minio.internal", "b-1/k", "/b-1/k", "/b-1/k"),
]


@pytest.mark.parametrize("host, value, path, header", COPY_SOURCES)
def test_a_copy_source_is_read_as_a_path_on_the_same_upstream(host: str, value: str, path: str, header: str) -> None:
    """A copy source is decided as the path a GET of it through the same upstream has (issue 11 item 7)."""
    source = copy_source([value], PathOptions(), host)
    assert (source.path, source.header) == (path, header)


def test_a_virtual_hosted_upstream_copies_only_from_its_own_bucket() -> None:
    """Through one bucket's virtual-hosted endpoint, a source in another bucket is refused (issue 11 item 7)."""
    with pytest.raises(RequestRefused) as refused:
        copy_source(["other/reports/a.txt"], PathOptions(), "b-1.s3.eu-west-1.amazonaws.com")
    assert refused.value.reason == "bad_request" and "bucket b-1" in refused.value.message


# --- the static source ---------------------------------------------------------------------


@MOTO
async def test_static_source_is_standing_and_signs(
    moto: Moto, make: Callable[..., aws.AwsSigV4Provider], iam_auth: Callable[[], None],
    session: aiohttp.ClientSession,
) -> None:
    """A static key is a standing credential that never expires, and its signatures are accepted."""
    provider = make({"region": REGION, "service": "s3", "source": {
        "type": "static", "access_key_id": {"value": moto.user.access_key_id},
        "secret_access_key": {"value": moto.user.secret_access_key}}})
    credential = await provider.fetch(REQ)
    assert provider.standing is True and credential.standing is True and credential.expires_at is None
    assert credential.id is not None and moto.user.access_key_id not in credential.id
    assert moto.user.secret_access_key not in repr(credential) + repr(provider) + repr(provider._spec)
    out = outbound(moto, "GET", "/")
    provider.apply(out, credential)
    assert "X-Amz-Security-Token" not in out.headers
    iam_auth()
    status, text = await send(session, out)
    assert status == 200, text
    assert f"<Name>{BUCKET}</Name>" in text


# --- what moto cannot show: a loopback stub that answers like STS ---------------------------


@dataclass(slots=True)
class StubSts:
    """A loopback endpoint answering with ``status`` and ``body``; it records each form."""

    url: str
    status: int = 200
    body: str = ""
    forms: list[dict[str, str]] | None = None


def sts_success(expiration: str = "2031-02-03T04:05:06Z", *, token: bool = True) -> str:
    session_token = "<SessionToken>FwoGZXIvYXdzEXAMPLE</SessionToken>" if token else ""
    return ('<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIASTUBEXAMPLE</AccessKeyId>"
            f"<SecretAccessKey>stub/secret+EXAMPLE</SecretAccessKey>{session_token}"
            f"<Expiration>{expiration}</Expiration></Credentials></AssumeRoleWithWebIdentityResult>"
            "</AssumeRoleWithWebIdentityResponse>")


def sts_error(code: str, message: str) -> str:
    return ('<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>r-1</RequestId></ErrorResponse>")


@pytest.fixture
async def stub() -> AsyncIterator[StubSts]:
    """An STS-like endpoint on a free loopback port."""
    state = StubSts(url="", body=sts_success(), forms=[])

    async def answer(request: web.Request) -> web.Response:
        assert state.forms is not None
        state.forms.append(dict(parse_qsl((await request.read()).decode())))
        return web.Response(status=state.status, text=state.body, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    yield state
    await runner.cleanup()


async def test_form_sent_to_sts_carries_a_self_signed_token(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], signer: Signer
) -> None:
    """The STS call is the Query API form, with a 5-minute JWT naming the agent for the audience."""
    await make(web_identity(stub.url, duration="2h")).fetch(REQ)
    assert stub.forms is not None
    form = stub.forms[0]
    assert {k: v for k, v in form.items() if k != "WebIdentityToken"} == {
        "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": ROLE_ARN,
        "RoleSessionName": "billing-agent", "DurationSeconds": "7200"}
    public = signer.key.private.public_key()
    claims = jwt.decode(form["WebIdentityToken"], public, algorithms=["ES256"], audience="sts.amazonaws.com")
    assert claims["sub"] == AGENT_ID and claims["iss"] == "https://agents.example.test"
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(form["WebIdentityToken"])["kid"] == "aws-test"


async def test_configured_audience_and_session_name_are_used(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], signer: Signer
) -> None:
    """audience and session_name from the config reach the token and the form."""
    await make(web_identity(stub.url, audience="https://agents.example.test/aws", session_name="task@run.1")).fetch(REQ)
    assert stub.forms is not None
    form = stub.forms[0]
    assert form["RoleSessionName"] == "task@run.1"
    jwt.decode(form["WebIdentityToken"], signer.key.private.public_key(), algorithms=["ES256"],
               audience="https://agents.example.test/aws")


async def test_token_file_is_reread_at_each_fetch(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], tmp_path: Path
) -> None:
    """A projected token file is read again at every fetch, so a rotated token is used."""
    token_file = tmp_path / "token"
    token_file.write_text("projected-token-1\n")
    provider = make(web_identity(stub.url, token_file=str(token_file)))
    await provider.fetch(REQ)
    token_file.write_text("projected-token-2")
    await provider.fetch(REQ)
    assert stub.forms is not None
    assert [f["WebIdentityToken"] for f in stub.forms] == ["projected-token-1", "projected-token-2"]


async def test_the_token_file_and_the_sts_tls_context_are_never_loaded_on_the_loop(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the projected token and building the STS client's TLS context (~120 ms with the system
    trust store) happen in a worker thread: on the loop they would stall every exchange."""
    token_file = tmp_path / "token"
    token_file.write_text("projected-token")
    context, read = ThreadSpy(aws.client_ssl_context), ThreadSpy(Path.read_text)
    monkeypatch.setattr(aws, "client_ssl_context", context)
    monkeypatch.setattr(Path, "read_text", lambda path, *args, **kwargs: read(path, *args, **kwargs))
    await make(web_identity(stub.url, token_file=str(token_file))).fetch(REQ)
    assert context.threads and read.threads
    assert not context.on_loop() and not read.on_loop()


@pytest.mark.parametrize(("expiration", "expected"), [
    ("2031-02-03T04:05:06Z", datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone.utc)),           # AWS's form
    ("2031-02-03T04:05:06.250000Z", datetime(2031, 2, 3, 4, 5, 6, 250000, tzinfo=timezone.utc)),  # moto's form
    ("2031-02-03T05:05:06+01:00", datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone.utc)),      # an offset
])
async def test_expiration_is_parsed(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], expiration: str, expected: datetime
) -> None:
    """STS's Expiration becomes the credential's and the key's expires_at (unix seconds)."""
    stub.body = sts_success(expiration)
    credential = await make(web_identity(stub.url)).fetch(REQ)
    assert credential.expires_at == expected.timestamp() == credential.material.expires_at


SECRET_MESSAGE = "token eyJhbGciOiJFUzI1NiJ9.payload.sig was refused"

# (HTTP status, answer body, expected detail)
STS_FAILURES: dict[str, tuple[int, str, str]] = {
    # the identity provider's token was not accepted
    "invalid-identity-token": (400, sts_error("InvalidIdentityToken", SECRET_MESSAGE), "sts: InvalidIdentityToken"),
    # the role's trust policy does not allow this web identity
    "access-denied": (403, sts_error("AccessDenied", SECRET_MESSAGE), "sts: AccessDenied"),
    # the web identity token has expired
    "expired-token": (400, sts_error("ExpiredTokenException", SECRET_MESSAGE), "sts: ExpiredTokenException"),
    # an HTML error page from a gateway in front of STS
    "html-502": (502, "<!doctype html><title>bad gateway</title>", "sts: HTTP 502"),
    # an error code that is not a code is not echoed
    "odd-code": (400, sts_error("Access Denied <x>", SECRET_MESSAGE), "sts: HTTP 400"),
    # a success answer without a session token
    "incomplete": (200, sts_success(token=False), "sts: malformed response (credentials incomplete)"),
    # a success answer that is not XML
    "not-xml": (200, "{}", "sts: malformed response (not XML)"),
    # XXE: an external entity in a DOCTYPE is refused before parsing
    "xxe": (200, '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                 + sts_success().replace("ASIASTUBEXAMPLE", "&x;"),
            "sts: malformed response (not utf-8, or a DOCTYPE, ENTITY or comment)"),
    # billion laughs: nested internal entities are refused before parsing
    "billion-laughs": (200, '<!DOCTYPE r [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;">]><r>&b;</r>',
                       "sts: malformed response (not utf-8, or a DOCTYPE, ENTITY or comment)"),
    # credentials that had expired before they arrived
    "already-expired": (200, sts_success("2001-01-01T00:00:00Z"), "sts: expired credentials"),
    # an Expiration that is not a time
    "bad-expiration": (200, sts_success("tomorrow"), "sts: malformed response (Expiration)"),
}


@pytest.mark.parametrize(("status", "body", "detail"), STS_FAILURES.values(), ids=STS_FAILURES.keys())
async def test_sts_failure_is_credential_unavailable(
    stub: StubSts, make: Callable[..., aws.AwsSigV4Provider], status: int, body: str, detail: str
) -> None:
    """An STS refusal or a bad answer is credential_unavailable with the code only, no secret."""
    stub.status, stub.body = status, body
    with pytest.raises(CredentialUnavailable) as caught:
        await make(web_identity(stub.url)).fetch(REQ)
    exc = caught.value
    assert exc.reason == "credential_unavailable" and exc.detail == detail
    assert exc.message.startswith("credentials: aws: ")
    assert stub.forms is not None
    said = f"{exc} {exc.detail} {exc!r}"
    for secret in (stub.forms[0]["WebIdentityToken"], "eyJ", "stub/secret+EXAMPLE", "FwoGZXIvYXdzEXAMPLE"):
        assert secret not in said


async def test_unreachable_sts_is_credential_unavailable(make: Callable[..., aws.AwsSigV4Provider]) -> None:
    """An sts_url on a closed loopback port fails closed with a clear detail."""
    with pytest.raises(CredentialUnavailable) as caught:
        await make(web_identity(f"http://127.0.0.1:{free_port()}/")).fetch(REQ)
    assert caught.value.detail == "sts: unreachable (ClientConnectorError for 127.0.0.1)"


async def test_missing_token_file_is_credential_unavailable(
    make: Callable[..., aws.AwsSigV4Provider], tmp_path: Path
) -> None:
    """A token_file that is not there is credential_unavailable, before any STS call."""
    with pytest.raises(CredentialUnavailable) as caught:
        await make(web_identity("https://sts.example.test", token_file=str(tmp_path / "gone"))).fetch(REQ)
    assert caught.value.detail == "token_file: FileNotFoundError"


async def test_no_signer_is_credential_unavailable(make: Callable[..., aws.AwsSigV4Provider]) -> None:
    """Without a signing key there is no web identity token: credential_unavailable."""
    provider = make(web_identity("https://sts.example.test"), ProviderDeps(agent_id=AGENT_ID))
    with pytest.raises(CredentialUnavailable) as caught:
        await provider.fetch(REQ)
    assert caught.value.detail == "no signer"


@pytest.mark.parametrize(("agent_id", "expected"), [
    ("spiffe://example.org/ns/agents/sa/billing-agent", "billing-agent"),  # the usual last segment
    ("spiffe://example.org/ns/a/sa/bill ing:agent!", "bill-ing-agent"),    # outside STS's charset
    ("spiffe://example.org/" + "x" * 80, "x" * 64),                        # STS's 64-character limit
    ("spiffe://example.org/", "example.org"),                              # no path: the trust domain
    ("spiffe://example.org/ä", "sidecar"),                                  # nothing usable left
])
def test_session_name_is_derived_from_the_agent_id(agent_id: str, expected: str) -> None:
    """The default RoleSessionName is the agent ID's last segment, in STS's charset and length."""
    assert aws.session_name_for(agent_id) == expected


# --- config ----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    """A minimal web identity entry gets the regional STS URL, 1h, the STS audience and a JWT."""
    spec = parse_spec({"region": "eu-west-1", "service": "s3",
                       "source": {"type": "web_identity", "role_arn": ROLE_ARN}})
    assert spec == AwsSigV4Spec("eu-west-1", "s3", False, WebIdentitySource(
        ROLE_ARN, "https://sts.eu-west-1.amazonaws.com", None, None, 3600, None, "sts.amazonaws.com"))
    assert spec.needs_signing_key is True


def test_config_token_file_and_static_need_no_signing_key() -> None:
    """With token_file, or with a static key, no identity.signing_key is needed."""
    projected = parse_spec(web_identity("https://sts.example.test", token_file="/var/run/secrets/tokens/aws"))
    static = parse_spec({"region": REGION, "service": "s3", "source": {
        "type": "static", "access_key_id": {"value": "AKIAEXAMPLE"}, "secret_access_key": {"value": "s3cr3t"},
        "session_token": {"value": "tok"}}})
    assert projected is not None and projected.needs_signing_key is False
    assert static is not None and static.needs_signing_key is False
    assert isinstance(static.source, StaticSource) and "s3cr3t" not in repr(static)


def test_config_loader_requires_a_signing_key_for_a_self_signed_token(tmp_path: Path) -> None:
    """sidecar validate asks for identity.signing_key when the web identity token is self-signed."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("credentials:\n  aws-s3:\n    type: aws_sigv4\n    region: eu-west-1\n    service: s3\n"
                      f"    source: {{type: web_identity, role_arn: '{ROLE_ARN}'}}\n")
    with pytest.raises(ConfigInvalid) as caught:
        load_config(config)
    assert [str(e) for e in caught.value.errors] == [
        "identity.signing_key: is required: credentials aws-s3 rely on a key registered with a verifier"]
    config.write_text(config.read_text().replace("}", ", token_file: /var/run/secrets/tokens/aws}"))
    assert load_config(config).credentials["aws-s3"].type == "aws_sigv4"


S3 = {"region": REGION, "service": "s3"}
WEB = {"type": "web_identity", "role_arn": ROLE_ARN}

# (entry, path of the error, what the message says)
CONFIG_ERRORS: dict[str, tuple[dict[str, Any], str, str]] = {
    # an unknown key beside the known ones, found by the loader's done()
    "unknown-key": ({**S3, "source": WEB, "regoin": "x"}, "credentials.aws.regoin", "unknown key"),
    # an unknown key inside source
    "unknown-source-key": ({**S3, "source": {**WEB, "role": "x"}}, "credentials.aws.source.role", "unknown key"),
    # web identity without the role to assume
    "missing-role-arn": ({**S3, "source": {"type": "web_identity"}}, "credentials.aws.source.role_arn", "is required"),
    # a role ARN that is not an IAM role
    "bad-role-arn": ({**S3, "source": {**WEB, "role_arn": "arn:aws:iam::123:user/x"}},
                     "credentials.aws.source.role_arn", "must be an IAM role ARN"),
    # unsigned payloads are an S3 feature
    "unsigned-on-sts": ({"region": REGION, "service": "dynamodb", "unsigned_payload": True, "source": WEB},
                        "credentials.aws.unsigned_payload", "allowed only for s3 services"),
    # STS over plain http to a remote host
    "http-sts": ({**S3, "source": {**WEB, "sts_url": "http://sts.example.com"}},
                 "credentials.aws.source.sts_url", "must be an https URL"),
    # shorter than STS allows
    "duration-short": ({**S3, "source": {**WEB, "duration": "5m"}}, "credentials.aws.source.duration",
                       "between 15m and 12h"),
    # longer than STS allows
    "duration-long": ({**S3, "source": {**WEB, "duration": "13h"}}, "credentials.aws.source.duration",
                      "between 15m and 12h"),
    # a session name outside STS's charset
    "session-name": ({**S3, "source": {**WEB, "session_name": "my agent"}}, "credentials.aws.source.session_name",
                     "letters, digits"),
    # a CA file that is not there
    "missing-ca": ({**S3, "source": {**WEB, "ca": "/nonexistent/ca.pem"}}, "credentials.aws.source.ca",
                   "file not found"),
    # no source at all
    "missing-source": ({**S3}, "credentials.aws.source", "is required"),
    # an empty source
    "empty-source": ({**S3, "source": {}}, "credentials.aws.source.type", "is required"),
    # a source type that does not exist
    "source-type": ({**S3, "source": {"type": "imds"}}, "credentials.aws.source.type", "must be one of"),
    # a static source without its secret half
    "static-no-secret": ({**S3, "source": {"type": "static", "access_key_id": {"value": "AKIAEXAMPLE"}}},
                         "credentials.aws.source.secret_access_key", "is required"),
    # a static key pasted as a plain string
    "static-plain-string": ({**S3, "source": {"type": "static", "access_key_id": "AKIAEXAMPLE",
                                              "secret_access_key": {"value": "s3cr3t"}}},
                            "credentials.aws.source.access_key_id", "must be exactly one of {value: ...}, "
                                                                    "{from_env: NAME}, {from_file: PATH}, got a string"),
    # a region that is not a region
    "region": ({"region": "EU West", "service": "s3", "source": WEB}, "credentials.aws.region", "AWS region"),
    # no service to sign for
    "missing-service": ({"region": REGION, "source": WEB}, "credentials.aws.service", "is required"),
}


@pytest.mark.parametrize(("raw", "path", "message"), CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_error(raw: dict[str, Any], path: str, message: str) -> None:
    """Each bad entry is reported at its path, with what was expected, and never echoes a secret."""
    errors: list[ConfigError] = []
    parse_spec(raw, errors)
    assert any(e.path == path and message in e.message for e in errors), [str(e) for e in errors]
    assert not any("s3cr3t" in str(e) or "AKIAEXAMPLE" in str(e) for e in errors)


def test_http_sts_on_loopback_is_allowed() -> None:
    """http:// is allowed for an STS on a loopback host (tests, a local STS)."""
    errors: list[ConfigError] = []
    assert parse_spec(web_identity("http://127.0.0.1:4566/"), errors) is not None and not errors


async def test_through_the_cache_sts_is_called_once(stub: StubSts, make: Callable[..., aws.AwsSigV4Provider]) -> None:
    """Behind the credential cache, concurrent and later requests share one STS call."""
    cache = CredentialCache(Metrics())
    provider = make(web_identity(stub.url))
    got = await asyncio.gather(*(cache.get(provider, REQ) for _ in range(5)))
    again = await cache.get(provider, REQ)
    await cache.aclose()
    assert stub.forms is not None and len(stub.forms) == 1
    assert {c.id for c, _ in got} == {again[0].id} and again[1] == "cache"
