"""The one table of credential provider types (STYLE.md example 2).

A :class:`ProviderType` is what one ``type:`` under ``credentials:`` means: how its spec is read
from config and how its provider is built from that spec. ``sidecar.config`` parses with it,
``sidecar.app`` builds with it, ``sidecar.config_schema`` derives each type's schema from its
``parse``. An unknown ``type:`` in the config names the valid ones.

Parsing imports only ``sidecar.credentials.specs``. Each builder imports its provider module
when a provider of that type is first built: providers send requests (aiohttp, the upstream
writer) and validating a config must not load them. The two that send nothing (``static``,
``jwt_assertion``) are built the same way, so that no provider's imports can reach back into
``sidecar.config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from sidecar.credentials.base import CredentialProvider, ProviderDeps
from sidecar.credentials.specs import (
    AwsSigV4Spec, AzureWorkloadIdentitySpec, ClientCredentialsSpec, CredentialSpec, GcpWorkloadIdentitySpec,
    HmacSigningSpec, HttpSignatureSpec, JwtAssertionSpec, StaticSpec, TokenExchangeSpec, parse_aws_sigv4,
    parse_azure_workload_identity, parse_client_credentials, parse_gcp_workload_identity, parse_hmac_signing,
    parse_http_signature, parse_jwt_assertion, parse_static, parse_token_exchange,
)
from sidecar.fields import Fields

S = TypeVar("S", bound=CredentialSpec)


@dataclass(frozen=True, slots=True)
class ProviderType(Generic[S]):
    """One credential type: its name, its spec parser and its provider's builder."""

    type: str
    parse: Callable[[Fields], S | None]  # records every problem in the Fields; None when there was one
    build: Callable[[str, S, ProviderDeps], CredentialProvider]  # (name, spec, deps)


def _aws_sigv4(name: str, spec: AwsSigV4Spec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.aws import AwsSigV4Provider
    return AwsSigV4Provider(name, spec, deps)


def _http_signature(name: str, spec: HttpSignatureSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.http_signature import HttpSignatureProvider
    return HttpSignatureProvider(name, spec, deps)


def _azure_workload_identity(name: str, spec: AzureWorkloadIdentitySpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.azure import AzureWorkloadIdentityProvider
    return AzureWorkloadIdentityProvider(name, spec, deps)


def _gcp_workload_identity(name: str, spec: GcpWorkloadIdentitySpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.gcp import GcpWorkloadIdentityProvider
    return GcpWorkloadIdentityProvider(name, spec, deps)


def _hmac_signing(name: str, spec: HmacSigningSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.hmac_signing import HmacSigningProvider
    return HmacSigningProvider(name, spec, deps)


def _jwt_assertion(name: str, spec: JwtAssertionSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.jwt_assertion import JwtAssertionProvider
    return JwtAssertionProvider(name, spec, deps)


def _client_credentials(name: str, spec: ClientCredentialsSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.oauth2 import ClientCredentialsProvider
    return ClientCredentialsProvider(name, spec, deps)


def _token_exchange(name: str, spec: TokenExchangeSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.token_exchange import TokenExchangeProvider
    return TokenExchangeProvider(name, spec, deps)


def _static(name: str, spec: StaticSpec, deps: ProviderDeps) -> CredentialProvider:
    from sidecar.credentials.static import StaticProvider
    return StaticProvider(name, spec, deps)


def _table(*types: ProviderType[Any]) -> Mapping[str, ProviderType[Any]]:
    return {t.type: t for t in types}


PROVIDER_TYPES: Mapping[str, ProviderType[Any]] = _table(
    ProviderType(AwsSigV4Spec.type, parse_aws_sigv4, _aws_sigv4),
    ProviderType(AzureWorkloadIdentitySpec.type, parse_azure_workload_identity, _azure_workload_identity),
    ProviderType(GcpWorkloadIdentitySpec.type, parse_gcp_workload_identity, _gcp_workload_identity),
    ProviderType(HttpSignatureSpec.type, parse_http_signature, _http_signature),
    ProviderType(HmacSigningSpec.type, parse_hmac_signing, _hmac_signing),
    ProviderType(JwtAssertionSpec.type, parse_jwt_assertion, _jwt_assertion),
    ProviderType(ClientCredentialsSpec.type, parse_client_credentials, _client_credentials),
    ProviderType(TokenExchangeSpec.type, parse_token_exchange, _token_exchange),
    ProviderType(StaticSpec.type, parse_static, _static),
)
