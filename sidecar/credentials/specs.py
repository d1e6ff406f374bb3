"""What ``credentials:`` accepts: one frozen spec per credential type, parsed once at config load.

Each ``parse_*`` reads one ``credentials.<name>`` mapping with :class:`~sidecar.fields.Fields`
and returns its spec, or ``None`` after recording every problem with its path. This module is
the config side of the providers: it imports no runtime module (no aiohttp, nothing of
``sidecar.forward``), so that ``sidecar.config`` can validate a file without loading the
machinery that sends requests. The provider built from a spec lives in the module named after
its type; ``sidecar.credentials.registry`` pairs the two.

Every spec says its ``type``, the ``scopes`` it asks for by default and whether it
``needs_signing_key`` (``identity.signing_key``), which ``sidecar.config`` checks across sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol
from urllib.parse import urlsplit

from sidecar.credentials.canonical import DIGEST_ALGORITHMS, CanonicalParts, canonical_parts
from sidecar.credentials.placement import BEARER, Placement, header_only, header_or_query
from sidecar.credentials.rfc9421 import (
    ALGORITHMS, DIGESTS, KEY_ENCODINGS, Algorithm, Component, component, is_sf_string, load_key, shared_secret,
)
from sidecar.credentials.sigv4 import S3_SERVICES
from sidecar.fields import Fields, Secret


class CredentialSpec(Protocol):
    """What every spec tells the rest of the config."""

    type: ClassVar[str]

    @property
    def scopes(self) -> tuple[str, ...]: ...

    @property
    def needs_signing_key(self) -> bool: ...


# --- static --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaticSpec:
    type: ClassVar[str] = "static"
    value: Secret
    placement: Placement
    scopes: ClassVar[tuple[str, ...]] = ()  # a standing credential has none
    needs_signing_key: ClassVar[bool] = False


def parse_static(f: Fields) -> StaticSpec | None:
    value = f.secret("value", required=True)
    placement = header_or_query(f)
    if value is None or placement is None:
        return None
    return StaticSpec(value, placement)


# --- jwt_assertion -------------------------------------------------------------------

MIN_ASSERTION_TTL, MAX_ASSERTION_TTL = 10.0, 3600.0


@dataclass(frozen=True, slots=True)
class JwtAssertionSpec:
    type: ClassVar[str] = "jwt_assertion"
    audience: str
    ttl: float = 60.0
    placement: Placement = BEARER
    scopes: tuple[str, ...] = ()
    needs_signing_key: ClassVar[bool] = True


def parse_jwt_assertion(f: Fields) -> JwtAssertionSpec | None:
    audience = f.text("audience", required=True)
    ttl = f.duration("ttl", "60s")
    if not MIN_ASSERTION_TTL <= ttl <= MAX_ASSERTION_TTL:
        f.error("ttl", "must be between 10s and 1h")
    placement = header_only(f)
    scopes = _scopes(f)
    if audience is None or placement is None:
        return None
    return JwtAssertionSpec(audience, ttl, placement, scopes)


# --- OAuth 2.0: the token endpoint, client credentials, token exchange ----------------

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
                "client_assertion_file")
SECRET_METHODS = frozenset(AUTH_METHODS[:2])
_SCOPE_TOKEN = re.compile(r'^[\x21\x23-\x5b\x5d-\x7e]+$')  # RFC 6749 §3.3 scope-token


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where tokens come from and how this client proves who it is."""
    token_url: str
    client_id: str
    auth: str
    issuer: str | None = None
    ca: Path | None = None
    client_secret: Secret | None = None
    timeout: float = 10.0
    assertion_file: Path | None = None  # client_assertion_file: an externally issued JWT, re-read per token request

    @property
    def assertion_audience(self) -> str:
        """``aud`` of the JWTs we sign for this server (client assertions, actor tokens)."""
        return self.issuer or self.token_url


@dataclass(frozen=True, slots=True)
class ClientCredentialsSpec:
    type: ClassVar[str] = "oauth2_client_credentials"
    endpoint: Endpoint
    scopes: tuple[str, ...] = ()
    resource: str | None = None
    audience: str | None = None

    @property
    def needs_signing_key(self) -> bool:
        return self.endpoint.auth == "private_key_jwt"


