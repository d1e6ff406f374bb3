"""``oauth2_client_credentials`` (RFC 6749 §4.4): a token for this agent as a client, per scope set.

The grant is one form (``grant_type=client_credentials``, the ``resource`` or ``audience``, the
scopes); the token endpoint client (``sidecar.credentials.token_endpoint``) authenticates, sends
it and reads the answer. Cached per scope set and, with ``tls_client_auth``, per certificate.
"""

from __future__ import annotations

from typing import ClassVar, Hashable

from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps
from sidecar.credentials.specs import ClientCredentialsSpec
from sidecar.credentials.token_endpoint import TokenEndpoint, apply_bearer, target_form


class ClientCredentialsProvider:
    type: ClassVar[str] = ClientCredentialsSpec.type
    needs_body: ClassVar[bool] = False
    standing: ClassVar[bool] = False
    task_bound: ClassVar[bool] = False

    def __init__(self, name: str, spec: ClientCredentialsSpec, deps: ProviderDeps) -> None:
        self.name = name
        self.spec = spec
        self.endpoint = TokenEndpoint(name, spec.endpoint, deps)

    def cache_key(self, req: CredentialRequest) -> Hashable:
        return req.scopes or self.spec.scopes, self.endpoint.cert_thumbprint(), req.resource

    async def fetch(self, req: CredentialRequest) -> Credential:
        scopes = req.scopes or self.spec.scopes
        resource = req.resource or self.spec.resource
        audience = None if req.resource else self.spec.audience
        form = {"grant_type": "client_credentials", **target_form(resource, audience, scopes)}
        resp = await self.endpoint.request(form)
        return self.endpoint.credential(self.type, resp, scopes=scopes, audience=resource or audience)

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        apply_bearer(self.name, out, credential)

    async def aclose(self) -> None:
        await self.endpoint.aclose()
