"""SigV4 through the whole pipeline: against moto, signed after every header rewrite and accepted with IAM auth
on (also from boto3 at its defaults, behind HTTPS_PROXY); against a recording upstream, what is forwarded and
that a refusal forwards nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.credentials.s3_setup import BOTO3_POLICY, recording_config, s3_config
from tests.harness import Seen, Upstream, raw_http
from tests.peers.moto import BUCKET, REGION
from tests.scenarios.approval import approval_config, approve, listed

pytestmark = pytest.mark.peer("moto")
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "reports", "direction": "outbound", "upstream": "s3", "methods": ["GET", "PUT"],
     "paths": [f"/{BUCKET}/reports/*"], "effect": "allow"}]}


async def test_the_agent_writes_and_reads_s3_through_the_sidecar(make_sidecar, moto, iam_auth):
    """An unsigned agent request is signed by the sidecar and accepted by moto with IAM auth on."""
    h = await make_sidecar(s3_config(moto), POLICY)
    iam_auth()
    body = b'{"total": 42}' * 100
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{h.outbound}/s3/{BUCKET}/reports/q3.json", data=body,
                         headers={"Authorization": "AWS4-HMAC-SHA256 agent-forged", "Content-Type": "application/json",
                                  "x-amz-meta-owner": "billing"}) as r:
            assert r.status == 200, await r.text()
        async with s.get(f"{h.outbound}/s3/{BUCKET}/reports/q3.json") as r:
            assert r.status == 200 and await r.read() == body
            assert r.headers.get("x-amz-meta-owner") == "billing"
        async with s.get(f"{h.outbound}/s3/{BUCKET}/private/x") as r:  # policy first: never signed
            assert (r.status, (await r.json())["error"]) == (403, "no_matching_rule")
    events = await h.settle()
    assert [e["credential"]["type"] for e in events[:2]] == ["aws_sigv4", "aws_sigv4"]
    assert events[0]["credential"]["standing"] is True
    assert moto.user.secret_access_key.encode() not in h.raw_log()


async def test_a_wrong_secret_is_refused_by_the_service(make_sidecar, moto, iam_auth):
    """A signature made with the wrong secret is refused by moto (403), proving the check is real."""
    h = await make_sidecar(s3_config(moto, type="static", access_key_id={"value": moto.user.access_key_id},
                                     secret_access_key={"value": "wrong-secret-canary"}), POLICY)
    iam_auth()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/s3/{BUCKET}/reports/q3.json") as r:
            assert r.status == 403 and "SignatureDoesNotMatch" in await r.text()
    assert b"wrong-secret-canary" not in h.raw_log()


# --- boto3 at its defaults, through CONNECT interception (HTTPS_PROXY), to moto ------------------------------

S3_HOST = "s3.sidecar.test"
MIB = 1024 * 1024


def connect_config(moto) -> dict:
    """moto behind the host name boto3 is pointed at, reached through CONNECT interception."""
    config = s3_config(moto)
    config["outbound"]["upstreams"]["s3"]["hosts"] = [S3_HOST]
    return config


@dataclass
class Boto3:
    """A boto3 S3 client with its defaults, configured the way an agent behind HTTPS_PROXY would be."""

    client: Any
    sent: list[dict[str, str]]  # the headers of each request boto3 sent, names lowercased

    async def __call__(self, operation: str, **params: Any) -> Any:
        return await asyncio.to_thread(getattr(self.client, operation), **params)

    def sent_header(self, name: str) -> list[str]:
        return [headers[name] for headers in self.sent if name in headers]


def boto3_s3(h) -> Boto3:
    """Only the endpoint, the proxy and the CA are set (path-style addressing, no retries): checksums keep boto3's
    defaults. The agent's key is a dummy: the sidecar drops its signature and signs with its own key."""
    sent: list[dict[str, str]] = []
    client = boto3.client(
        "s3", endpoint_url=f"https://{S3_HOST}", region_name=REGION, aws_access_key_id="AKIDAGENTHASNOKEY",
        aws_secret_access_key="agent-has-no-secret", verify=str(h.sidecar.interceptor.ca_cert_path),
        config=Config(proxies={"https": h.outbound}, s3={"addressing_style": "path"},
                      retries={"total_max_attempts": 1}))
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(
        {k.lower(): v if isinstance(v, str) else v.decode() for k, v in request.headers.items()}))
    return Boto3(client, sent)