@dataclass(frozen=True, slots=True)
class TokenExchangeSpec:
    type: ClassVar[str] = "oauth2_token_exchange"
    endpoint: Endpoint
    scopes: tuple[str, ...] = ()
    resource: str | None = None
    audience: str | None = None
    impersonate: bool = False
    needs_signing_key: ClassVar[bool] = True  # the actor token is always signed


def parse_client_credentials(f: Fields) -> ClientCredentialsSpec | None:
    endpoint = _endpoint(f)
    scopes = _scopes(f)
    resource, audience = _target(f, required=False)
    return ClientCredentialsSpec(endpoint, scopes, resource, audience) if endpoint is not None else None


def parse_token_exchange(f: Fields) -> TokenExchangeSpec | None:
    endpoint = _endpoint(f)
    scopes = _scopes(f)
    resource, audience = _target(f, required=True)
    impersonate = f.flag("impersonate", False)
    if endpoint is None or (resource is None and audience is None):
        return None
    return TokenExchangeSpec(endpoint, scopes, resource, audience, impersonate)


def _endpoint(f: Fields) -> Endpoint | None:
    token_url = f.url("token_url", required=True, https_unless_loopback=True)
    issuer = f.url("issuer", https_unless_loopback=True)
    ca = f.path_value("ca", must_exist=True)
    client_id = f.text("client_id", required=True)
    auth = f.choice("auth", AUTH_METHODS) if f.has("auth") else "client_secret_basic"
    secret = _client_secret(f, auth)
    assertion_file = _assertion_file(f, auth)
    timeout = _timeout(f)
    if token_url is None or client_id is None or auth is None or (auth in SECRET_METHODS and secret is None) \
            or (auth == "client_assertion_file" and assertion_file is None):
        return None
    return Endpoint(token_url, client_id, auth, issuer, ca, secret, timeout, assertion_file)


def _timeout(f: Fields) -> float:
    timeout = f.duration("timeout", "10s")
    if not 0 < timeout <= 60:
        f.error("timeout", "must be more than 0s and at most 60s")
    return timeout


def _assertion_file(f: Fields, auth: str | None) -> Path | None:
    """``assertion_file``: with ``auth: client_assertion_file`` only (a projected token need not exist yet)."""
    if auth == "client_assertion_file":
        return f.path_value("assertion_file", required=True)
    if f.has("assertion_file"):
        f.raw_value("assertion_file")
        f.error("assertion_file", f"is only used with auth client_assertion_file, not {auth}")
    return None


def _client_secret(f: Fields, auth: str | None) -> Secret | None:
    if auth in SECRET_METHODS:
        return f.secret("client_secret", required=True)
    if f.has("client_secret"):
        f.raw_value("client_secret")
        if auth is not None:
            f.error("client_secret", f"is only used with auth client_secret_basic or client_secret_post, not {auth}")
    return None


def _target(f: Fields, *, required: bool) -> tuple[str | None, str | None]:
    """``resource`` (RFC 8707, an absolute URI) or ``audience``: never both."""
    resource, audience = f.text("resource"), f.text("audience")
    if resource is not None and audience is not None:
        f.error("", "needs at most one of resource: URI or audience: NAME")
    elif required and resource is None and audience is None:
        f.error("", "needs one of resource: URI or audience: NAME (the upstream the token is for)")
    if resource is not None and (not urlsplit(resource).scheme or "#" in resource):
        f.error("resource", "must be an absolute URI without a fragment (RFC 8707)")
    return resource, audience


def _scopes(f: Fields) -> tuple[str, ...]:
    scopes = f.text_list("scopes")
    if any(not _SCOPE_TOKEN.match(s) for s in scopes):
        f.error("scopes", "scope names cannot contain spaces, double quotes or backslashes")
    return scopes


# --- aws_sigv4 -----------------------------------------------------------------------

