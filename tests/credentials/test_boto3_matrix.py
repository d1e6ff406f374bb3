"""boto3 as agents run it, every body mode it uses, against moto with IAM auth on (so only the sidecar's key
is accepted): through HTTPS_PROXY with interception (path-style and virtual-hosted addressing) and through
route-prefix and HTTP_PROXY mode over HTTP; with the default checksums (an aws-chunked CRC32 trailer over TLS,
a checksum header over HTTP), with request_checksum_calculation="when_required", and with payload signing on.
Every object, from 0 bytes to a 12 MiB multipart upload, reads back byte for byte (issue 14 item 1).

botocore never sends STREAMING-AWS4-HMAC-SHA256-PAYLOAD (auth.py signs a payload whole, UNSIGNED-PAYLOAD or
STREAMING-UNSIGNED-PAYLOAD-TRAILER; payload_signing_enabled only chooses the whole-body SHA-256): signed chunks
are driven by tests/credentials/test_aws_streaming.py instead."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from tests.conftest import TEST_LOOP
from tests.credentials.s3_setup import s3_config
from tests.peers.moto import BUCKET, REGION

pytestmark = pytest.mark.peer("moto")
KIB, MIB = 1024, 1024 * 1024
S3_NAME = "s3.us-east-1.amazonaws.com"  # virtual-hosted: <bucket>.s3.us-east-1.amazonaws.com
PATH_NAME = "s3.sidecar.test"  # path-style through interception
SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 256 * KIB, MIB + 7]  # the acceptance's 0 B, 1 B, 256 KiB; chunk edges
MULTIPART = 12 * MIB  # the acceptance's 12 MiB past an 8 MiB threshold: CreateMultipartUpload, two UploadParts, Complete
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "path-style", "direction": "outbound", "upstream": "s3", "methods": ["GET", "HEAD", "PUT", "POST"],
     "paths": [f"/{BUCKET}/matrix/**"], "effect": "allow"},
    {"id": "virtual-hosted", "direction": "outbound", "upstream": "s3", "methods": ["GET", "HEAD", "PUT", "POST"],
     "paths": ["/matrix/**"], "effect": "allow"}]}


@dataclass(frozen=True)
class Mode:
    """How the agent reaches S3 and what boto3 is told."""

    via: str  # connect (HTTPS_PROXY, interception) | prefix (route-prefix, HTTP) | proxy (HTTP_PROXY, HTTP)
    addressing: str  # path | virtual
    checksum: str = "when_supported"  # boto3's default, or when_required
    payload_signing: bool | None = None  # s3={"payload_signing_enabled": ...}; None: boto3's default
    algorithm: str | None = None  # put_object's ChecksumAlgorithm; None: boto3's default (CRC32)

    def client(self, h) -> Any:
        s3: dict[str, Any] = {"addressing_style": self.addressing}
        if self.payload_signing is not None:
            s3["payload_signing_enabled"] = self.payload_signing
        config = Config(s3=s3, retries={"total_max_attempts": 1}, request_checksum_calculation=self.checksum,
                        proxies={"https": h.outbound} if self.via == "connect" else
                        {"http": h.outbound} if self.via == "proxy" else {})
        endpoint = {"connect": f"https://{S3_NAME if self.addressing == 'virtual' else PATH_NAME}",
                    "prefix": f"{h.outbound}/s3", "proxy": f"http://{S3_NAME}"}[self.via]
        verify = str(h.sidecar.interceptor.ca_cert_path) if self.via == "connect" else None
        return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="AKIDAGENTHASNOKEY",
                            aws_secret_access_key="agent-has-no-secret", verify=verify, config=config)

    @property
    def body_mode(self) -> str:
        """The X-Amz-Content-Sha256 boto3 is expected to send with a PutObject of some bytes."""
        if self.via == "connect" and self.checksum == "when_supported" and not self.payload_signing:
            return "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        return "sha256"  # over HTTP botocore always signs the payload; so it does over TLS without a checksum


MODES = {
    "connect-path-default": Mode("connect", "path"),
    "connect-path-when-required": Mode("connect", "path", "when_required"),
    "connect-virtual-default": Mode("connect", "virtual"),
    "connect-virtual-when-required": Mode("connect", "virtual", "when_required"),
    "connect-virtual-crc64nvme": Mode("connect", "virtual", algorithm="CRC64NVME"),  # the trailer S3 suggests
    "prefix-path-default": Mode("prefix", "path"),
    "prefix-path-when-required": Mode("prefix", "path", "when_required"),
    "prefix-path-payload-signing": Mode("prefix", "path", payload_signing=True),
    "proxy-virtual-payload-signing": Mode("proxy", "virtual", payload_signing=True),
}


def matrix_config(moto, mode: Mode) -> dict:
    config = s3_config(moto)
    config["outbound"]["upstreams"]["s3"]["hosts"] = [PATH_NAME, f"*.{S3_NAME}"]
    return config


def content(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + b"\x00" * (size % 251)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
async def test_every_boto3_upload_reads_back_byte_for_byte(make_sidecar, moto, iam_auth, mode):
    """PutObject at every size around the 64 KiB chunk, and a 12 MiB multipart upload_file (under uvloop,
    the loop production runs: the suite's second run under asyncio skips the big one), read back exactly."""
    h = await make_sidecar(matrix_config(moto, mode), POLICY)
    client = mode.client(h)
    sent: list[dict[str, str]] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(
        {k.lower(): v if isinstance(v, str) else v.decode() for k, v in request.headers.items()}))
    iam_auth()
    for size in SIZES:
        data = content(size)
        extra = {"ChecksumAlgorithm": mode.algorithm} if mode.algorithm else {}
        await asyncio.to_thread(client.put_object, Bucket=BUCKET, Key=f"matrix/{size}.bin", Body=data, **extra)
        assert await read_back(client, f"matrix/{size}.bin") == data, size
    declared = {headers["x-amz-content-sha256"] for headers in sent}
    assert mode.body_mode in declared or (mode.body_mode == "sha256" and any(len(v) == 64 for v in declared))
    checksum = f"x-amz-checksum-{(mode.algorithm or 'crc32').lower()}"
    checksums = {v for headers in sent for name, v in headers.items() if name in ("x-amz-trailer", checksum)}
    assert bool(checksums) == (mode.checksum == "when_supported")  # the checksum column was exercised
    assert not checksums or checksum in checksums or mode.via != "connect"
    if TEST_LOOP == "uvloop":
        data = content(MULTIPART)
        transfer = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, use_threads=False)
        await asyncio.to_thread(client.upload_fileobj, io.BytesIO(data), BUCKET, "matrix/multipart.bin",
                                Config=transfer)
        assert await read_back(client, "matrix/multipart.bin") == data
        assert any("uploadId=" in line for line in uploads(h))
    events = await h.settle()
    assert {(e["decision"], e["status"]) for e in events} == {("allow", 200)}
    assert {e["rule_id"] for e in events} == {"path-style" if mode.addressing == "path" else "virtual-hosted"}


async def read_back(client: Any, key: str) -> bytes:
    response = await asyncio.to_thread(client.get_object, Bucket=BUCKET, Key=key)
    return await asyncio.to_thread(response["Body"].read)


def uploads(h) -> list[str]:
    """The query of each exchange the sidecar recorded."""
    return [e["target"]["query"] or "" for e in h.events()]
