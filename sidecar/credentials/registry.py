"""The one table of credential provider types (STYLE.md example 2).

Each entry is a module exposing ``TYPE``, ``Spec``, ``parse(name, fields) -> Spec | None``
and ``PROVIDER`` (the class built from ``(name, spec, deps)``). An unknown ``type:`` in the
config names the valid ones.
"""

from __future__ import annotations

from types import ModuleType

from sidecar.credentials import aws, http_signature, jwt_assertion, oauth2, static, token_exchange

PROVIDERS: dict[str, ModuleType] = {
    aws.TYPE: aws,
    http_signature.TYPE: http_signature,
    jwt_assertion.TYPE: jwt_assertion,
    oauth2.TYPE: oauth2,
    static.TYPE: static,
    token_exchange.TYPE: token_exchange,
}