AWS_SOURCES = ("web_identity", "static")
DEFAULT_STS_AUDIENCE = "sts.amazonaws.com"
MIN_ROLE_DURATION, MAX_ROLE_DURATION = 15 * 60, 12 * 3600
_REGION = re.compile(r"[a-z0-9-]{2,32}")
_SERVICE = re.compile(r"[a-z0-9-]{2,64}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}", re.ASCII)
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)


@dataclass(frozen=True, slots=True)
class WebIdentitySource:
    role_arn: str
    sts_url: str
    ca: Path | None
    session_name: str | None  # None: derived from the agent's SPIFFE ID
    duration: int  # seconds
    token_file: Path | None  # None: a JWT signed with identity.signing_key
    audience: str


@dataclass(frozen=True, slots=True)
class StaticSource:
    access_key_id: Secret
    secret_access_key: Secret
    session_token: Secret | None


@dataclass(frozen=True, slots=True)
class AwsSigV4Spec:
    type: ClassVar[str] = "aws_sigv4"
    region: str
    service: str
    unsigned_payload: bool
    source: WebIdentitySource | StaticSource
    presigned: str = "refuse"  # refuse | resign: an agent's presigned URL (s3 services only)
    scopes: ClassVar[tuple[str, ...]] = ()  # AWS authorizes by the role's policy, not by scopes

    @property
    def needs_signing_key(self) -> bool:
        """Whether the web identity token is a JWT this sidecar signs (no token_file)."""
        return isinstance(self.source, WebIdentitySource) and self.source.token_file is None


PRESIGNED = ("refuse", "resign")


def parse_aws_sigv4(f: Fields) -> AwsSigV4Spec | None:
    region = _pattern(f, "region", _REGION, "an AWS region such as eu-west-1")
    service = _pattern(f, "service", _SERVICE, "an AWS signing name such as s3, sts or dynamodb")
    unsigned = f.flag("unsigned_payload", False)
    s3_only = f"is allowed only for s3 services ({', '.join(sorted(S3_SERVICES))})"
    if unsigned and service is not None and service not in S3_SERVICES:
        f.error("unsigned_payload", s3_only)
    presigned = f.choice("presigned", PRESIGNED, "refuse")
    if presigned == "resign" and service is not None and service not in S3_SERVICES:
        f.error("presigned", s3_only)
    source_fields = f.sub("source", required=True)
    source = _aws_source(source_fields, region) if f.raw.get("source") is not None else None
    if region is None or service is None or source is None:
        return None
    return AwsSigV4Spec(region, service, unsigned, source, presigned)


def _pattern(f: Fields, key: str, pattern: re.Pattern[str], expected: str) -> str | None:
    value = f.text(key, required=True)
    if value is not None and not pattern.fullmatch(value):
        f.error(key, f"must be {expected}")
        return None
    return value


def _aws_source(f: Fields, region: str | None) -> WebIdentitySource | StaticSource | None:
    kind = f.choice("type", AWS_SOURCES, required=True)
    source = _web_identity(f, region) if kind == "web_identity" else _static_keys(f) if kind == "static" else None
    f.done()
    return source


