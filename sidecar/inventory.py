"""``GET /inventory``: what this sidecar holds right now, and its fleet record (never a secret value)."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from sidecar import __version__

if TYPE_CHECKING:
    from sidecar.identity.source import SvidState
    from sidecar.runtime import Runtime


def iso_utc(ts: float | None) -> str | None:
    """A Unix time as RFC 3339 UTC to the second (``2026-01-31T12:00:00Z``)."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def inventory(rt: Runtime, state: SvidState, fleet: dict[str, Any]) -> dict[str, Any]:
    """The runtime's agent, identity, credentials, tasks and policy version, for ``GET /inventory``;
    ``fleet`` says whether this sidecar is registered in the fleet inventory (and why not)."""
    credentials = [{
        "provider": c.provider, "type": c.type, "id": c.id, "scopes": list(c.scopes), "audience": c.audience,
        "expires_at": iso_utc(c.expires_at), "standing": c.standing, "task": r.task.id if r.task else None,
        "upstream": r.upstream,
    } for c, r in rt.credentials.held()]
    configured = [{"provider": name, "type": p.type, "standing": p.standing} for name, p in rt.providers.items()]
    tasks = [{"id": t.id, "principal": list(t.principal) if t.principal else None, "delegation": t.delegation,
              "trigger": t.trigger, "expires_at": iso_utc(t.expires_at)} for t in rt.tasks.open_tasks()]
    return {
        "agent": rt.agent.as_dict(),
        "identities": [{"spiffe_id": str(state.spiffe_id), "cert_sha256": state.cert_sha256,
                        "expires_at": iso_utc(state.not_after), "trust_domains": sorted(state.bundles.domains)}],
        "signing_key": {"kid": rt.signer.key.kid, "alg": rt.signer.key.algorithm} if rt.signer else None,
        "credentials_held": credentials,
        "credentials_configured": configured,
        "tasks": tasks,
        "policy_version": rt.policy.version,
        "fleet": fleet,
    }


def fleet_record(rt: Runtime, started_at: float) -> dict[str, Any]:
    """This sidecar as the fleet inventory lists it: built from names, types and versions only, so no
    secret can be in it (an upstream is its name and origin, never its URL's path or userinfo)."""
    upstreams = [{"name": u.name, "scheme": u.scheme, "host": u.host, "port": u.port, "protocol": u.protocol,
                  "credential": u.credential} for u in rt.config.outbound.upstreams.values()]
    return {
        "agent": rt.agent.as_dict(),
        "upstreams": upstreams,
        "credentials": [{"name": name, "type": p.type, "standing": p.standing} for name, p in rt.providers.items()],
        "version": __version__,
        "policy_version": rt.policy.version,
        "host": socket.gethostname(),
        "started_at": started_at,
    }
