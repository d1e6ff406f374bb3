"""The OAuth 2.0 providers through CredentialCache against a real oidc-provider: one token
request for a stampede, reuse within a token's life, background refresh, outages, and no
secret or token in any log line written meanwhile.

Time: oidc-provider issues 300 s tokens, so the cache's clock is injected (real time plus an
offset the test moves). Refresh timers are armed from that clock: an offset past the refresh
point (80 % ± 5 % of 300 s) arms an immediate refresh; for the failed-refresh case the jitter
is pinned to zero so that the refresh fires two real seconds after the token is stored.
"""

from __future__ import annotations

import asyncio
import time
from io import BytesIO
from typing import Any, AsyncIterator, Iterator

import pytest
import structlog

from sidecar.credentials import cache as cache_module
from sidecar.credentials.base import ProviderDeps, TaskRef
from sidecar.credentials.cache import CredentialCache
from sidecar.errors import CredentialUnavailable
from sidecar.fields import Secret
from sidecar.identity.signing import Signer, load_signing_key
from sidecar.observe import decision_log
from sidecar.observe.metrics import Metrics
from tests.credentials.providers import WRONG_SECRET, Make, client_config, parse_spec, request
from tests.peers.oidc import ACTOR_ISSUERS, AGENT_SPIFFE_ID, BILLING, CRM, OidcProvider

pytestmark = pytest.mark.peer("oidc-provider")


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def peer(oidc_provider: OidcProvider) -> AsyncIterator[OidcProvider]:
    """The shared peer with zeroed counters; any hold or outage a test leaves is ended."""
    await asyncio.to_thread(oidc_provider.reset)
    try:
        yield oidc_provider
    finally:
        await asyncio.to_thread(oidc_provider.reset)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def cache(metrics: Metrics) -> AsyncIterator[CredentialCache]:
    c = CredentialCache(metrics)
    yield c
    await c.aclose()


@pytest.fixture
def captured_log() -> Iterator[BytesIO]:
    """Every structlog line written during the test, as the sidecar renders them."""
    old_config, old_writer = structlog.get_config(), decision_log.WRITER
    stream = BytesIO()
    decision_log.configure_logging("debug", stream=stream)
    try:
        yield stream
    finally:
        structlog.configure(**old_config)
        decision_log.WRITER = old_writer


async def token_requests(peer: OidcProvider) -> int:
    return int((await asyncio.to_thread(peer.stats))["token_requests"])


async def wait_for(peer: OidcProvider, key: str, count: int) -> None:
    for _ in range(1000):
        if (await asyncio.to_thread(peer.stats))[key] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {key} >= {count}")


def issued(metrics: Metrics, outcome: str) -> float:
    labels = {"provider": "test", "type": "oauth2_client_credentials", "outcome": outcome}
    return metrics.registry.get_sample_value("sidecar_credentials_issued_total", labels) or 0.0


async def test_a_cold_stampede_makes_one_token_request(
    peer: OidcProvider, make: Make, cache: CredentialCache, metrics: Metrics
) -> None:
    """100 concurrent requests on a cold cache wait for one token request and share its token."""
    provider = make(client_config(peer, "svc-basic", resource=BILLING))
    await asyncio.to_thread(peer.hold, True)
    waiting = [asyncio.ensure_future(cache.get(provider, request())) for _ in range(100)]
    await wait_for(peer, "in_flight", 1)
    await asyncio.sleep(0.05)  # every waiter has reached the cache by now
    assert (await asyncio.to_thread(peer.stats))["in_flight"] == 1 and not any(w.done() for w in waiting)
    await asyncio.to_thread(peer.hold, False)
    results = await asyncio.gather(*waiting)
    assert len({credential.id for credential, _ in results}) == 1
    assert {source for _, source in results} == {"minted"}
    assert await token_requests(peer) == 1 and issued(metrics, "ok") == 1


async def test_a_token_serves_every_request_of_its_life(peer: OidcProvider, make: Make, cache: CredentialCache) -> None:
    """1,000 requests within a token's lifetime: one token request, 999 cache hits."""
    provider = make(client_config(peer, "svc-jwt", resource=BILLING))
    results = [await cache.get(provider, request()) for _ in range(1000)]
    assert await token_requests(peer) == 1
    assert [source for _, source in results].count("cache") == 999
    assert len({credential.id for credential, _ in results}) == 1


async def test_an_outage_is_ridden_out_until_the_token_expires(
    peer: OidcProvider, make: Make, metrics: Metrics
) -> None:
    """During an outage the cached token is served while valid; after expiry: credential_unavailable."""
    clock = Clock()
    cache = CredentialCache(metrics, clock=clock, monotonic=clock)
    try:
        provider = make(client_config(peer, "svc-post", resource=BILLING))
        first, _ = await cache.get(provider, request())
        await asyncio.to_thread(peer.outage, True)
        clock.offset = 290.0  # 10 s left, more than the cache's 5 s margin
        assert await cache.get(provider, request()) == (first, "cache")
        assert await token_requests(peer) == 1
        clock.offset = 301.0  # expired
        with pytest.raises(CredentialUnavailable) as refused:
            await cache.get(provider, request())
    finally:
        await cache.aclose()
    assert refused.value.reason == "credential_unavailable" and refused.value.status == 503
    assert (refused.value.detail or "").startswith("token endpoint: temporarily_unavailable (http 503)")
    assert await token_requests(peer) == 2 and issued(metrics, "error") == 1