def _web_identity(f: Fields, region: str | None) -> WebIdentitySource | None:
    before = len(f.errors)
    role_arn = _pattern(f, "role_arn", _ROLE_ARN, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    sts_url = f.url("sts_url", https_unless_loopback=True) or _default_sts(region)
    ca = f.path_value("ca", must_exist=True)
    session_name = f.text("session_name")
    if session_name is not None and not _SESSION_NAME.fullmatch(session_name):
        f.error("session_name", "must be 2-64 characters of letters, digits and +=,.@_-")
    duration = f.duration("duration", "1h")
    if not MIN_ROLE_DURATION <= duration <= MAX_ROLE_DURATION:
        f.error("duration", "must be between 15m and 12h")
    token_file = f.path_value("token_file")
    audience = f.text("audience", DEFAULT_STS_AUDIENCE)
    if role_arn is None or sts_url is None or len(f.errors) > before:
        return None
    return WebIdentitySource(role_arn, sts_url, ca, session_name, int(duration), token_file, audience)


def _default_sts(region: str | None) -> str | None:
    if region is None:
        return None
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sts.{region}.{suffix}"


def _static_keys(f: Fields) -> StaticSource | None:
    key_id = f.secret("access_key_id", required=True)
    secret = f.secret("secret_access_key", required=True)
    token = f.secret("session_token")
    if key_id is None or secret is None:
        return None
    return StaticSource(key_id, secret, token)


# --- http_signature ------------------------------------------------------------------

DEFAULT_LABEL = "sig1"
# Written by the sidecar or by the connection, never signed from the agent's copy.
NOT_COVERABLE = frozenset({"signature", "signature-input", "connection", "keep-alive", "proxy-connection", "te",
                           "trailer", "transfer-encoding", "upgrade"})
_LABEL = re.compile(r"[a-z*][a-z0-9_.*-]{0,63}")


@dataclass(frozen=True, slots=True)
class HttpSignatureSpec:
    type: ClassVar[str] = "http_signature"
    key: Algorithm = field(repr=False)
    components: tuple[Component, ...]
    label: str = DEFAULT_LABEL
    keyid: str | None = None
    tag: str | None = None
    content_digest: str | None = None  # the digest algorithm when content-digest is covered
    created: bool = True
    expires: float | None = None  # seconds after created
    nonce: bool = False
    alg: bool = False
    scopes: ClassVar[tuple[str, ...]] = ()  # a standing credential has none
    needs_signing_key: ClassVar[bool] = False

    @property
    def reads_body(self) -> bool:
        """Whether signing needs the whole body: its digest or its length is covered."""
        return self.content_digest is not None or any(c.name == "content-length" for c in self.components)


def parse_http_signature(f: Fields) -> HttpSignatureSpec | None:
    before = len(f.errors)
    algorithm = f.choice("algorithm", ALGORITHMS, required=True)
    key = _signing_key(f, algorithm)
    components = _components(f)
    digest = f.choice("content_digest", tuple(DIGESTS), "sha-256")
    covers_digest = any(c.name == "content-digest" for c in components)
    if f.has("content_digest") and not covers_digest:
        f.error("content_digest", "is set, but components do not cover content-digest")
    keyid, tag = _sf_string(f, "keyid"), _sf_string(f, "tag")
    label = f.text("label", DEFAULT_LABEL)
    if not _LABEL.fullmatch(label):
        f.error("label", "must be a structured-field key: lowercase letters, digits, '_', '-', '.', '*'")
    expires = f.duration("expires")
    if expires is not None and expires < 1:
        f.error("expires", "must be at least 1s")
    created, nonce, alg = f.flag("created", True), f.flag("nonce", False), f.flag("alg", False)
    if key is None or len(f.errors) > before:
        return None
    return HttpSignatureSpec(key, components, label, keyid, tag, digest if covers_digest else None, created,
                             expires, nonce, alg)


def _signing_key(f: Fields, algorithm: str | None) -> Algorithm | None:
    encoding = f.choice("key_encoding", KEY_ENCODINGS, "base64")
    if f.has("key_encoding") and algorithm not in (None, "hmac-sha256"):
        f.error("key_encoding", "applies only to hmac-sha256 (other keys are PEM)")
    secret: Secret | None = f.secret("key", required=True)
    if secret is None or algorithm is None:
        return None
    try:
        return load_key(algorithm, secret, encoding)
    except ValueError as exc:
        f.error("key", str(exc))
        return None


def _components(f: Fields) -> tuple[Component, ...]:
    parsed: list[Component] = []
    for i, text in enumerate(f.text_list("components", required=True)):
        try:
            item = component(text)
        except ValueError as exc:
            f.error(f"components[{i}]", f"{exc}")
            continue
        if item.name in NOT_COVERABLE:
            f.error(f"components[{i}]", f"{item.name} cannot be covered: the sidecar or the connection writes it")
        elif item.identifier in {c.identifier for c in parsed}:
            f.error(f"components[{i}]", f"{text!r} is listed twice")
        else:
            parsed.append(item)
    return tuple(parsed)


def _sf_string(f: Fields, key: str) -> str | None:
    value = f.text(key)
    if value is not None and not is_sf_string(value):
        f.error(key, "must be printable ASCII")
        return None
    return value


# --- hmac_signing --------------------------------------------------------------------

TIMESTAMP_FORMATS = ("unix", "unix_ms", "iso8601")
SIGNATURE_ENCODINGS = ("hex", "base64")


@dataclass(frozen=True, slots=True)
class HmacSigningSpec:
    type: ClassVar[str] = "hmac_signing"
    key: bytes = field(repr=False)
    algorithm: str  # sha256 | sha512
    encoding: str  # hex | base64
    canonical: CanonicalParts
    separator: bytes
    signature: Placement
    timestamp: Placement | None = None
    timestamp_format: str = "unix"
    nonce: Placement | None = None
    key_id: Placement | None = None
    key_id_value: Secret | None = None
    scopes: ClassVar[tuple[str, ...]] = ()  # a standing credential has none
    needs_signing_key: ClassVar[bool] = False

    @property
    def placements(self) -> tuple[Placement, ...]:
        """Every header or query parameter the sidecar writes (the agent's copies are dropped)."""
        return tuple(p for p in (self.signature, self.timestamp, self.nonce, self.key_id) if p is not None)


def parse_hmac_signing(f: Fields) -> HmacSigningSpec | None:
    before = len(f.errors)
    algorithm = f.choice("algorithm", DIGEST_ALGORITHMS, required=True)
    key = _hmac_key(f, algorithm)
    encoding = f.choice("encoding", SIGNATURE_ENCODINGS, "hex")
    canonical = _canonical(f)
    separator = f.text("separator", "").encode()
    signature = _placement(f, "signature", required=True)
    timestamp, timestamp_format = _timestamp(f)
    nonce = _placement(f, "nonce")
    key_id, key_id_value = _key_id(f)
    if key is None or algorithm is None or canonical is None or signature is None or len(f.errors) > before:
        return None
    return HmacSigningSpec(key, algorithm, encoding, canonical, separator, signature, timestamp, timestamp_format,
                           nonce, key_id, key_id_value)


def _hmac_key(f: Fields, algorithm: str | None) -> bytes | None:
    encoding = f.choice("key_encoding", KEY_ENCODINGS, "utf-8")
    secret = f.secret("key", required=True)
    if secret is None:
        return None
    try:
        return shared_secret(secret.reveal(), encoding, f"hmac-{algorithm or 'sha256'}")
    except ValueError as exc:
        f.error("key", str(exc))
        return None


def _canonical(f: Fields) -> CanonicalParts | None:
    try:
        return canonical_parts(f.text_list("canonical", required=True))
    except ValueError as exc:
        f.error("canonical", str(exc))
        return None


def _placement(f: Fields, key: str, *, required: bool = False) -> Placement | None:
    """``{header: NAME}`` or ``{query: NAME}`` under ``key``."""
    if not required and not f.has(key):
        return None
    sub = f.sub(key, required=required)
    placement = header_or_query(sub) if f.raw.get(key) is not None else None
    sub.done()
    return placement


def _timestamp(f: Fields) -> tuple[Placement | None, str]:
    if not f.has("timestamp"):
        return None, "unix"
    sub = f.sub("timestamp")
    fmt = sub.choice("format", TIMESTAMP_FORMATS, "unix")
    placement = header_or_query(sub)
    sub.done()
    return placement, fmt


def _key_id(f: Fields) -> tuple[Placement | None, Secret | None]:
    if not f.has("key_id"):
        return None, None
    sub = f.sub("key_id")
    value = sub.secret("value", required=True)
    placement = header_or_query(sub)
    sub.done()
    return placement, value


# --- azure_workload_identity -----------------------------------------------------------

AZURE_AUTHORITY = "https://login.microsoftonline.com"
AZURE_TOKEN_FILE = "/var/run/secrets/azure/tokens/azure-identity-token"  # where the Azure webhook projects it
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,127}")


