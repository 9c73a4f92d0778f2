"""Launch a real instance on an emulator the way jobs do: through the runner's own lifecycle
(``Attempt``: ledger row first, launch, wait until ready, connect), not a copy of it."""

from __future__ import annotations

from loraburst._lifecycle.attempt import Attempt
from loraburst._progress import ProgressView
from loraburst._state.ledger import Ledger
from loraburst.providers import Offer, Provider


def launched(
    provider: Provider, offer: Offer, job: str, *, ready_timeout_s: float = 20.0
) -> Attempt:
    """A provisioned and connected attempt (its tag is ``lb-<job>-1``); tear it down after.

    Raises:
        Whatever provisioning or connecting raises; the instance is torn down first.
    """
    run = Attempt(
        job_id=job,
        attempt=1,
        provider=provider,
        offer=offer,
        ledger=Ledger(),
        view=ProgressView(job, enabled=False),
    )
    run.poll_s, run.ready_timeout_s = 0.05, ready_timeout_s
    try:
        run.provision()
        run.connect()
    except BaseException:
        run.teardown()
        raise
    return run
