"""A cancellation that lands in the step where a bounded wait completes is not lost.

On Python 3.11 ``asyncio.wait_for`` runs what it bounds in a task of its own; when the outer task is cancelled
in the same step that inner task completes, it returns the result and the cancellation is gone (CPython
gh-86296, fixed in 3.12; the fleet heartbeat that never stopped, tests/fleet/test_stopping.py). The sidecar's
own bounded waits use ``asyncio.timeout``, which runs the wait in the task itself: the cancellation is thrown
into it whatever completed in that step. Each test completes the inner wait and cancels in one step, as a
revocation's cut or a shutdown does.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from sidecar.approvals import Approvals
from sidecar.config_model import FleetConfig
from sidecar.exchange import Exchange
from sidecar.fleet import Registration
from sidecar.observe.metrics import Metrics

APPROVER = {"iss": "https://login.example.com", "sub": "alice@example.com"}


async def test_a_held_request_cut_in_the_step_it_is_approved_stays_cut() -> None:
    """An approver approves while the request's task is cut (revoked, client gone): the request sees the
    cancellation and is never forwarded; with wait_for it went on as approved."""
    approvals = Approvals(Metrics(), timeout=60.0)
    holding = asyncio.ensure_future(approvals.hold(Exchange("outbound", protocol="http", method="POST")))
    while not approvals.list():
        await asyncio.sleep(0)
    [pending] = approvals.list()
    assert approvals.decide(pending["id"], True, APPROVER)  # the decision completes the wait ...
    holding.cancel()  # ... and the cut lands in the same step
    with pytest.raises(asyncio.CancelledError):
        await holding
    assert approvals.list() == []


class GatedRedis:
    """A Redis client whose scan waits until the test lets it finish (no member registered)."""

    def __init__(self) -> None:
        self.entered, self.answer = asyncio.Event(), asyncio.Event()

    async def scan_iter(self, **_: Any) -> AsyncIterator[bytes]:
        self.entered.set()
        await self.answer.wait()
        for key in ():
            yield key


async def test_a_fleet_view_cancelled_as_its_read_completes_is_cancelled() -> None:
    """``GET /inventory?scope=fleet`` whose handler is cancelled as Redis answers raises CancelledError instead of
    answering as if nothing happened."""
    client = GatedRedis()
    registration = Registration(FleetConfig(), client, lambda: {"agent": "a"})
    viewing = asyncio.ensure_future(registration.view())
    await client.entered.wait()
    client.answer.set()  # the read completes in the next step ...
    viewing.cancel()  # ... and the cancellation lands in it
    with pytest.raises(asyncio.CancelledError):
        await viewing
