"""``aws_sigv4``: sign the agent's AWS calls with keys it never sees.

    credentials:
      aws-s3:
        type: aws_sigv4
        region: eu-west-1
        service: s3
        unsigned_payload: false     # s3 services only: sign UNSIGNED-PAYLOAD, not a whole body's SHA-256
        presigned: refuse           # s3 services only: resign an agent's presigned URL as one of ours
        source: {type: web_identity, role_arn: ..., sts_url: ..., ca: ..., session_name: ...,
                 duration: 1h, token_file: ..., audience: sts.amazonaws.com}
        # or: {type: static, access_key_id: {ref}, secret_access_key: {ref}, session_token: {ref}}

Sources:

- ``web_identity``: STS ``AssumeRoleWithWebIdentity`` (Query API, an unsigned form POST to
  ``sts_url``) returns temporary keys; the cache refreshes them at ~80 % of ``duration``. The
  web identity token is a JWT this sidecar signs (``sub`` = the agent's SPIFFE ID, ``aud`` =
  ``audience``, 5 minutes), or, with ``token_file``, a projected service-account token re-read
  at each fetch. ``session_name`` defaults to the last segment of the agent's SPIFFE ID,
  reduced to STS's ``[\\w+=,.@-]`` and 64 characters.
- ``static``: a fixed access key; the provider is then ``standing`` (an instance attribute
  here, set from the source, where other providers have a class attribute).

Signing (``apply``, called after every other header rewrite): the agent's ``Authorization``,
``X-Amz-Date``, ``X-Amz-Security-Token`` and ``X-Amz-Content-Sha256`` are dropped. A query
carrying a presigned URL's parameters (``X-Amz-Signature``, ``-Credential``, ``-Date``, ...) is
refused, or with ``presigned: resign`` signed again as a presigned URL with the sidecar's key
(the agent's parameters all dropped, its ``X-Amz-Expires`` kept, an expired URL refused). Signed: ``host``, ``content-type``, ``content-md5``, ``content-encoding`` and the
agent's ``x-amz-*`` headers, each of which must be one the sidecar signs by default or one the
upstream lists in ``pass_headers`` (else 400); the payload is signed in the body mode the
agent declared, or refused when it cannot be signed as sent (``sidecar.credentials.aws_request``).
Not signed: what a proxy or HTTP library may rewrite on the way without changing the operation
(``content-length``, which the pipeline writes after signing, ``via``, ``traceparent``,
``user-agent``, ``accept-encoding``): fewer signed headers, fewer spurious ``SignatureDoesNotMatch``.
A streaming upload is signed without reading its body (``needs_body_for``); a signed one's chunks
are re-signed as they stream (``sidecar.credentials.aws_chunked``, set as ``out.reframe``).

STS answers are parsed with ElementTree after refusing any ``<!`` (DOCTYPE, ENTITY, comment):
no STS answer has one. STS error codes reach ``CredentialUnavailable.detail`` as
``sts: AccessDenied``; STS's free-text message, the token and the keys never do.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import ClassVar, Hashable, Mapping
from urllib.parse import urlencode, urlsplit

import aiohttp

from sidecar.credentials.aws_chunked import ChunkResigner
from sidecar.credentials.aws_request import (
    AGENT_SIGNATURE, Presigned, check_agent_headers, declares_streaming, is_signed, presigned, refuse_presigned,
    signed_upload, streaming_payload,
)
from sidecar.credentials.base import (
    Credential, CredentialRequest, OutboundRequest, ProviderDeps, keyed_id, read_token_file,
)
from sidecar.credentials.echo import guard_for
from sidecar.credentials.sigv4 import (
    EMPTY_SHA256, S3_SERVICES, UNSIGNED_PAYLOAD, AwsCredentials, chunk_signer, payload_sha256, presign,
    signing_steps,
)
from sidecar.credentials.specs import AwsSigV4Spec, StaticSource, WebIdentitySource
from sidecar.errors import CredentialUnavailable, RequestRefused
from sidecar.http.tls import client_ssl_context

WEB_IDENTITY_TTL = 300.0  # the self-signed token only has to outlive one STS call
STS_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
MAX_STS_RESPONSE = 64 * 1024

_NOT_SESSION_CHARS = re.compile(r"[^\w+=,.@-]+", re.ASCII)
_STS_CODE = re.compile(r"[A-Za-z0-9.:_-]{1,64}")


class AwsSigV4Provider:
    type: ClassVar[str] = AwsSigV4Spec.type
    needs_body: ClassVar[bool] = True
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: AwsSigV4Spec, deps: ProviderDeps) -> None:
        self.name = name
        self.standing: bool = isinstance(spec.source, StaticSource)  # per instance: set by the source
        self._spec = spec
        self._s3 = spec.service in S3_SERVICES
        self._clock = deps.clock or time.time
        self._sts = _Sts(name, spec.source, deps) if isinstance(spec.source, WebIdentitySource) else None
        self._static = _static_credential(name, spec.source, deps) if isinstance(spec.source, StaticSource) else None

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return self.name

    async def fetch(self, req: CredentialRequest) -> Credential:
        if self._static is not None:
            return self._static
        assert self._sts is not None
        return await self._sts.assume_role()

    def needs_body_for(self, headers: Mapping[str, str]) -> bool:
        """A streaming upload is signed as declared (or refused) without reading its body."""
        return not declares_streaming(headers)

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        url = presigned(out.query)
        refuse_presigned(url, self._spec.presigned == "resign", self._clock())
        check_agent_headers(out.headers, out.pass_headers)
        if url is not None:
            self._presign(out, credential, url)
            return
        streaming = streaming_payload(out.headers, s3=self._s3)
        upload = signed_upload(out.headers, streaming) if streaming else None
        payload_hash = streaming or self._payload_hash(out.body)
        for header in AGENT_SIGNATURE:
            out.headers.popall(header, None)
        out.headers["Host"] = out.host_header
        to_sign = [(k, v) for k, v in out.headers.items() if is_signed(k)]
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        region, service = self._spec.region, self._spec.service
        steps = signing_steps(out.method, out.host_header, out.path, out.query, to_sign, payload_hash,
                              credential.material, region, service, now)
        for header, value in steps.headers:
            out.headers[header] = value
        if upload is not None:  # the chunks chain from this head's signature: re-signed as they stream
            out.reframe = ChunkResigner(upload, chunk_signer(steps, credential.material, region, service))

    def _presign(self, out: OutboundRequest, credential: Credential, url: Presigned) -> None:
        """The agent's presigned URL, signed again as one with the sidecar's key (``presigned: resign``)."""
        if declares_streaming(out.headers):
            raise RequestRefused("bad_request", "credentials: a presigned URL carries an aws-chunked upload; "
                                                "expected a whole body (a presigned URL signs no payload)")
        for header in AGENT_SIGNATURE:
            out.headers.popall(header, None)
        out.headers["Host"] = out.host_header
        to_sign = [(k, v) for k, v in out.headers.items() if is_signed(k)]
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        out.query = presign(out.method, out.host_header, out.path, url.query, to_sign, credential.material,
                            self._spec.region, self._spec.service, now, url.expires)

    def _payload_hash(self, body: bytes | None) -> str:
        if self._spec.unsigned_payload:
            return UNSIGNED_PAYLOAD
        return payload_sha256(body) if body else EMPTY_SHA256

    async def aclose(self) -> None:
        if self._sts is not None:
            await self._sts.aclose()

    def __repr__(self) -> str:
        return f"AwsSigV4Provider({self.name!r}, service={self._spec.service!r}, region={self._spec.region!r})"


def _static_credential(name: str, source: StaticSource, deps: ProviderDeps) -> Credential:
    key_id = source.access_key_id.reveal()
    token = source.session_token.reveal() if source.session_token else None
    material = AwsCredentials(key_id, source.secret_access_key.reveal(), token, None)
    return Credential(type=AwsSigV4Spec.type, provider=name, id=keyed_id(deps.id_key, key_id), standing=True,
                      material=material, echo=guard_for(token))


# --- STS AssumeRoleWithWebIdentity -----------------------------------------------------


class StsError(Exception):
    """An STS call that gave no credentials; ``detail`` is safe to log (``sts: AccessDenied``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Sts:
    """One provider's STS client: a lazily created session, one call per fetch."""

    def __init__(self, name: str, source: WebIdentitySource, deps: ProviderDeps) -> None:
        self._name = name
        self._source = source
        self._deps = deps
        self._clock = deps.clock or time.time
        self._session_name = source.session_name or session_name_for(deps.agent_id)
        self._session: aiohttp.ClientSession | None = None

    async def assume_role(self) -> Credential:
        token = await self._web_identity_token()
        form = {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": self._source.role_arn,
                "RoleSessionName": self._session_name, "WebIdentityToken": token,
                "DurationSeconds": str(self._source.duration)}
        issued_at = self._clock()
        try:
            status, body = await self._post(urlencode(form))
            creds = parse_sts_response(status, body)
        except StsError as exc:
            raise CredentialUnavailable(f"credentials: {self._name}: sts AssumeRoleWithWebIdentity gave no "
                                        f"credentials", detail=exc.detail) from None
        if creds.expires_at is not None and creds.expires_at <= self._clock():
            raise CredentialUnavailable(f"credentials: {self._name}: sts returned credentials that have "
                                        f"already expired", detail="sts: expired credentials")
        return Credential(type=AwsSigV4Spec.type, provider=self._name, id=keyed_id(self._deps.id_key, creds.access_key_id),
                          expires_at=creds.expires_at, issued_at=issued_at, standing=False, material=creds,
                          echo=guard_for(creds.session_token))

    async def _web_identity_token(self) -> str:
        if self._source.token_file is not None:
            return await asyncio.to_thread(read_token_file, self._name, self._source.token_file,
                                           "web identity token_file")  # a projected volume: never read on the loop
        signer = self._deps.signer
        if signer is None:
            raise CredentialUnavailable(f"credentials: {self._name}: web identity needs identity.signing_key",
                                        detail="no signer")
        claims = {"sub": self._deps.agent_id, "aud": self._source.audience}
        token, _, _ = signer.sign(claims, ttl=WEB_IDENTITY_TTL)
        return str(token)

    async def _post(self, form: str) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Accept": "text/xml"}
        try:
            session = await self._client()
            async with session.post(self._source.sts_url, data=form.encode(), headers=headers,
                                    allow_redirects=False) as response:
                body = await response.content.read(MAX_STS_RESPONSE + 1)
                return response.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
            host = urlsplit(self._source.sts_url).hostname
            raise StsError(f"sts: unreachable ({type(exc).__name__} for {host})") from None

    async def _client(self) -> aiohttp.ClientSession:
        """The STS session; its TLS context is built in a worker thread (~120 ms with the system store)."""
        if self._session is None or self._session.closed:
            context = await asyncio.to_thread(client_ssl_context, str(self._source.ca) if self._source.ca else None)
            if self._session is None or self._session.closed:  # not built by a concurrent fetch meanwhile
                self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                                      timeout=STS_TIMEOUT)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def session_name_for(agent_id: str) -> str:
    """STS RoleSessionName from the agent's ID: its last path segment, in STS's charset."""
    last = agent_id.rstrip("/").rpartition("/")[2]
    name = _NOT_SESSION_CHARS.sub("-", last).strip("-")[:64]
    return name if len(name) >= 2 else "sidecar"


