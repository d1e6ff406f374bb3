"""The client of an OAuth 2.0 token endpoint, shared by ``oauth2_client_credentials`` and
``oauth2_token_exchange``: the token request, client authentication, its TLS, errors, and the
token response. The grants themselves (which form to send, what the result must say) are in
``sidecar.credentials.oauth2`` and ``sidecar.credentials.token_exchange``.

Client authentication (``auth``):

- ``client_secret_basic`` (RFC 6749 §2.3.1: id and secret form-urlencoded, then Basic), ``client_secret_post``;
- ``private_key_jwt``: an RFC 7523 assertion signed with ``identity.signing_key`` per token request:
  ``iss`` = ``sub`` = client_id, ``aud`` = ``issuer`` (else ``token_url``), a fresh ``jti``, 60 s;
- ``client_assertion_file``: an assertion another issuer made (a projected Kubernetes service-account
  token, for an IdP that federates it), read from ``assertion_file`` at each token request, so a
  rotated file is used from the next refresh on; sent as ``client_assertion`` (RFC 7523 jwt-bearer);
- ``tls_client_auth`` (RFC 8705): our SVID on the TLS connection. A certificate-bound token
  (``cnf.x5t#S256``) is recorded as ``Credential.bound_cert_sha256`` (hex, like
  ``SvidState.cert_sha256``) and sent only over an upstream connection presenting that certificate.

One ``aiohttp.ClientSession`` per provider, made on first use with ``ca`` (verification never off),
remade when the SVID changes. Per request nothing is fetched or signed; ``apply_bearer`` sets one header.
Errors: ``CredentialUnavailable`` with ``detail="token endpoint: <error> (http <status>)"`` plus at
most a redacted, truncated ``error_description``; never a secret, never the response body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote_plus

import aiohttp
import jwt
import structlog

from sidecar.credentials.base import Credential, OutboundRequest, ProviderDeps, keyed_id, read_token_file
from sidecar.credentials.placement import BEARER
from sidecar.credentials.specs import Endpoint
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret, format_duration
from sidecar.http.tls import client_ssl_context
from sidecar.observe.decision_log import REDACTOR

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_TTL = 60
DEFAULT_LIFETIME = 300.0  # a token response with neither expires_in nor a JWT exp
MAX_RESPONSE_BYTES = 64 * 1024
MAX_DESCRIPTION = 120
NO_CLIENT_AUTH = "none"  # an endpoint that authenticates no client (GCP's STS): never a config value
_SENSITIVE_FORM = ("client_secret", "client_assertion", "subject_token", "actor_token")
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

log = structlog.get_logger("sidecar.credentials")


def target_form(resource: str | None, audience: str | None, scopes: tuple[str, ...]) -> dict[str, str]:
    form = {"resource": resource} if resource else {"audience": audience} if audience else {}
    if scopes:
        form["scope"] = " ".join(scopes)
    return form


def basic_authorization(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: form-urlencode both values, then base64 ``id:secret``."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token response. ``claims`` are the access token's, read without verifying:
    it came from the issuer itself over verified TLS, and is only described, never trusted."""

    access_token: Secret
    expires_in: float | None
    scope: tuple[str, ...] | None  # as granted: the response's scope, else the JWT's; None: as requested
    claims: Mapping[str, Any] | None
    cnf_sha256: str | None  # hex SHA-256 of the certificate the token is bound to
    issued_token_type: str | None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def jwt_claims(token: str) -> dict[str, Any] | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False}) if token.count(".") == 2 else None
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def x5t_to_hex(value: Any) -> str | None:
    """RFC 8705 ``x5t#S256`` (base64url SHA-256) -> lowercase hex; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        return None
    return digest.hex() if len(digest) == 32 else None


def parse_token_response(name: str, body: bytes) -> TokenResponse:
    data = _json_object(body) or {}
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise CredentialUnavailable(f"credentials: {name}: token endpoint answered without an access_token",
                                    detail="token endpoint: malformed token response")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = token_type if isinstance(token_type, str) and _ERROR_CODE.match(token_type) else "unknown"
        raise CredentialUnavailable(f"credentials: {name}: token endpoint issued a {shown} token; "
                                    "only bearer tokens are supported", detail="token endpoint: token_type")
    claims = jwt_claims(token)
    bound = (claims or {}).get("cnf") or data.get("cnf")
    cnf = x5t_to_hex(bound.get("x5t#S256")) if isinstance(bound, Mapping) else None
    if isinstance(bound, Mapping) and "x5t#S256" in bound and cnf is None:
        raise CredentialUnavailable(f"credentials: {name}: token endpoint issued a certificate-bound token "
                                    "with an unreadable cnf.x5t#S256", detail="token endpoint: cnf")
    expires_in = data.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else None
    scope = data.get("scope", (claims or {}).get("scope", "") if claims is not None else None)
    granted = tuple(scope.split()) if isinstance(scope, str) else None  # None: as requested (RFC 6749 §5.1)
    issued = data.get("issued_token_type")
    return TokenResponse(Secret(token, "token endpoint"), lifetime, granted, claims, cnf,
                         issued if isinstance(issued, str) else None)


def error_detail(status: int, body: bytes, sensitive: tuple[str, ...]) -> tuple[str, str | None]:
    """(detail, error code): the RFC 6749 §5.2 code and a cleaned description; never the body."""
    data = _json_object(body) or {}
    code = data.get("error")
    if not isinstance(code, str) or not _ERROR_CODE.match(code):
        return f"token endpoint: http {status}", None
    detail = f"token endpoint: {code} (http {status})"
    description = data.get("error_description")
    if isinstance(description, str) and description:
        detail += ": " + _clean(description, sensitive)
    return detail, code


def _clean(text: str, sensitive: tuple[str, ...]) -> str:
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    for value in filter(None, sensitive):
        text = text.replace(value, "<redacted>")
    text = REDACTOR.text(text)
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


class TokenEndpoint:
    """One provider's client of one token endpoint: a session, client authentication, errors."""

    def __init__(self, name: str, endpoint: Endpoint, deps: ProviderDeps) -> None:
        self.name = name
        self.endpoint = endpoint
        self._deps = deps
        self._clock = deps.clock or time.time
        self._session: aiohttp.ClientSession | None = None
        self._session_cert: str | None = None
        self._retired: list[aiohttp.ClientSession] = []

    def cert_thumbprint(self) -> str | None:
        """Hex SHA-256 of the SVID a token request presents (tls_client_auth only)."""
        if self.endpoint.auth != "tls_client_auth" or self._deps.svid is None:
            return None
        return str(self._deps.svid.state.cert_sha256)

    def sign(self, claims: dict[str, Any], ttl: int = ASSERTION_TTL) -> str:
        if self._deps.signer is None:
            raise CredentialUnavailable(f"credentials: {self.name}: no signing key (identity.signing_key)")
        return str(self._deps.signer.sign(claims, ttl=ttl)[0])

    def client_assertion(self) -> str:
        """A fresh RFC 7523 client assertion (signed per token request, never per upstream request)."""
        cid = self.endpoint.client_id
        return self.sign({"iss": cid, "sub": cid, "aud": self.endpoint.assertion_audience})

    async def _authenticate(self, form: dict[str, str], headers: dict[str, str]) -> None:
        ep = self.endpoint
        if ep.auth == "client_secret_basic":
            assert ep.client_secret is not None
            headers["Authorization"] = basic_authorization(ep.client_id, ep.client_secret.reveal())
            return
        if ep.auth == NO_CLIENT_AUTH:
            return
        form["client_id"] = ep.client_id
        if ep.auth == "client_secret_post":
            assert ep.client_secret is not None
            form["client_secret"] = ep.client_secret.reveal()
        elif ep.auth == "private_key_jwt":
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = self.client_assertion()
        elif ep.auth == "client_assertion_file":  # an assertion another issuer made (a projected token)
            assert ep.assertion_file is not None
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = await asyncio.to_thread(read_token_file, self.name, ep.assertion_file,
                                                               "client assertion file")

    async def request(self, form: dict[str, str]) -> TokenResponse:
        """POST a token request; a TokenResponse, or CredentialUnavailable saying why not."""
        form, headers = dict(form), {"Accept": "application/json"}
        await self._authenticate(form, headers)
        status, body = await self._post(form, headers)
        if status != 200:
            secret = self.endpoint.client_secret  # in the form, or (client_secret_basic) in a header
            sensitive = (*(form[k] for k in _SENSITIVE_FORM if k in form), secret.reveal() if secret else "")
            detail, code = error_detail(status, body, sensitive)
            log.warning("token_request_refused", provider=self.name, status=status, error=code)
            raise CredentialUnavailable(f"credentials: {self.name}: token endpoint refused the request",
                                        detail=detail)
        return parse_token_response(self.name, body)

    async def _post(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        return await self.post(self.endpoint.token_url, headers, data=form)

    async def post(self, url: str, headers: Mapping[str, str], **body: Any) -> tuple[int, bytes]:
        """POST ``data=`` (a form) or ``json=`` to ``url`` over this endpoint's session (its CA, its
        timeout): (status, body), or CredentialUnavailable saying why there was no answer."""
        session = await self._http()
        try:
            async with session.post(url, headers=headers, allow_redirects=False, **body) as resp:
                return resp.status, await _read_limited(resp)
        except asyncio.TimeoutError:
            why, detail = "timed out", f"timeout after {format_duration(self.endpoint.timeout)}"
        except aiohttp.ClientConnectorCertificateError:
            why, detail = "unreachable", "tls certificate verification failed"
        except (aiohttp.ClientError, OSError) as exc:
            why, detail = "unreachable", type(exc).__name__
        log.warning("token_request_failed", provider=self.name, error=detail)
        raise CredentialUnavailable(f"credentials: {self.name}: token endpoint {why}", detail=f"token endpoint: {detail}")

    def _current(self, cert: str | None) -> aiohttp.ClientSession | None:
        session = self._session
        return session if session is not None and not session.closed and cert == self._session_cert else None

    async def _http(self) -> aiohttp.ClientSession:
        """The session for the current SVID. Its TLS context is built in a worker thread: with the
        system trust store that takes ~120 ms, which on the loop would stall every exchange."""
        cert = self.cert_thumbprint()
        if (session := self._current(cert)) is not None:
            return session
        context = await asyncio.to_thread(client_ssl_context, *self._context_files())
        if (session := self._current(cert)) is not None:  # a concurrent request built it meanwhile
            return session
        self._retire()
        connector = aiohttp.TCPConnector(ssl=context, limit=8, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout))
        self._session_cert = cert
        return self._session

    def _context_files(self) -> tuple[str | None, str | None, str | None]:
        """The CA file and (``tls_client_auth``) the SVID's certificate and key files."""
        cert_key: tuple[str | None, str | None] = (None, None)
        if self.endpoint.auth == "tls_client_auth":
            if self._deps.svid is None:
                raise CredentialUnavailable(f"credentials: {self.name}: tls_client_auth needs this sidecar's SVID")
            cert_key = self._deps.svid.client_files()
        return (str(self.endpoint.ca) if self.endpoint.ca else None, *cert_key)

    def _retire(self) -> None:
        """The SVID rotated: requests in flight on the old session finish, then it closes."""
        old = self._session
        if old is None:
            return
        self._retired = [s for s in self._retired if not s.closed] + [old]  # bounded across rotations
        asyncio.get_running_loop().call_later(self.endpoint.timeout + 1, lambda: asyncio.ensure_future(old.close()))

    def credential(self, type_: str, resp: TokenResponse, *, scopes: tuple[str, ...],
                   audience: str | None) -> Credential:
        now = self._clock()
        claims = resp.claims or {}
        exp = claims.get("exp")
        lifetime = resp.expires_in or (exp - now if isinstance(exp, (int, float)) and exp > now else DEFAULT_LIFETIME)
        jti = claims.get("jti")
        token = resp.access_token.reveal()
        return Credential(type=type_, provider=self.name,
                          id=jti if isinstance(jti, str) and jti else keyed_id(self._deps.id_key, token),
                          scopes=resp.scope if resp.scope is not None else scopes, audience=audience,
                          expires_at=now + lifetime, issued_at=now, bound_cert_sha256=resp.cnf_sha256,
                          token=resp.access_token, material=BEARER.format(token))

    async def aclose(self) -> None:
        for session in (*self._retired, self._session):
            if session is not None and not session.closed:
                await session.close()
        self._retired.clear()
        self._session = None


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(16384):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise aiohttp.ClientPayloadError("token response too large")
        chunks.append(chunk)
    return b"".join(chunks)


def apply_bearer(name: str, out: OutboundRequest, credential: Credential) -> None:
    """``Authorization: Bearer``; a certificate-bound token only over a connection presenting it."""
    bound = credential.bound_cert_sha256
    if bound is not None and out.client_cert_sha256 != bound:
        presents = out.client_cert_sha256[:16] if out.client_cert_sha256 else "no certificate"
        raise CredentialUnavailable(
            f"credentials: {name}: the token is bound to this sidecar's certificate and the upstream "
            "connection does not present it (set client_cert: svid on the upstream)",
            detail=f"bound to certificate {bound[:16]}, connection presents {presents}")
    BEARER.apply(out, credential.material)
