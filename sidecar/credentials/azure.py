"""``azure_workload_identity``: an Entra ID access token for a workload-identity app registration.

    credentials:
      azure-storage:
        type: azure_workload_identity
        tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
        client_id: 8a2c1f0e-...                  # the app (or user-assigned identity) it federates with
        token_file: /var/run/secrets/azure/tokens/azure-identity-token   # the default: the webhook's path
        authority_host: https://login.microsoftonline.com                # the default
        scopes: [https://storage.azure.com/.default]

It is ``oauth2_client_credentials`` at ``<authority_host>/<tenant_id>/oauth2/v2.0/token`` with
``auth: client_assertion_file``: the projected service-account token, re-read at each token
request, is the ``client_assertion`` (jwt-bearer), and the scope is the resource's ``/.default``.
What azure-identity's ``WorkloadIdentityCredential`` sends, field for field (the tests compare
them). Cached per scope set and refreshed before expiry like every token.
"""

from __future__ import annotations

from typing import ClassVar

from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.oauth2 import ClientCredentialsProvider
from sidecar.credentials.specs import AzureWorkloadIdentitySpec


class AzureWorkloadIdentityProvider(ClientCredentialsProvider):
    type: ClassVar[str] = AzureWorkloadIdentitySpec.type

    def __init__(self, name: str, spec: AzureWorkloadIdentitySpec, deps: ProviderDeps) -> None:
        super().__init__(name, spec.grant, deps)

    def __repr__(self) -> str:
        return f"AzureWorkloadIdentityProvider({self.name!r}, token_url={self.spec.endpoint.token_url!r})"
