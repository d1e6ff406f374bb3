"""``gcp_workload_identity``: a Google access token by workload identity federation.

    credentials:
      gcs:
        type: gcp_workload_identity
        audience: //iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/agents/providers/k8s-prod
        token_file: /var/run/secrets/tokens/gcp   # a projected token; omitted: a JWT this sidecar signs
        service_account: agent@project.iam.gserviceaccount.com   # optional: impersonate it
        scopes: [https://www.googleapis.com/auth/cloud-platform]  # the default
        lifetime: 1h                             # the service account token's (generateAccessToken)

The subject token (the projected file, re-read at each fetch, or a JWT signed with
``identity.signing_key``: ``sub`` the agent's SPIFFE ID, ``aud`` the audience, 5 minutes) is
exchanged at GCP's STS (RFC 8693: ``subject_token_type`` jwt, ``requested_token_type``
access_token, the pool provider as ``audience``, no client authentication). With a
``service_account`` the STS token asks for the ``iam`` scope (as google-auth does: it is only
used to call IAM Credentials) and is then traded at
``iamcredentials.googleapis.com`` (``projects/-/serviceAccounts/<email>:generateAccessToken``,
JSON ``{scope, lifetime}``) for the service account's token with the requested scopes. Requests
equal google-auth's external-account credentials' field for field (the tests compare them).
Cached per scope set and refreshed before expiry like every token; once the cached one expires
during an outage, ``credential_unavailable``.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any, ClassVar, Hashable

from sidecar.credentials.base import (
    Credential, CredentialRequest, OutboundRequest, ProviderDeps, keyed_id, read_token_file,
)
from sidecar.credentials.placement import BEARER
from sidecar.credentials.specs import IAM_SCOPE, Endpoint, GcpWorkloadIdentitySpec
from sidecar.credentials.token_endpoint import NO_CLIENT_AUTH, TokenEndpoint, apply_bearer
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TTL = 300


class GcpWorkloadIdentityProvider:
    type: ClassVar[str] = GcpWorkloadIdentitySpec.type
    needs_body: ClassVar[bool] = False
    standing: ClassVar[bool] = False
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: GcpWorkloadIdentitySpec, deps: ProviderDeps) -> None:
        self.name = name
        self.spec = spec
        self._deps = deps
        self._clock = deps.clock or time.time
        self.endpoint = TokenEndpoint(name, Endpoint(spec.sts_url, "", NO_CLIENT_AUTH, ca=spec.ca,
                                                     timeout=spec.timeout), deps)

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return req.scopes or self.spec.scopes

    async def fetch(self, req: CredentialRequest) -> Credential:
        scopes = req.scopes or self.spec.scopes
        impersonating = self.spec.service_account is not None
        subject_token = await self._subject_token()
        resp = await self.endpoint.request(self.sts_form((IAM_SCOPE,) if impersonating else scopes, subject_token))
        if not impersonating:
            return self.endpoint.credential(self.type, resp, scopes=scopes, audience=self.spec.audience)
        return await self._service_account_token(resp.access_token.reveal(), scopes)

    def sts_form(self, scopes: tuple[str, ...], subject_token: str) -> dict[str, str]:
        """The RFC 8693 exchange as GCP's STS documents it: no client, the pool provider as audience."""
        return {"grant_type": GRANT_TYPE, "audience": self.spec.audience, "scope": " ".join(scopes),
                "requested_token_type": TT_ACCESS_TOKEN, "subject_token": subject_token,
                "subject_token_type": TT_JWT}

    async def _subject_token(self) -> str:
        if self.spec.token_file is not None:  # a projected volume: read in a worker thread, never on the loop
            return await asyncio.to_thread(read_token_file, self.name, self.spec.token_file, "token_file")
        return self.endpoint.sign({"sub": self._deps.agent_id, "aud": self.spec.audience}, ttl=SUBJECT_TOKEN_TTL)

    async def _service_account_token(self, federated: str, scopes: tuple[str, ...]) -> Credential:
        url = f"{self.spec.iam_url}/v1/projects/-/serviceAccounts/{self.spec.service_account}:generateAccessToken"
        payload = {"scope": list(scopes), "lifetime": f"{self.spec.lifetime}s"}
        status, body = await self.endpoint.post(url, {"Authorization": f"Bearer {federated}"}, json=payload)
        token, expires_at = self._generated(status, body)
        return Credential(type=self.type, provider=self.name, id=keyed_id(self._deps.id_key, token), scopes=scopes,
                          audience=self.spec.service_account, expires_at=expires_at, issued_at=self._clock(),
                          token=Secret(token, "iamcredentials"), material=BEARER.format(token))

    def _generated(self, status: int, body: bytes) -> tuple[str, float]:
        """``{accessToken, expireTime}``; else CredentialUnavailable with Google's status name, never the body."""
        data = _json(body)
        token, expire = data.get("accessToken"), data.get("expireTime")
        if status == 200 and isinstance(token, str) and token and isinstance(expire, str):
            try:
                return token, datetime.fromisoformat(expire.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
        error = data.get("error")
        name = error.get("status") if isinstance(error, dict) else None
        detail = f"iamcredentials: {name if isinstance(name, str) and name.isalnum() else 'error'} (http {status})"
        raise CredentialUnavailable(f"credentials: {self.name}: generateAccessToken for "
                                    f"{self.spec.service_account} failed", detail=detail)

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        apply_bearer(self.name, out, credential)

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    def __repr__(self) -> str:
        return f"GcpWorkloadIdentityProvider({self.name!r}, service_account={self.spec.service_account!r})"


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