async def read_back(s3: Boto3, key: str) -> bytes:
    response = await s3("get_object", Bucket=BUCKET, Key=key)
    return await asyncio.to_thread(response["Body"].read)


async def put_object(s3: Boto3, key: str, data: bytes) -> None:
    await s3("put_object", Bucket=BUCKET, Key=key, Body=data, ContentType="application/octet-stream",
             Metadata={"owner": "billing"})


async def upload_fileobj(s3: Boto3, key: str, data: bytes) -> None:
    await s3("upload_fileobj", Fileobj=io.BytesIO(data), Bucket=BUCKET, Key=key)


async def upload_part(s3: Boto3, key: str, data: bytes) -> None:
    upload = await s3("create_multipart_upload", Bucket=BUCKET, Key=key)
    part = await s3("upload_part", Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data)
    await s3("complete_multipart_upload", Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
             MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})


UPLOADS = {
    # PutObject, small: one aws-chunked PUT with a CRC32 trailer
    "put-object": (put_object, b"\x00\xff" + b"small object " * 40),
    # upload_fileobj over the 8 MiB threshold: CreateMultipartUpload, two aws-chunked UploadParts, Complete
    "upload-fileobj-multipart": (upload_fileobj, bytes(range(256)) * (9 * MIB // 256) + b"tail"),
    # UploadPart called directly
    "upload-part": (upload_part, b"one part " * 1000),
}


@pytest.mark.parametrize(("upload", "data"), UPLOADS.values(), ids=UPLOADS.keys())
async def test_boto3_uploads_read_back_byte_for_byte(make_sidecar, moto, iam_auth, upload, data):
    """boto3's default aws-chunked uploads are signed as declared and S3 stores the object, not the framing
    (issue 11 item 8)."""
    h = await make_sidecar(connect_config(moto), BOTO3_POLICY)
    s3 = boto3_s3(h)
    iam_auth()
    key = f"reports/{upload.__name__}.bin"
    await upload(s3, key, data)
    assert "aws-chunked" in s3.sent_header("content-encoding")  # boto3's default body mode was exercised
    assert await read_back(s3, key) == data
    events = await h.settle()
    assert {e["decision"] for e in events} == {"allow"} and {e["status"] for e in events} == {200}


async def test_boto3_ordinary_calls_pass_the_signed_header_set(make_sidecar, moto, iam_auth):
    """Every x-amz-* header boto3's ordinary S3 calls send at their defaults is signed and accepted
    (issue 11 item 7)."""
    h = await make_sidecar(connect_config(moto), BOTO3_POLICY)
    s3 = boto3_s3(h)
    iam_auth()
    await s3("put_object", Bucket=BUCKET, Key="reports/ordinary.txt", Body=b"ordinary", StorageClass="STANDARD",
             ServerSideEncryption="AES256", ChecksumAlgorithm="SHA256", ExpectedBucketOwner="123456789012")
    assert (await s3("head_object", Bucket=BUCKET, Key="reports/ordinary.txt"))["ContentLength"] == 8
    assert await read_back(s3, "reports/ordinary.txt") == b"ordinary"
    listed = await s3("list_objects_v2", Bucket=BUCKET, Prefix="reports/ordinary")
    assert [o["Key"] for o in listed["Contents"]] == ["reports/ordinary.txt"]
    await s3("delete_objects", Bucket=BUCKET, Delete={"Objects": [{"Key": "reports/ordinary.txt"}]})
    await s3("delete_object", Bucket=BUCKET, Key="reports/ordinary.txt")
    sent = {name for headers in s3.sent for name in headers if name.startswith("x-amz-")}
    assert {"x-amz-checksum-mode", "x-amz-sdk-checksum-algorithm", "x-amz-storage-class",
            "x-amz-server-side-encryption", "x-amz-expected-bucket-owner", "x-amz-trailer"} <= sent
    assert {e["status"] for e in await h.settle()} == {200, 204}


async def test_boto3_copies_only_from_a_source_policy_lets_it_read(make_sidecar, moto, iam_auth):
    """CopyObject and UploadPartCopy into an allowed prefix need a rule that allows reading the source
    (issue 11 item 7)."""
    h = await make_sidecar(connect_config(moto), BOTO3_POLICY)
    s3 = boto3_s3(h)
    iam_auth()
    await s3("put_object", Bucket=BUCKET, Key="reports/source.txt", Body=b"readable")
    await s3("put_object", Bucket=BUCKET, Key="inbox/dropped.txt", Body=b"write-only prefix")
    await s3("copy_object", Bucket=BUCKET, Key="reports/copy.txt", CopySource=f"{BUCKET}/reports/source.txt")
    assert await read_back(s3, "reports/copy.txt") == b"readable"
    with pytest.raises(ClientError) as refused:  # inbox/ may be written, never read: copying out of it is a read
        await s3("copy_object", Bucket=BUCKET, Key="reports/stolen.txt", CopySource=f"{BUCKET}/inbox/dropped.txt")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    upload = await s3("create_multipart_upload", Bucket=BUCKET, Key="reports/stolen-part.txt")
    with pytest.raises(ClientError):
        await s3("upload_part_copy", Bucket=BUCKET, Key="reports/stolen-part.txt", UploadId=upload["UploadId"],
                 PartNumber=1, CopySource={"Bucket": BUCKET, "Key": "inbox/dropped.txt"})
    with pytest.raises(ClientError) as missing:
        await s3("head_object", Bucket=BUCKET, Key="reports/stolen.txt")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    events = await h.settle()
    copies = [e for e in events if e["target"]["copy_source"]]
    assert [(e["target"]["copy_source"], e["decision"], e["reason"]) for e in copies] == [
        (f"/{BUCKET}/reports/source.txt", "allow", "allowed"),
        (f"/{BUCKET}/inbox/dropped.txt", "deny", "no_matching_rule"),
        (f"/{BUCKET}/inbox/dropped.txt", "deny", "no_matching_rule")]


# --- what reaches the upstream: a recording loopback server ------------------------------------------------

async def put(h, key: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{h.outbound}/s3/{BUCKET}/{key}", data=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


def signed_headers(seen: Seen) -> list[str]:
    return (seen.header("Authorization") or "").partition("SignedHeaders=")[2].partition(",")[0].split(";")


async def only_event(h) -> dict:
    [event] = await h.settle()
    return event


@pytest.mark.parametrize("name, value", [
    ("x-amz-acl", "public-read"),                            # makes the written object world-readable
    ("X-Amz-Grant-Read", 'uri="http://acs.amazonaws.com/groups/global/AllUsers"'),  # the same, as a grant
    ("x-amz-website-redirect-location", "https://evil.test/"),  # turns the object into a redirect
    ("x-amz-object-lock-mode", "COMPLIANCE"),                # locks the object against deletion for years
    ("x-amz-bypass-governance-retention", "true"),           # deletes through a governance lock
    ("x-amz-tagging", "classification=public"),              # tags that tag-based IAM conditions trust
    ("x-amz-rename-source", f"/{BUCKET}/inbox/x"),           # RenameObject: another object, moved
    ("x-amz-future-operation-parameter", "1"),               # a header nobody has reviewed yet
])
async def test_an_amz_header_outside_the_signed_set_is_refused(make_sidecar, upstream, name, value):
    """An agent x-amz-* header the operator did not allow is refused with a 400 naming it, never signed
    (issue 11 item 7)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    status, body = await put(h, "reports/x.txt", [(name, value)], b"x")
    assert (status, body["error"]) == (400, "bad_request")
    assert name.lower() in body["message"] and "pass_headers" in body["message"]
    assert upstream.seen == []
    event = await only_event(h)
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "bad_request", 400)


async def test_an_upstream_lists_the_amz_headers_it_may_receive(make_sidecar, upstream):
    """An x-amz-* header the upstream lists in pass_headers is signed and forwarded (issue 11 item 7)."""
    h = await make_sidecar(recording_config(upstream, pass_headers=["x-amz-acl"]), BOTO3_POLICY)
    status, _ = await put(h, "reports/x.txt", [("x-amz-acl", "bucket-owner-full-control")], b"x")
    assert status == 200
    assert upstream.seen[0].header("x-amz-acl") == "bucket-owner-full-control"
    assert "x-amz-acl" in signed_headers(upstream.seen[0])


VERSION = "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"
COPY_ALLOWED = {  # header sent -> (the copy source policy decided on, the header forwarded)
    # the canonical spelling, as boto3 sends it: no leading slash
    "plain": (f"{BUCKET}/reports/a.txt", f"/{BUCKET}/reports/a.txt", f"/{BUCKET}/reports/a.txt"),
    # a version is part of what is read
    "version": (f"/{BUCKET}/reports/a.txt?versionId={VERSION}", f"/{BUCKET}/reports/a.txt?versionId={VERSION}",
                f"/{BUCKET}/reports/a.txt?versionId={VERSION}"),
    # escapes stay escapes (uppercase hex); a raw '+' goes out escaped, so S3 cannot read it as a space
    "escapes": (f"{BUCKET}/reports/a%2bb%20c+d.txt", f"/{BUCKET}/reports/a%2Bb%20c+d.txt",
                f"/{BUCKET}/reports/a%2Bb%20c%2Bd.txt"),
    # dot segments are removed before deciding, and what was decided on is what is forwarded
    "dot-segments": (f"/{BUCKET}/inbox/../reports/a.txt", f"/{BUCKET}/reports/a.txt", f"/{BUCKET}/reports/a.txt"),
}


@pytest.mark.parametrize("value, decided, forwarded", COPY_ALLOWED.values(), ids=COPY_ALLOWED.keys())
async def test_a_copy_source_policy_may_read_is_forwarded_as_decided(make_sidecar, upstream, value, decided,
                                                                     forwarded):
    """A copy source a GET rule allows is forwarded in the canonical form policy decided on, signed, and
    recorded in the event (issue 11 item 7)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    status, _ = await put(h, "inbox/copy.txt", [("x-amz-copy-source", value), ("x-amz-metadata-directive", "COPY")])
    assert status == 200
    [seen] = upstream.seen
    assert seen.header("x-amz-copy-source") == forwarded
    assert "x-amz-copy-source" in signed_headers(seen)
    event = await only_event(h)
    assert (event["decision"], event["rule_id"], event["target"]["copy_source"]) == ("allow", "inbox-write-only",
                                                                                     decided)


async def test_an_approver_sees_the_copy_source_of_a_held_copy(make_sidecar, upstream, tmp_path):
    """A copy held for approval lists the object it reads, and what the approver saw is what is sent
    (issue 11 item 7)."""
    config = {**approval_config(upstream, tmp_path), **recording_config(upstream)}
    policy = {**BOTO3_POLICY, "rules": [*BOTO3_POLICY["rules"], {
        "id": "held-writes", "direction": "outbound", "upstream": "s3", "methods": ["PUT"],
        "paths": [f"/{BUCKET}/held-writes/**"], "effect": "require_approval"}]}
    h = await make_sidecar(config, policy)
    held = asyncio.ensure_future(put(h, "held-writes/copy.txt", [("x-amz-copy-source", f"{BUCKET}/reports/a+b")]))
    [pending] = await listed(h)
    assert pending["copy_source"] == f"/{BUCKET}/reports/a+b" and upstream.seen == []
    await approve(h, pending["id"])
    assert (await asyncio.wait_for(held, 10))[0] == 200
    assert upstream.seen[0].header("x-amz-copy-source") == f"/{BUCKET}/reports/a%2Bb"


COPY_REFUSED = {
    # a prefix the agent may write but not read: the copy is a read of it
    "write-only-source": ([f"/{BUCKET}/inbox/x"], 403, "no_matching_rule", "/inbox/x"),
    # the same, spelled with dot segments
    "dot-segments": ([f"/{BUCKET}/reports/../inbox/x"], 403, "no_matching_rule", "/inbox/x"),
    # the same, with an escaped unreserved character
    "escaped-letter": ([f"{BUCKET}/%69nbox/x?versionId=1"], 403, "no_matching_rule", "/inbox/x"),
    # a deny rule on reads wins even though the destination is writable
    "denied-read": ([f"/{BUCKET}/reports/secret/k"], 403, "rule_denied", "/reports/secret/k"),
    # a read that needs an approval: a copy is not held for one
    "held-read": ([f"/{BUCKET}/reports/held/k"], 403, "rule_denied", "/reports/held/k"),
    # another bucket: no rule names it
    "other-bucket": (["/other-bucket/reports/a.txt"], 403, "no_matching_rule", "other-bucket"),
    # escaped slashes would hide the structure policy decides on
    "escaped-slashes": ([f"%2F{BUCKET}%2Freports%2Fa.txt"], 400, "bad_request", "%2F"),
    # an access point ARN names no path on this upstream
    "access-point": (["arn:aws:s3:us-east-1:123456789012:accesspoint/ap/object/reports/a.txt"], 400,
                     "bad_request", "bucket"),
    # anything but versionId after the '?'
    "extra-parameter": ([f"/{BUCKET}/reports/a.txt?versionId=1&acl"], 400, "bad_request", "versionId"),
    # a bucket without a key
    "no-key": ([f"/{BUCKET}/"], 400, "bad_request", "key"),
    # two copy sources: which one S3 reads is not for the sidecar to guess
    "two-headers": ([f"/{BUCKET}/reports/a.txt", f"/{BUCKET}/inbox/x"], 400, "bad_request", "more than one"),
}


@pytest.mark.parametrize("values, status, reason, shown", COPY_REFUSED.values(), ids=COPY_REFUSED.keys())
async def test_a_copy_source_policy_may_not_read_is_refused(make_sidecar, upstream, values, status, reason, shown):
    """CopyObject into an allowed prefix is refused unless policy allows a GET of its source; nothing is sent
    (issue 11 item 7)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    got, body = await put(h, "reports/copy.txt", [("x-amz-copy-source", value) for value in values])
    assert (got, body["error"]) == (status, reason)
    assert shown in body["message"] and "copy source" in body["message"]
    assert upstream.seen == []
    event = await only_event(h)
    assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, status)
    if status == 403:
        assert shown in event["target"]["copy_source"]


# --- S3 body modes --------------------------------------------------------------------------------------

def aws_chunked(data: bytes, chunk: int = 64 * 1024) -> bytes:
    """The aws-chunked framing of an unsigned-trailer upload, as boto3 writes it (CRC32 trailer)."""
    frames = b"".join(b"%x\r\n%b\r\n" % (len(data[i:i + chunk]), data[i:i + chunk]) for i in range(0, len(data), chunk))
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    return frames + b"0\r\nx-amz-checksum-crc32:" + crc + b"\r\n\r\n"


def streaming_head(framed_length: int, decoded_length: int, *, mode: str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                   encoding: str = "aws-chunked", port: int, connection: str = "close") -> bytes:
    return (f"PUT /s3/{BUCKET}/reports/streamed.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: {connection}\r\n"
            f"Content-Length: {framed_length}\r\nContent-Encoding: {encoding}\r\nX-Amz-Content-Sha256: {mode}\r\n"
            f"X-Amz-Decoded-Content-Length: {decoded_length}\r\nX-Amz-Trailer: x-amz-checksum-crc32\r\n"
            f"x-amz-sdk-checksum-algorithm: CRC32\r\n\r\n").encode()


async def test_an_unsigned_trailer_upload_is_streamed_as_sent(make_sidecar):
    """STREAMING-UNSIGNED-PAYLOAD-TRAILER is signed as the literal declared, its framing forwarded untouched,
    and the body streamed: the upstream reads the first frame before the agent has sent the rest (issue 11 item 8)."""
    first_frame_seen = asyncio.Event()
    received: list[bytes] = []

    async def s3(request: web.Request) -> web.Response:
        received.append(await request.content.readexactly(64))
        first_frame_seen.set()
        received.append(await request.read())
        return web.Response(headers={"ETag": '"e"'})

    upstream = await Upstream(s3).start()
    try:
        h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
        data = bytes(range(256)) * 1024
        framed = aws_chunked(data)
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port("outbound"))
        writer.write(streaming_head(len(framed), len(data), port=h.port("outbound")) + framed[:100])
        await asyncio.wait_for(first_frame_seen.wait(), 10)  # the sidecar did not wait for the whole body
        writer.write(framed[100:])
        response = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    finally:
        await upstream.stop()
    assert response.startswith(b"HTTP/1.1 200")
    assert b"".join(received) == framed
    [seen] = upstream.seen
    assert seen.header("X-Amz-Content-Sha256") == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert (seen.header("Content-Encoding"), seen.header("X-Amz-Decoded-Content-Length")) == ("aws-chunked",
                                                                                            str(len(data)))
    assert {"content-encoding", "x-amz-content-sha256", "x-amz-decoded-content-length",
            "x-amz-trailer"} <= set(signed_headers(seen))


async def test_a_body_is_signed_by_the_headers_that_are_forwarded(make_sidecar, upstream):
    """A streaming declaration the agent drops through Connection is not forwarded, so the body goes whole
    with its own SHA-256 signed, not unread under a hash of nothing (issue 11 item 8)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    framed = aws_chunked(b"payload")
    hidden = "close, X-Amz-Content-Sha256, Content-Encoding, X-Amz-Decoded-Content-Length, X-Amz-Trailer"
    answer = await raw_http(h.port("outbound"), streaming_head(len(framed), 7, port=h.port("outbound"),
                                                               connection=hidden) + framed)
    assert answer.startswith(b"HTTP/1.1 200")
    [seen] = upstream.seen
    assert not seen.has_header("Content-Encoding") and seen.body == framed
    assert seen.header("X-Amz-Content-Sha256") == hashlib.sha256(framed).hexdigest()


BODY_MODES_REFUSED = {
    # signed chunks declared without their framing: nothing to re-sign
    "signed-chunks-unframed": ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "identity", "aws-chunked"),
    # signed chunks with an X-Amz-Trailer: the trailer would go unsigned
    "signed-chunks-undeclared-trailer": ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "aws-chunked", "no X-Amz-Trailer"),
    # SigV4a chunk signatures
    "sigv4a-chunks": ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "aws-chunked",
                      "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"),
    # aws-chunked framing declared with a whole-body hash: S3 would store the framing
    "framing-with-body-hash": ("0" * 64, "aws-chunked", "aws-chunked"),
    # aws-chunked framing with no payload declaration at all
    "framing-undeclared": ("UNSIGNED-PAYLOAD", "gzip, aws-chunked", "aws-chunked"),
    # a streaming payload whose framing is not declared
    "streaming-without-framing": ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", "identity", "aws-chunked"),
}


@pytest.mark.parametrize("mode, encoding, named", BODY_MODES_REFUSED.values(), ids=BODY_MODES_REFUSED.keys())
async def test_a_body_mode_the_sidecar_cannot_sign_as_sent_is_refused(make_sidecar, upstream, mode, encoding, named):
    """An upload whose declared body mode the sidecar cannot sign faithfully, or whose declared encoding and
    payload disagree, is refused with a 400 naming it; nothing is forwarded (issue 11 item 8)."""
    h = await make_sidecar(recording_config(upstream), BOTO3_POLICY)
    framed = aws_chunked(b"payload")
    answer = await raw_http(h.port("outbound"), streaming_head(len(framed), 7, mode=mode, encoding=encoding,
                                                               port=h.port("outbound")) + framed)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    refusal = json.loads(body)
    assert refusal["error"] == "bad_request" and named in refusal["message"]
    assert upstream.seen == []
    event = await only_event(h)
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "bad_request", 400)
