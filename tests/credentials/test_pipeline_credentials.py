"""Credentials through the whole pipeline, against the real oidc-provider: what the upstream receives."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import aiohttp
import jwt
import pytest

from sidecar.identity.ca import ca_issue
from tests.harness import Upstream
from tests.harness import assert_valid
from tests.peers.oidc import BILLING, CRM

pytestmark = pytest.mark.peer("oidc-provider")


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def base_config(oidc, upstream: Upstream, tmp: Path) -> dict:
    endpoint = {"token_url": oidc.token_url, "issuer": oidc.issuer, "ca": str(oidc.ca_path)}
    return {
        "agent": {"name": "billing"},
        "identity": {"signing_key": {"file": str(oidc.actor_key.path), "kid": oidc.actor_key.kid},
                     "issuer": oidc.actor_issuers[-1]},
        "inbound": {"forward_to": "http://127.0.0.1:9", "trust_domains": ["sidecar.local"],
                    "jwt": {"issuers": [{"issuer": oidc.issuer, "jwks_uri": oidc.jwks_uri, "ca": str(oidc.ca_path),
                                         "audiences": [BILLING, CRM]}]}},
        "outbound": {"upstreams": {
            "billing": {"url": upstream.url, "credential": "billing-oauth"},
            "crm": {"url": upstream.url + "/crm", "credential": "on-behalf"},
        }},
        "credentials": {
            "billing-oauth": {"type": "oauth2_client_credentials", **endpoint, "client_id": "svc-basic",
                              "auth": "client_secret_basic",
                              "client_secret": {"value": oidc.secret("svc-basic")},
                              "scopes": ["invoices.read", "invoices.write"], "resource": BILLING},
            "on-behalf": {"type": "oauth2_token_exchange", **endpoint, "client_id": "svc-exchange",
                          "auth": "client_secret_basic", "client_secret": {"value": oidc.secret("svc-exchange")},
                          "resource": CRM, "scopes": ["crm.read"]},
        },
    }


POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "read-invoices", "direction": "outbound", "upstream": "billing", "methods": ["GET"],
     "credential": "billing-oauth", "scopes": ["invoices.read"], "effect": "allow"},
    {"id": "crm-for-the-user", "direction": "outbound", "upstream": "crm", "when": {"delegation": "required"},
     "effect": "allow"},
    {"id": "callers", "direction": "inbound", "effect": "allow"},
]}


async def test_client_credentials_token_narrowed_to_the_rules_scopes(make_sidecar, upstream, oidc_provider, tmp_path):
    """The upstream receives a JWT access token for its resource with the rule's scopes; the agent's is gone."""
    h = await make_sidecar(base_config(oidc_provider, upstream, tmp_path), POLICY)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{h.outbound}/billing/v1/invoices", headers={"Authorization": "Bearer agent"}) as r:
                assert r.status == 200
    tokens = {seen.header("Authorization") for seen in upstream.seen}
    assert len(tokens) == 1
    claims = claims_of(tokens.pop().removeprefix("Bearer "))
    assert claims["aud"] == BILLING and claims["scope"] == "invoices.read" and claims["client_id"] == "svc-basic"
    events = await h.settle()
    assert [e["credential"]["source"] for e in events] == ["minted", "cache", "cache"]
    assert events[0]["credential"]["id"] == claims["jti"] and events[0]["credential"]["scopes"] == ["invoices.read"]
    assert_valid(events)


async def inbound_task(h, oidc, agent: Upstream, tmp: Path) -> str:
    """A caller brings alice's token; the agent (our test's upstream) receives the task id instead."""
    paths = ca_issue(h.sidecar.config.state_dir, "spiffe://sidecar.local/orchestrator", tmp / "caller")
    ctx = ssl.create_default_context(cafile=str(paths["bundle"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    token = oidc.user_token("alice@example.com", resource=CRM, scope="crm.read")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{h.port('inbound')}/work", ssl=ctx,
                         headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    assert agent.seen[-1].header("Authorization") is None
    return agent.seen[-1].header("X-Sidecar-Task")


async def test_token_exchange_names_the_human_and_this_agent(make_sidecar, upstream, oidc_provider, tmp_path):
    """The agent's call for alice reaches the upstream with a token whose sub is alice and act.sub the agent."""
    agent = await Upstream().start()
    config = base_config(oidc_provider, upstream, tmp_path)
    config["tasks"] = {"end": "ttl"}  # the agent's follow-up calls come after the inbound response
    config["inbound"]["forward_to"] = agent.url
    h = await make_sidecar(config, POLICY)
    try:
        task_id = await inbound_task(h, oidc_provider, agent, tmp_path)
    finally:
        await agent.stop()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/crm/contacts", headers={"X-Sidecar-Task": task_id}) as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/crm/contacts") as r:  # no task: delegation required is not met
            assert (r.status, (await r.json())["error"]) == (403, "no_matching_rule")
    claims = claims_of(upstream.seen[-1].header("Authorization").removeprefix("Bearer "))
    agent_id = h.sidecar.runtime.agent.id
    assert claims["sub"] == "alice@example.com" and claims["act"] == {"sub": agent_id} and claims["aud"] == CRM
    events = await h.settle()
    delegated = next(e for e in events if e["target"] and e["target"]["upstream"] == "crm" and e["decision"] == "allow")
    assert delegated["delegation"] == "delegated" and delegated["principal"]["sub"] == "alice@example.com"
    assert delegated["credential"]["type"] == "oauth2_token_exchange"
    assert_valid(events)
    metrics = h.sidecar.metrics.exposition().decode()
    assert 'sidecar_delegated_requests_total{delegation="delegated"} 1.0' in metrics


