"""An agent's presigned S3 URL: refused by default; with ``presigned: resign`` signed again as a presigned URL
with the sidecar's key, never forwarded with the agent's parameters beside ours. botocore's own presigner
(S3SigV4QueryAuth) is the oracle, over the provider's output and over what an upstream received (issue 14
item 1)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
import requests
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from multidict import CIMultiDict

from sidecar.credentials.aws import AwsSigV4Provider
from sidecar.credentials.base import Credential, OutboundRequest, ProviderDeps
from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.credentials.sigv4 import AwsCredentials
from sidecar.errors import RequestRefused
from tests.credentials.s3_setup import BOTO3_POLICY, recording_config, s3_config
from tests.credentials.providers import config_errors, parse_spec
from tests.peers.moto import BUCKET, REGION

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
SIDECAR = AwsCredentials("AKIDSIDECAR", "sidecar-secret-canary")
SESSION = AwsCredentials("ASIASIDECAR", "sidecar-secret-canary", "sidecar-session-token")
HOST = "s3.us-east-1.amazonaws.com"


def provider(presigned: str = "resign", service: str = "s3", at: datetime = NOW) -> AwsSigV4Provider:
    spec = parse_spec("aws_sigv4", {"region": REGION, "service": service, "presigned": presigned, "source": {
        "type": "static", "access_key_id": {"value": "AKIDSIDECAR"}, "secret_access_key": {"value": "x"}}})
    built = PROVIDER_TYPES["aws_sigv4"].build("aws", spec, ProviderDeps(agent_id="spiffe://t/a", id_key=b"k" * 32,
                                                                        clock=at.timestamp))
    assert isinstance(built, AwsSigV4Provider)
    return built


def credential(creds: AwsCredentials = SIDECAR) -> Credential:
    return Credential(type="aws_sigv4", provider="aws", id="h:x", standing=True, material=creds)


def agent_presigned(method: str, key: str, *, endpoint: str = f"https://{HOST}", expires: int = 900,
                    **params: Any) -> str:
    """A URL the agent's boto3 presigned with its own placeholder key."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="AKIDAGENT",
                          aws_secret_access_key="agent-placeholder", aws_session_token="agent-token",
                          config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    operation = {"GET": "get_object", "PUT": "put_object"}[method]
    return client.generate_presigned_url(operation, Params={"Bucket": BUCKET, "Key": key, **params},
                                         ExpiresIn=expires)


def outbound(url: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()) -> OutboundRequest:
    parts = urlsplit(url)
    out = OutboundRequest(method, "https", HOST, 443, parts.path, parts.query, CIMultiDict(headers))
    out.headers["Host"] = out.host_header
    out.headers["Via"] = "1.1 sidecar"
    return out


def botocore_presigned(method: str, url: str, headers: dict[str, str], creds: AwsCredentials, when: datetime,
                       expires: int) -> dict[str, str]:
    """The query botocore's presigner gives the same request at the same moment with the same key."""
    request = AWSRequest(method=method, url=url, headers=headers)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        S3SigV4QueryAuth(Credentials(creds.access_key_id, creds.secret_access_key, creds.session_token), "s3",
                         REGION, expires=expires).add_auth(request)
    return dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))


def unsigned(url: str) -> str:
    """The URL without the presigner's parameters: the request the agent meant."""
    parts = urlsplit(url)
    kept = [p for p in parts.query.split("&") if not p.lower().startswith("x-amz-")]
    return parts._replace(query="&".join(kept)).geturl()


CASES = {
    # a plain GET: host is the only signed header
    "get": ("GET", "reports/q3.json", (), {}),
    # a GET with a response override the agent chose: kept, and signed
    "get-with-override": ("GET", "reports/q3.json", (), {"ResponseContentType": "text/plain"}),
    # a PUT with a content type and metadata: signed as headers
    "put-with-headers": ("PUT", "reports/up.bin", (("Content-Type", "application/octet-stream"),
                                                    ("x-amz-meta-owner", "billing")), {}),
}