@dataclass(frozen=True, slots=True)
class AzureWorkloadIdentitySpec:
    """Client credentials at Entra ID with the projected token as the client assertion."""

    type: ClassVar[str] = "azure_workload_identity"
    grant: ClientCredentialsSpec
    needs_signing_key: ClassVar[bool] = False

    @property
    def scopes(self) -> tuple[str, ...]:
        return self.grant.scopes


def parse_azure_workload_identity(f: Fields) -> AzureWorkloadIdentitySpec | None:
    before = len(f.errors)
    tenant = _pattern(f, "tenant_id", _TENANT, "a tenant ID (a GUID) or a tenant domain name")
    client_id = f.text("client_id", required=True)
    authority = f.url("authority_host", https_unless_loopback=True) or AZURE_AUTHORITY
    token_file = f.path_value("token_file") or Path(AZURE_TOKEN_FILE)
    ca = f.path_value("ca", must_exist=True)
    scopes = _scopes(f)
    if not scopes:
        f.error("scopes", "is required: the resource's /.default scope")
    if any(not scope.endswith("/.default") for scope in scopes):
        f.error("scopes", "client credentials at Entra ID ask for a resource's /.default scope, "
                          "as in https://storage.azure.com/.default")
    timeout = _timeout(f)
    if tenant is None or client_id is None or len(f.errors) > before:
        return None
    token_url = f"{authority.rstrip('/')}/{tenant}/oauth2/v2.0/token"
    endpoint = Endpoint(token_url, client_id, "client_assertion_file", None, ca, None, timeout, token_file)
    return AzureWorkloadIdentitySpec(ClientCredentialsSpec(endpoint, scopes))