def parse_sts_response(status: int, body: bytes) -> AwsCredentials:
    """Credentials from an AssumeRoleWithWebIdentity answer; :class:`StsError` otherwise."""
    if len(body) > MAX_STS_RESPONSE:
        raise StsError(f"sts: response over {MAX_STS_RESPONSE} bytes")
    root = _xml(body, status)
    if status != 200:
        code = _text(root, "Code") if root is not None else None
        raise StsError(f"sts: {code}" if code and _STS_CODE.fullmatch(code) else f"sts: HTTP {status}")
    if root is None:
        raise StsError("sts: malformed response")
    fields = [_text(root, tag) for tag in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")]
    key_id, secret, token, expiration = fields
    if not (key_id and secret and token and expiration):
        raise StsError("sts: malformed response (credentials incomplete)")
    return AwsCredentials(key_id, secret, token, _expiration(expiration))


def _xml(body: bytes, status: int) -> ET.Element | None:
    """The parsed answer, or ``None`` for an error page that is not plain XML (HTML, a DTD)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "<!" in text:  # DOCTYPE, ENTITY, comment: none belong in an STS answer
        if status == 200:
            raise StsError("sts: malformed response (not utf-8, or a DOCTYPE, ENTITY or comment)")
        return None
    try:
        return ET.fromstring(text)  # a str is parsed as utf-8 whatever its declaration says
    except ET.ParseError:
        if status == 200:
            raise StsError("sts: malformed response (not XML)") from None
        return None


def _text(root: ET.Element, local_name: str) -> str | None:
    for element in root.iter():
        if element.tag.rpartition("}")[2] == local_name:
            return (element.text or "").strip()
    return None


def _expiration(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise StsError("sts: malformed response (Expiration)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
