"""The credential cache's own rules, against scripted providers (no peer): what it keeps, for whom, and when
it lets go. The cache against a real token endpoint is in ``test_cache_oidc.py``."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.credentials.base import Credential, CredentialRequest, TaskRef
from sidecar.credentials.cache import CredentialCache
from sidecar.fields import Secret
from sidecar.observe.metrics import Metrics


class SlowTaskBoundProvider:
    """A task-bound provider whose fetch waits for the test, recording what it was given."""

    type = "oauth2_token_exchange"
    needs_body = False
    standing = False
    task_bound = True

    def __init__(self) -> None:
        self.name = "on-behalf"
        self.release = asyncio.Event()
        self.fetched_with: list[str | None] = []

    def cache_key(self, req):
        return req.task.id if req.task else None, req.scopes

    async def fetch(self, req):
        await self.release.wait()
        self.fetched_with.append(req.task.subject_token.reveal() if req.task and req.task.subject_token else None)
        now = time.time()
        return Credential(type=self.type, provider=self.name, id=f"jti-{len(self.fetched_with)}",
                          expires_at=now + 600, issued_at=now)

    def apply(self, out, credential) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_credential_fetched_for_a_task_that_ended_meanwhile_is_not_kept():
    """A task-bound credential whose fetch completes after its task ended must not stay cached under that
    task (security review 1, finding F4)."""
    cache = CredentialCache(Metrics())
    provider = SlowTaskBoundProvider()
    task = TaskRef("t1", "https://idp", "alice", Secret("human-token-alice", "bearer"), "delegated")
    req = CredentialRequest(upstream="crm", scopes=("crm.read",), agent_id="spiffe://x/agent", task=task)
    pending = asyncio.ensure_future(cache.get(provider, req))
    await asyncio.sleep(0)
    cache.drop_task("t1")  # the task ends (response done, TTL, revoked) while the exchange is in flight
    provider.release.set()
    await pending
    held = [(c.id, r.task.id) for c, r in cache.held() if r.task is not None]
    await cache.aclose()
    assert held == [], f"credential kept (and refreshed with the human's token) after its task ended: {held}"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class MintingProvider:
    """A provider whose tokens live 60 s by the wall clock it is given, as a token endpoint's expires_in."""

    type = "oauth2_client_credentials"
    needs_body = False
    standing = False
    task_bound = False

    def __init__(self, wall: Clock) -> None:
        self.name, self.wall, self.minted = "tokens", wall, 0

    def cache_key(self, req):
        return req.scopes

    async def fetch(self, req):
        self.minted += 1
        now = self.wall()
        return Credential(type=self.type, provider=self.name, id=f"jti-{self.minted}", expires_at=now + 60,
                          issued_at=now)

    def apply(self, out, credential) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_cached_token_lives_its_lifetime_whatever_the_wall_clock_does(step):
    """A token's lifetime runs on the monotonic clock once cached: the wall clock stepped an hour forward does
    not drop it, one stepped an hour back does not hand it out past its expiry (issue 12: the chaos harness's
    clock faults)."""
    wall, monotonic = Clock(), Clock()
    cache = CredentialCache(Metrics(), clock=wall, monotonic=monotonic)
    provider = MintingProvider(wall)
    req = CredentialRequest(upstream="api", scopes=("read",), agent_id="spiffe://x/agent", task=None)
    minted, _ = await cache.get(provider, req)
    wall.now += step
    assert cache.cached(provider, req) == (minted, "cache")
    monotonic.now += 60.0  # its 60 s are over
    assert cache.cached(provider, req) is None
    await cache.aclose()
