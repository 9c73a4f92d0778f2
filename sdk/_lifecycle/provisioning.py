"""Provisioning and teardown: an instance recorded before it is created, created (a create whose
answer was lost is found again by its tag), waited for, watched, and terminated *and confirmed
gone* before its ledger row closes."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loraburst.providers import LaunchRequest, Machine, Offer, Provider
from loraburst.remote.protocol import MANIFEST_FILE

from .._exceptions import (
    InstanceLostError,
    ProviderAPIError,
    ProviderError,
    RateLimitError,
    TeardownError,
    TransportError,
)
from .._progress import ProgressView
from .._state.ledger import Ledger
from .owner import claim, release

__all__ = ["Provisioning"]


class Provisioning:
    """The instance's life at the provider: :meth:`provision`, status checks, :meth:`teardown`.

    Shared state (on the attempt): ``provider``, ``offer``, ``job_id``, ``tag``, ``ledger``,
    ``view``, ``machine``, ``host``, ``key_path``, ``launched_at``, ``durations``, ``state``.
    """

    provider: Provider
    offer: Offer
    job_id: str
    attempt: int
    tag: str
    ledger: Ledger
    view: ProgressView
    machine: Machine | None
    key_path: Path | None
    launched_at: float | None
    durations: dict[str, float]
    ready_timeout_s: float
    poll_s: float
    api_outage_s: float
    teardown_timeout_s: float
    _api_trouble_since: float | None
    provider_id: str | None
    disk_gb: int
    local_dir: Path

    if TYPE_CHECKING:  # provided by the other parts of Attempt

        def cost_so_far(self) -> float: ...  # the attempt's (see attempt.py)
        def _close_host(self) -> None: ...  # the session's

    def provision(self) -> Machine:
        """Record the instance, create it, and wait until it is reachable."""
        t0 = time.time()
        # While this process holds the claim, `loraburst cleanup` leaves the instance alone.
        claim(self.job_id)
        self.ledger.record_instance(
            self.tag,
            job_id=self.job_id,
            attempt=self.attempt,
            provider=self.provider.name,
            gpu=self.offer.gpu,
            price_per_hour=self.offer.price_per_hour,
            billing_increment_s=self.offer.billing_increment_s,
        )
        public_key = ""
        if self.provider.capabilities.ssh:
            from loraburst.providers import _keys  # lazy: paramiko is only needed for SSH

            self.key_path, public_key = _keys.generate_key(self.tag)
        request = LaunchRequest(
            tag=self.tag, offer=self.offer, public_key=public_key, disk_gb=self.disk_gb
        )
        # User env (credentials for artifacts=, a Lambda key for the watchdog) is not sent to
        # the provider's API, where it would be stored with the instance: it travels only
        # over SSH when the agent starts.
        try:
            t_launch = time.time()
            machine = self.provider.launch(request)
            self.durations["launch"] = time.time() - t_launch
        except ProviderError as exc:
            # The create may have happened even though its response was lost: look the tag up
            # instead of creating twice.
            found = None if _is_refusal(exc) else self._find_until(time.time() + 60)
            if found is None:
                self.ledger.update_instance(
                    self.tag, state="create_failed", note=str(exc), ended_at=time.time()
                )
                self._drop_key()
                raise
            machine = found
        self.machine = machine
        self.launched_at = time.time()
        self.ledger.update_instance(
            self.tag, state="launched", provider_id=machine.id, launched_at=self.launched_at
        )
        t_ready = time.time()
        self.machine = self._wait_ready(machine)
        self.durations["ready_wait"] = time.time() - t_ready
        self.ledger.update_instance(self.tag, state="running")
        self.durations["provision"] = time.time() - t0
        return self.machine

    def locate(self) -> Machine:
        """Find this attempt's instance again (by its id, else its tag) for ``attach``.

        An instance on this very machine whose agent has exited is its run folder: a finished
        run's manifest is still there to pull.

        Raises:
            InstanceLostError: the provider says it is gone.
        """
        machine = (
            self.provider.get(self.provider_id)
            if self.provider_id
            else self.provider.find(self.tag)
        )
        if (
            machine is None
            and self.provider.capabilities.same_machine
            and (self.local_dir / MANIFEST_FILE).is_file()
        ):
            machine = Machine(
                provider=self.provider.name,
                id=self.provider_id or self.tag,
                tag=self.tag,
                status="running",
                python=sys.executable,
                workdir_root=str(self.local_dir.parent),
            )
        if machine is None or machine.status in ("terminated", "preempted"):
            raise InstanceLostError(
                f"job {self.job_id}'s {self.provider.name} instance "
                f"{self.provider_id or self.tag} is gone",
                job_id=self.job_id,
                provider=self.provider.name,
            )
        self.machine = machine
        return machine

    def _wait_ready(self, machine: Machine) -> Machine:
        deadline = time.time() + self.ready_timeout_s
        while True:
            known, current = self._get_tolerant(machine.id, deadline)
            if not known:
                time.sleep(self.poll_s)
                continue
            if current is None or current.status in ("terminated", "preempted"):
                raise InstanceLostError(
                    f"{self.provider.name} instance {machine.id} vanished while booting",
                    job_id=self.job_id,
                )
            if current.ready(self.provider.capabilities):
                return current
            if time.time() > deadline:
                raise TransportError(
                    f"{self.provider.name} instance {machine.id} was not ready after "
                    f"{self.ready_timeout_s:.0f}s (status {current.status!r}, ssh "
                    f"{'mapped' if current.ssh else 'not mapped'}); it is being terminated.",
                    provider=self.provider.name,
                )
            time.sleep(self.poll_s)

    def _check_alive(self) -> None:
        assert self.machine is not None
        if self.provider.capabilities.same_machine:
            return  # no provider to ask: the agent is a process here
        known, current = self._get_tolerant(self.machine.id, self._outage_deadline())
        if not known:
            return  # the API is having a moment; the instance and the agent carry on
        if current is None or current.status in ("terminated", "preempted"):
            raise InstanceLostError(
                f"{self.provider.name} instance {self.machine.id} is gone "
                f"({current.status if current else 'unknown to the provider'})",
                job_id=self.job_id,
                provider=self.provider.name,
            )

    def _find_until(self, deadline: float) -> Machine | None:
        """Look our tag up, retrying API failures until ``deadline`` (then raising)."""
        delay = 0.5
        while True:
            try:
                return self.provider.find(self.tag)
            except ProviderError:
                if time.time() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _outage_deadline(self) -> float:
        return (self._api_trouble_since or time.time()) + self.api_outage_s

    def _get_tolerant(self, machine_id: str, deadline: float) -> tuple[bool, Machine | None]:
        """``provider.get``, where a rate-limited or failing API (after the provider's own
        retries) is not a reason to abandon a healthy instance: ``(False, None)`` until the
        outage outlasts ``deadline`` (then the error is raised)."""
        try:
            current = self.provider.get(machine_id)
        except (RateLimitError, ProviderAPIError, TransportError) as exc:
            if time.time() > deadline:
                raise
            if self._api_trouble_since is None:
                self._api_trouble_since = time.time()
                self.view.message(f"{self.provider.name} API trouble, will retry: {exc}")
            return False, None
        self._api_trouble_since = None
        return True, current

    def teardown(self) -> float:
        """Terminate and confirm; returns the billed cost. Raises TeardownError loudly when
        the instance cannot be confirmed gone (the ledger row stays open for cleanup)."""
        t0 = time.time()
        self._close_host()
        if self.machine is None:
            # Interrupted mid-create: the instance may exist although we never saw its id.
            try:
                self.machine = self._find_until(time.time() + self.teardown_timeout_s)
            except ProviderError as exc:
                self.ledger.update_instance(self.tag, state="teardown_failed", note=str(exc))
                raise TeardownError(
                    f"COULD NOT CONFIRM whether {self.provider.name} created an instance for "
                    f"{self.tag}: {exc}. Run `loraburst cleanup` once the API answers.",
                    provider=self.provider.name,
                    job_id=self.job_id,
                ) from exc
            if self.machine is None:
                if self.ledger.instance(self.tag) is not None:
                    self.ledger.update_instance(
                        self.tag, state="never_created", ended_at=time.time()
                    )
                self._drop_key()
                return 0.0
            self.launched_at = self.launched_at or time.time()
        machine_id = self.machine.id
        self.ledger.update_instance(self.tag, state="terminating")
        deadline = time.time() + self.teardown_timeout_s
        delay = 1.0
        last_error: Exception | None = None
        while time.time() < deadline:
            try:
                self.provider.terminate(machine_id)
                current = self.provider.get(machine_id)
                if current is None or current.status in ("terminated", "preempted"):
                    break
            except ProviderError as exc:
                last_error = exc
            time.sleep(min(delay, max(0.0, deadline - time.time())))
            delay = min(delay * 2, 10.0)
        else:
            cost = self.cost_so_far()
            self.ledger.update_instance(
                self.tag,
                state="teardown_failed",
                billed_usd=cost,
                note=str(last_error or "still running"),
            )
            raise TeardownError(
                f"COULD NOT CONFIRM that {self.provider.name} instance {machine_id} "
                f"({self.tag}) is terminated: {last_error or 'it is still listed as running'}. "
                f"It may still be billing. Run `loraburst cleanup` or terminate it in the "
                f"provider's console.",
                provider=self.provider.name,
                job_id=self.job_id,
            )
        ended = time.time()
        cost = self.cost_so_far()
        self.ledger.update_instance(self.tag, state="terminated", ended_at=ended, billed_usd=cost)
        self._drop_key()
        release(self.job_id)
        self.durations["teardown"] = time.time() - t0
        return cost

    def _drop_key(self) -> None:
        if self.key_path is not None:
            for p in (self.key_path, self.key_path.with_suffix(".pub")):
                p.unlink(missing_ok=True)


def _is_refusal(exc: ProviderError) -> bool:
    """Errors that certainly created nothing (no need to look the tag up)."""
    from .._exceptions import AuthError, CapacityError

    return isinstance(exc, (AuthError, CapacityError))