async def test_a_used_token_is_refreshed_in_the_background_before_expiry(
    peer: OidcProvider, make: Make, metrics: Metrics
) -> None:
    """Past 80 % of a used token's life the cache fetches the next one itself; requests get it from cache."""
    clock = Clock()
    clock.offset = 260.0  # past the refresh point (225-255 s of 300), 40 s before expiry
    cache = CredentialCache(metrics, clock=clock, monotonic=clock)
    try:
        provider = make(client_config(peer, "svc-basic", resource=BILLING))
        first, source = await cache.get(provider, request())
        await wait_for(peer, "tokens_issued", 2)
        second, again = await cache.get(provider, request())
    finally:
        await cache.aclose()
    assert (source, again) == ("minted", "cache")
    assert second.id != first.id and second.expires_at is not None and first.expires_at is not None
    assert second.expires_at > first.expires_at
    assert await token_requests(peer) == 2


async def test_a_failed_refresh_keeps_the_valid_token_and_logs_no_secret(
    peer: OidcProvider, make: Make, metrics: Metrics, captured_log: BytesIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background refresh during an outage fails, is logged with its reason, and the token stays in use."""
    monkeypatch.setattr(cache_module.random, "uniform", lambda a, b: (a + b) / 2)  # no jitter
    clock = Clock()
    clock.offset = 238.0  # the refresh point (240 s) is two real seconds away
    cache = CredentialCache(metrics, clock=clock, monotonic=clock)
    try:
        provider = make(client_config(peer, "svc-basic", resource=BILLING))
        first, _ = await cache.get(provider, request())
        await asyncio.to_thread(peer.outage, True)
        await wait_for(peer, "token_requests", 2)  # the refresh attempt, answered 503
        await asyncio.sleep(0.05)
        assert await cache.get(provider, request()) == (first, "cache")
    finally:
        await cache.aclose()
        decision_log.WRITER.flush()
    log = captured_log.getvalue().decode()
    assert '"event":"credential_refresh_failed"' in log and "temporarily_unavailable" in log
    assert issued(metrics, "error") >= 1
    assert first.token is not None and first.token.reveal() not in log
    assert peer.secret("svc-basic") not in log


async def test_no_secret_or_token_reaches_a_log_line_or_message(
    peer: OidcProvider, make: Make, metrics: Metrics, captured_log: BytesIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Canary: failures of every kind are logged and refused without a secret, assertion or token in them."""
    cache = CredentialCache(metrics)
    canaries = [WRONG_SECRET, peer.secret("svc-basic"), peer.secret("svc-post"), peer.secret("svc-exchange")]
    refusals: list[CredentialUnavailable] = []

    async def refused(provider: Any, req: Any) -> None:
        with pytest.raises(CredentialUnavailable) as caught:
            await cache.get(provider, req)
        refusals.append(caught.value)

    try:
        for client_id in ("svc-basic", "svc-post"):  # wrong secrets, whatever the method
            await refused(make(client_config(peer, client_id, client_secret={"value": WRONG_SECRET})), request())
        good = make(client_config(peer, "svc-basic", resource=BILLING))
        canaries.append((await cache.get(good, request()))[0].token.reveal())
        replayer = make(client_config(peer, "svc-jwt", resource=BILLING))
        assertion = replayer.endpoint.client_assertion()
        canaries.append(assertion)
        monkeypatch.setattr(replayer.endpoint, "client_assertion", lambda: assertion)
        canaries.append((await replayer.fetch(request())).token.reveal())
        await refused(replayer, request(("invoices.write",)))  # the replayed assertion
        tampered = peer.user_token("alice@example.com")[:-6] + "AAAAAA"
        canaries.append(tampered)
        await refused(_exchange(peer, make), request(task=_task(tampered)))
        await asyncio.to_thread(peer.outage, True)
        await refused(good, request(("invoices.read",)))
    finally:
        await cache.aclose()
        decision_log.WRITER.flush()
    log = captured_log.getvalue().decode()
    assert log.count('"event":"token_request_refused"') == 5
    texts = [log] + [f"{r!r} {r} {r.detail}" for r in refusals]
    assert [c[:12] for c in canaries if any(c in text for text in texts)] == []
    assert {r.detail.split(" (")[0] for r in refusals if r.detail} == {
        "token endpoint: invalid_client", "token endpoint: invalid_grant", "token endpoint: temporarily_unavailable"}


def _exchange(peer: OidcProvider, make: Make) -> Any:
    key = peer.actor_key
    actor_deps = ProviderDeps(agent_id=AGENT_SPIFFE_ID, signer=Signer(load_signing_key(key.path, key.kid),
                                                                       ACTOR_ISSUERS[0]), id_key=b"k" * 32)
    raw = client_config(peer, "svc-exchange", resource=CRM)
    assert parse_spec("oauth2_token_exchange", raw) is not None
    return make(raw, "oauth2_token_exchange", actor_deps)


def _task(subject_token: str) -> TaskRef:
    return TaskRef("task-canary", "https://login.example", "alice@example.com", Secret(subject_token, "task"),
                   "delegated")
