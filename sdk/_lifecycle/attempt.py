"""One attempt of a job on one offer, from create to confirmed teardown.

An attempt walks ``provision -> connect -> bootstrap -> upload -> start -> follow -> collect``
and ends in ``teardown`` (terminate, then confirm with the provider that the instance is gone,
and only then close the ledger row). ``follow`` touches the agent's heartbeat, keeps the budget,
pulls checkpoints and reconnects when SSH drops while the detached agent keeps training — but
never when the host key changed (another machine answers: ``HostKeyMismatchError`` at once).

The one exception to teardown is ``hold``: when this machine cannot store the finished adapter
(a full disk), the instance holding its only copy is kept for ``loraburst attach``, for a bounded
time, instead of being terminated with it.

The concerns live in their own modules (:mod:`.provisioning`, :mod:`.session`,
:mod:`.pullback`); :class:`Attempt` composes them over one set of state and adds the money.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from loraburst.providers import Host, Machine, Offer, Provider
from loraburst.remote.protocol import (
    State,
)

from .._cost import billing as billing
from .._exceptions import (
    JobCancelledError,
)
from .._progress import ProgressView
from .._state.home import runs_dir
from .._state.ledger import InstanceRow, Ledger

__all__ = ["Attempt"]

from .provisioning import Provisioning
from .pullback import PullBack
from .session import AgentSession


class Attempt(Provisioning, AgentSession, PullBack):
    """One attempt of ``job_id`` on ``offer`` with ``provider``; see the module docstring."""

    # Bounded waits; instance attributes so tests and users can shorten them.
    ready_timeout_s = 900.0
    poll_s = 1.0
    status_check_s = 5.0
    reconnect_timeout_s = 300.0
    stop_wait_s = 180.0
    teardown_timeout_s = 120.0
    heartbeat_grace_s = 600.0
    api_outage_s = 300.0  # status checks may fail this long before the attempt gives up
    # How long an instance holding the only copy of an adapter this machine could not store is
    # kept for `loraburst attach` (it bills meanwhile; then its watchdog terminates it).
    hold_s = 2 * 3600.0

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        provider: Provider,
        offer: Offer,
        ledger: Ledger,
        view: ProgressView,
        spent_before: float = 0.0,
        max_cost: float | None = None,
        max_runtime: float | None = None,
        env: Mapping[str, str] | None = None,
        disk_gb: int = 50,
        backend: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.tag = f"lb-{job_id}-{attempt}"
        self.provider = provider
        self.offer = offer
        self.ledger = ledger
        self.view = view
        self.spent_before = spent_before
        self.max_cost = max_cost
        self.max_runtime = max_runtime
        self.extra_env = dict(env or {})
        self.disk_gb = disk_gb  # the instance's disk: base, adapter and every export
        # The recipe the machine will run ("torch"/"mlx"), when the client knows it (an explicit
        # train.backend, or a provider that resolves "auto"); None: the instance decides.
        self.backend = backend
        self.machine: Machine | None = None
        self.host: Host | None = None
        self.key_path: Path | None = None
        self.launched_at: float | None = None
        self.local_dir = runs_dir() / job_id
        self.state = State()
        self.stop_requested: str | None = None
        self.durations: dict[str, float] = {}
        self._last_ckpt_pulled = 0
        self._api_trouble_since: float | None = None
        self.held = False
        self.provider_id: str | None = None  # the instance's id, once known

    # -- money ----------------------------------------------------------------------------
    @classmethod
    def resume(
        cls,
        *,
        job_id: str,
        instance: InstanceRow,
        provider: Provider,
        ledger: Ledger,
        view: ProgressView,
        spent_before: float,
    ) -> Attempt:
        """The attempt behind an open ledger row (``loraburst attach``): its tag, key and
        billing clock restored; :meth:`locate` then finds its instance again."""
        from loraburst.providers import _keys

        run = cls(
            job_id=job_id,
            attempt=instance.attempt,
            provider=provider,
            offer=Offer(
                provider=instance.provider,
                gpu=instance.gpu or "?",
                gpu_count=1,
                vram_gb=0,
                price_per_hour=instance.price_per_hour,
                instance_type=instance.gpu or "?",
                billing_increment_s=instance.billing_increment_s,
            ),
            ledger=ledger,
            view=view,
            spent_before=spent_before,
        )
        run.tag = instance.tag
        run.key_path = _keys.key_path(instance.tag)
        run.launched_at = instance.launched_at
        run.provider_id = instance.provider_id
        return run

    def elapsed_billable(self) -> float:
        return time.time() - self.launched_at if self.launched_at else 0.0

    def cost_so_far(self) -> float:
        return billing.billed_cost(
            self.offer.price_per_hour, self.elapsed_billable(), self.offer.billing_increment_s
        )

    def _deadline(self) -> billing.Deadline | None:
        """When the agent must stop by itself for the bill to stay under ``max_cost`` (or the
        run under ``max_runtime``); see :mod:`._billing`."""
        return billing.deadline(
            started_at=self.launched_at or time.time(),
            now=time.time(),
            price_per_hour=self.offer.price_per_hour,
            increment_s=self.offer.billing_increment_s,
            max_cost=self.max_cost,
            spent_before=self.spent_before,
            max_runtime=self.max_runtime,
        )


def cancelled(job_id: str) -> JobCancelledError:
    return JobCancelledError(
        f"job {job_id} was cancelled; its instance was torn down", job_id=job_id
    )