# --- gcp_workload_identity -------------------------------------------------------------

GCP_STS_URL = "https://sts.googleapis.com/v1/token"
GCP_IAM_URL = "https://iamcredentials.googleapis.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"  # what a federated token needs to call generateAccessToken
MAX_GCP_LIFETIME = 12 * 3600
_GCP_AUDIENCE = re.compile(r"//iam\.googleapis\.com/projects/\d+/locations/global/workloadIdentityPools/"
                           r"[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}@[a-z0-9][a-z0-9.-]{0,252}\.gserviceaccount\.com")


@dataclass(frozen=True, slots=True)
class GcpWorkloadIdentitySpec:
    """Workload identity federation: a JWT exchanged at GCP's STS, then optionally a service account's token."""

    type: ClassVar[str] = "gcp_workload_identity"
    audience: str  # the workload identity pool provider's full resource name
    token_file: Path | None  # None: a JWT signed with identity.signing_key, aud = audience
    service_account: str | None
    scopes: tuple[str, ...]
    sts_url: str
    iam_url: str
    lifetime: int  # seconds: generateAccessToken's lifetime
    ca: Path | None
    timeout: float

    @property
    def needs_signing_key(self) -> bool:
        return self.token_file is None


def parse_gcp_workload_identity(f: Fields) -> GcpWorkloadIdentitySpec | None:
    before = len(f.errors)
    audience = _pattern(f, "audience", _GCP_AUDIENCE, "a workload identity pool provider: //iam.googleapis.com/"
                        "projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>")
    token_file = f.path_value("token_file")
    service_account = f.text("service_account")
    if service_account is not None and not _SERVICE_ACCOUNT.fullmatch(service_account):
        f.error("service_account", "must be a service account email, as in agent@project.iam.gserviceaccount.com")
    scopes = _scopes(f) or (CLOUD_PLATFORM,)
    sts_url = f.url("sts_url", https_unless_loopback=True) or GCP_STS_URL
    iam_url = f.url("iam_url", https_unless_loopback=True) or GCP_IAM_URL
    lifetime = f.duration("lifetime", "1h")
    if not 60 <= lifetime <= MAX_GCP_LIFETIME:
        f.error("lifetime", "must be between 1m and 12h")
    ca = f.path_value("ca", must_exist=True)
    timeout = _timeout(f)
    if audience is None or len(f.errors) > before:
        return None
    return GcpWorkloadIdentitySpec(audience, token_file, service_account, scopes, sts_url, iam_url.rstrip("/"),
                                   int(lifetime), ca, timeout)