@pytest.mark.parametrize(("method", "key", "headers", "params"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("creds", [SIDECAR, SESSION], ids=["key", "session"])
def test_a_resigned_url_is_the_one_botocore_presigns(method, key, headers, params, creds):
    """Every parameter of the re-signed URL, the signature included, equals botocore's for the same request,
    key and moment; the agent's credential, token and signature are gone, and no Authorization is added."""
    url = agent_presigned(method, key, **params)
    out = outbound(url, method, headers)
    provider().apply(out, credential(creds))
    ours = dict(parse_qsl(out.query, keep_blank_values=True))
    signed = {k: v for k, v in out.headers.items() if k.lower() not in ("host", "via")}
    assert ours == botocore_presigned(method, unsigned(url), signed, creds, NOW, 900)
    assert ours["X-Amz-Credential"].startswith(f"{creds.access_key_id}/20260304/{REGION}/s3/")
    assert "AKIDAGENT" not in out.query and "agent-token" not in out.query
    assert not any(k.lower() in ("authorization", "x-amz-content-sha256", "x-amz-date") for k in out.headers)
    assert out.query.endswith("&X-Amz-Signature=" + ours["X-Amz-Signature"])


def test_a_presigned_url_is_refused_by_default():
    """Without presigned: resign, the agent's presigned URL is refused with a reason naming the setting."""
    out = outbound(agent_presigned("GET", "reports/q3.json"))
    with pytest.raises(RequestRefused) as refused:
        provider("refuse").apply(out, credential())
    assert refused.value.reason == "bad_request" and "presigned: resign" in refused.value.message
    assert "Authorization" not in out.headers


def forged(url: str, name: str, value: str | None) -> str:
    """The URL with one presigner parameter replaced (None: removed)."""
    parts = urlsplit(url)
    pairs = [p for p in parts.query.split("&") if p.partition("=")[0] != name]
    return parts._replace(query="&".join(pairs + ([f"{name}={value}"] if value is not None else []))).geturl()


REFUSED = {
    # SigV4a: the sidecar has no key pair for it
    "sigv4a": (lambda url: forged(url, "X-Amz-Algorithm", "AWS4-ECDSA-P256-SHA256"), "X-Amz-Algorithm"),
    # no lifetime
    "no-expires": (lambda url: forged(url, "X-Amz-Expires", None), "X-Amz-Expires"),
    # longer than SigV4 allows
    "expires-too-long": (lambda url: forged(url, "X-Amz-Expires", "604801"), "X-Amz-Expires"),
    # a date that is not one
    "bad-date": (lambda url: forged(url, "X-Amz-Date", "yesterday"), "X-Amz-Date"),
    # a parameter given twice: which one the service reads is not for the sidecar to guess
    "twice": (lambda url: url + "&X-Amz-Signature=" + "0" * 64, "twice"),
    # made an hour ago for 15 minutes
    "expired": (lambda url: forged(url, "X-Amz-Date", "20260304T040607Z"), "expired"),
}


@pytest.mark.parametrize(("change", "problem"), REFUSED.values(), ids=REFUSED.keys())
def test_a_presigned_url_that_cannot_be_resigned_faithfully_is_refused(change, problem):
    """An unknown algorithm, a missing or over-long lifetime, a bad date, a repeated parameter, an expired URL."""
    out = outbound(change(agent_presigned("GET", "reports/q3.json")))
    with pytest.raises(RequestRefused) as refused:
        provider().apply(out, credential())
    assert refused.value.reason == "bad_request" and problem in refused.value.message


def test_a_presigned_url_with_a_streaming_body_is_refused():
    """A presigned URL signs no payload, so an aws-chunked upload cannot ride on one."""
    out = outbound(agent_presigned("PUT", "reports/up.bin"), "PUT", (
        ("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"), ("Content-Encoding", "aws-chunked")))
    with pytest.raises(RequestRefused) as refused:
        provider().apply(out, credential())
    assert "aws-chunked" in refused.value.message


def test_resign_is_for_s3_services_only():
    """presigned: resign on another service is a config error naming the key."""
    errors = config_errors("aws_sigv4", {"region": REGION, "service": "sts", "presigned": "resign", "source": {
        "type": "static", "access_key_id": {"value": "a"}, "secret_access_key": {"value": "b"}}})
    assert len(errors) == 1 and "credentials.test.presigned" in errors[0] and "s3 services" in errors[0]


# --- through the pipeline ---------------------------------------------------------------------------------

def resigning(config: dict) -> dict:
    config["credentials"]["aws"]["presigned"] = "resign"
    return config


@pytest.mark.peer("moto")
async def test_presigned_put_and_get_round_trip_through_the_sidecar(make_sidecar, moto):
    """boto3's presigned PUT and GET URLs, made with the agent's placeholder key for the route-prefix endpoint,
    store and read back the object through moto."""
    h = await make_sidecar(resigning(s3_config(moto)), BOTO3_POLICY)
    endpoint = f"{h.outbound}/s3"
    data = bytes(range(256)) * 40
    put = agent_presigned("PUT", "reports/presigned.bin", endpoint=endpoint)
    stored = await asyncio.to_thread(requests.put, put, data=data)
    assert stored.status_code == 200, stored.text
    read = await asyncio.to_thread(requests.get, agent_presigned("GET", "reports/presigned.bin", endpoint=endpoint))
    assert (read.status_code, read.content) == (200, data)


async def test_what_the_upstream_receives_is_botocores_presigned_url(make_sidecar, upstream):
    """On the wire: the sidecar's key, botocore's signature for that request and moment, nothing of the agent's."""
    h = await make_sidecar(resigning(recording_config(upstream)), BOTO3_POLICY)
    url = agent_presigned("GET", "reports/q3.json", endpoint=f"{h.outbound}/s3", expires=300)
    response = await asyncio.to_thread(requests.get, url)
    assert response.status_code == 200
    [seen] = upstream.seen
    path, _, query = seen.path.partition("?")
    received = dict(parse_qsl(query, keep_blank_values=True))
    when = datetime.strptime(received["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    creds = AwsCredentials("AKIDSIDECAR", "sidecar-secret-canary")
    assert received == botocore_presigned("GET", f"http://127.0.0.1:{upstream.port}{path}", {}, creds, when, 300)
    assert not seen.has_header("Authorization") and "AKIDAGENT" not in seen.path