async def test_an_idp_outage_with_nothing_cached_is_credential_unavailable(make_sidecar, upstream, oidc_provider,
                                                                          tmp_path):
    """With the token endpoint down and no cached token, the call is 503 credential_unavailable, nothing sent."""
    h = await make_sidecar(base_config(oidc_provider, upstream, tmp_path), POLICY)
    oidc_provider.outage(True)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/invoices") as r:
                assert (r.status, (await r.json())["error"]) == (503, "credential_unavailable")
    finally:
        oidc_provider.outage(False)
    assert upstream.seen == []
    events = await h.settle()
    assert events[-1]["reason"] == "credential_unavailable" and events[-1]["reason_detail"]
    assert_valid(events)
    assert oidc_provider.secret("svc-basic").encode() not in h.raw_log()
    assert json.dumps(events).count("Bearer") == 0


async def test_impersonation_only_where_a_rule_allows_it(make_sidecar, upstream, oidc_provider, tmp_path):
    """With impersonate: true and a rule saying impersonation_allowed, the token names only alice; counted apart."""
    agent = await Upstream().start()
    config = base_config(oidc_provider, upstream, tmp_path)
    config["tasks"] = {"end": "ttl"}
    config["inbound"]["forward_to"] = agent.url
    config["credentials"]["on-behalf"]["impersonate"] = True
    policy = {**POLICY, "rules": [
        {"id": "crm-as-the-user", "direction": "outbound", "upstream": "crm", "paths": ["/as-user/**"],
         "when": {"delegation": "impersonation_allowed"}, "effect": "allow"},
        {"id": "crm-delegated-only", "direction": "outbound", "upstream": "crm", "paths": ["/delegated/**"],
         "when": {"delegation": "required"}, "effect": "allow"},
        {"id": "callers", "direction": "inbound", "effect": "allow"}]}
    h = await make_sidecar(config, policy)
    try:
        task_id = await inbound_task(h, oidc_provider, agent, tmp_path)
    finally:
        await agent.stop()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/crm/as-user/contacts", headers={"X-Sidecar-Task": task_id}) as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/crm/delegated/contacts", headers={"X-Sidecar-Task": task_id}) as r:
            # this rule does not allow impersonation, and the credential only impersonates: refused
            assert (r.status, (await r.json())["error"]) == (503, "credential_unavailable")
    claims = claims_of(upstream.seen[-1].header("Authorization").removeprefix("Bearer "))
    assert claims["sub"] == "alice@example.com" and "act" not in claims
    events = await h.settle()
    assert_valid(events)
    impersonated = next(e for e in events if e["target"] and e["target"]["path"] == "/as-user/contacts")
    assert impersonated["delegation"] == "impersonated"
    metrics = h.sidecar.metrics.exposition().decode()
    assert 'sidecar_delegated_requests_total{delegation="impersonated"} 1.0' in metrics
