"""``oauth2_token_exchange``: RFC 8693, a token that names the human and this agent.

The subject token is the task's verified human token (``subject_token_type`` access_token).
The actor token is a JWT this sidecar signs with ``identity.signing_key`` when the token is
fetched: ``iss`` = the signer's issuer, ``sub`` = the agent's SPIFFE ID, ``aud`` = the
authorization server's ``issuer`` (else ``token_url``), 60 s. The server puts the actor into the
issued token's ``act`` claim; a JWT result whose ``act.sub`` is not this agent is refused.

Results are bound to the task: cached under its id and dropped when it ends. A task without a
verified human token (none, or delegation ``asserted``) never drives an exchange.

``impersonate: true`` exchanges without an actor token (the result names only the human), and
only for requests whose rule says ``when: {delegation: impersonation_allowed}``; otherwise the
request is refused. By default every exchange is a delegation.

Config keys: ``token_url``, ``issuer``, ``ca``, ``client_id``, ``auth``, ``client_secret``,
``timeout`` (as ``oauth2_client_credentials``), ``resource`` or ``audience`` (one is required),
``scopes``, ``impersonate``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Hashable, Mapping

from sidecar.credentials.base import Credential, CredentialRequest, OutboundRequest, ProviderDeps, TaskRef
from sidecar.credentials.specs import TokenExchangeSpec
from sidecar.credentials.token_endpoint import TokenEndpoint, TokenResponse, apply_bearer, target_form
from sidecar.errors import CredentialUnavailable

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
ACTOR_TTL = 60
MAX_ACT_DEPTH = 16
NEEDS_TASK = "credentials: token exchange needs a task opened with a verified human token"


def act_chain(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The actors named by nested ``act`` claims, outermost (the current actor) first."""
    chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, Mapping) and isinstance(act.get("sub"), str) and len(chain) < MAX_ACT_DEPTH:
        chain.append(act["sub"])
        act = act.get("act")
    return tuple(chain)


def _verified_task(req: CredentialRequest) -> TaskRef:
    task = req.task
    if task is None:
        raise CredentialUnavailable(NEEDS_TASK, detail="the request names no task")
    if task.subject_token is None or task.delegation != "delegated":
        raise CredentialUnavailable(NEEDS_TASK, detail=f"the task's delegation is {task.delegation}")
    return task


class TokenExchangeProvider:
    type: ClassVar[str] = TokenExchangeSpec.type
    needs_body: ClassVar[bool] = False
    standing: ClassVar[bool] = False
    task_bound: ClassVar[bool] = True

    def __init__(self, name: str, spec: TokenExchangeSpec, deps: ProviderDeps) -> None:
        self.name = name
        self.spec = spec
        self._agent_id = deps.agent_id
        self.endpoint = TokenEndpoint(name, spec.endpoint, deps)

    def cache_key(self, req: CredentialRequest) -> Hashable:
        """Per task, scopes and certificate; and whether this request may impersonate, so that a
        request whose rule does not allow it never reaches an impersonation token from the cache."""
        task_id = req.task.id if req.task is not None else None
        return (task_id, req.scopes or self.spec.scopes, self.endpoint.cert_thumbprint(), req.impersonation_allowed,
                req.resource)

    async def fetch(self, req: CredentialRequest) -> Credential:
        task = _verified_task(req)
        if self.spec.impersonate and not req.impersonation_allowed:
            raise CredentialUnavailable(
                f"credentials: {self.name} impersonates the user, which needs a rule with "
                "when: {delegation: impersonation_allowed}")
        scopes = req.scopes or self.spec.scopes
        resource = req.resource or self.spec.resource
        audience = None if req.resource else self.spec.audience
        resp = await self.endpoint.request(self._form(task, scopes, resource, audience))
        return self._credential(resp, scopes, resource or audience)

    def _form(self, task: TaskRef, scopes: tuple[str, ...], resource: str | None,
              audience: str | None) -> dict[str, str]:
        assert task.subject_token is not None
        form = {"grant_type": GRANT_TYPE, "subject_token": task.subject_token.reveal(),
                "subject_token_type": TT_ACCESS_TOKEN, "requested_token_type": TT_ACCESS_TOKEN,
                **target_form(resource, audience, scopes)}
        if not self.spec.impersonate:
            form["actor_token"] = self.actor_token()
            form["actor_token_type"] = TT_JWT
        return form

    def actor_token(self) -> str:
        """A JWT naming this agent as the actor, for this authorization server only."""
        return self.endpoint.sign({"sub": self._agent_id, "aud": self.spec.endpoint.assertion_audience},
                                  ttl=ACTOR_TTL)

    def _credential(self, resp: TokenResponse, scopes: tuple[str, ...], target: str | None = None) -> Credential:
        if resp.issued_token_type not in (None, TT_ACCESS_TOKEN, TT_JWT):
            raise CredentialUnavailable(f"credentials: {self.name}: token endpoint issued a token that is not an "
                                        "access token", detail="token endpoint: issued_token_type")
        delegation = "impersonated" if self.spec.impersonate else "delegated"
        if resp.claims is not None:
            chain = act_chain(resp.claims)
        else:  # an opaque token: what we asked for is all we can know
            chain = (self._agent_id,) if delegation == "delegated" else ()
        if delegation == "delegated" and chain[:1] != (self._agent_id,):
            raise CredentialUnavailable(f"credentials: {self.name}: the exchanged token does not name this agent "
                                        "as its actor", detail="token endpoint: act.sub missing or different")
        credential = self.endpoint.credential(self.type, resp, scopes=scopes,
                                              audience=target or self.spec.resource or self.spec.audience)
        return replace(credential, delegation=delegation, act_chain=chain)

    def apply(self, out: OutboundRequest, credential: Credential) -> None:
        apply_bearer(self.name, out, credential)

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    def __repr__(self) -> str:
        return f"TokenExchangeProvider({self.name!r}, auth={self.spec.endpoint.auth!r})"
