"""The runner: one attempt of a job on one offer, from create to confirmed teardown.

An attempt walks ``provision -> connect -> bootstrap -> upload -> start -> follow -> collect``
and ends in ``teardown`` (terminate, then confirm with the provider that the instance is gone,
and only then close the ledger row). ``follow`` touches the agent's heartbeat, keeps the budget,
pulls checkpoints and reconnects when SSH drops while the detached agent keeps training — but
never when the host key changed (another machine answers: ``HostKeyMismatchError`` at once).

The one exception to teardown is ``hold``: when this machine cannot store the finished adapter
(a full disk), the instance holding its only copy is kept for ``loraburst attach``, for a bounded
time, instead of being terminated with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loraburst.providers import Host, LaunchRequest, Machine, Offer, Provider
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONTROL_FILE,
    ENV_DEADLINE,
    ENV_DEADLINE_REASON,
    ENV_HEARTBEAT_GRACE,
    ENV_MODEL_DIR,
    HEARTBEAT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    STATE_FILE,
    ManifestError,
    State,
    missing_requirements,
    parse_manifest,
    unlisted_files,
    verify_manifest,
)

from . import _billing as billing
from ._bundle import Bundle
from ._disk import local_io, remove_quietly
from ._exceptions import (
    AgentError,
    ArtifactError,
    HostKeyMismatchError,
    InstanceLostError,
    JobCancelledError,
    LocalStorageError,
    LoraburstError,
    ProviderAPIError,
    ProviderError,
    RateLimitError,
    TeardownError,
    TransportError,
)
from ._home import runs_dir
from ._ledger import Ledger
from ._model_folder import content_digest
from ._owner import claim, release
from ._progress import ProgressView

__all__ = ["Attempt"]

# metrics.json is a few KB of numbers; anything near this is not ours.
_MAX_METRICS_BYTES = 16 << 20


class Attempt:
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

    # -- money ----------------------------------------------------------------------------
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

    # -- provision ------------------------------------------------------------------------
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
        request = LaunchRequest(tag=self.tag, offer=self.offer, public_key=public_key)
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

    def connect(self) -> Host:
        assert self.machine is not None
        workdir = f"{self.machine.workdir_root}/runs/{self.job_id}"
        if self.provider.capabilities.same_machine:
            workdir = str(self.local_dir)  # the run folder is already here
        t0 = time.time()
        self.host = self.provider.connect(self.machine, self.key_path, workdir)
        self.durations.setdefault("connect", time.time() - t0)
        return self.host

    # -- start ----------------------------------------------------------------------------
    def start(self, bundle: Bundle, *, resume_from: Path | None = None) -> None:
        """Upload the bundle, check the instance's Python stack, and start the agent."""
        host = self._require_host()
        t0 = time.time()
        uploaded = host.upload_bundle(bundle.path, bundle.sha256)
        self.durations["upload"] = time.time() - t0
        t_boot = time.time()
        self._bootstrap(host)
        self.durations["bootstrap"] = time.time() - t_boot
        if resume_from is not None and any(resume_from.glob("checkpoint-*")):
            self._push_checkpoints(host, resume_from)
        env = dict(self.extra_env)
        model_dir = bundle.model_dir
        if model_dir is not None:
            t_model = time.time()
            env[ENV_MODEL_DIR] = host.provide_model(model_dir, lambda: content_digest(model_dir))
            self.durations["model_upload"] = time.time() - t_model
        deadline = self._deadline()
        if deadline is not None:
            env[ENV_DEADLINE] = f"{deadline.at:.0f}"
            env[ENV_DEADLINE_REASON] = deadline.reason
        caps = self.provider.capabilities
        if not caps.same_machine:
            env[ENV_HEARTBEAT_GRACE] = f"{self.heartbeat_grace_s:.0f}"
        if caps.self_terminates and self.machine is not None:
            # How the watchdog can end its own instance once the client is gone for good.
            request = self.provider.self_termination(self.machine)
            if request is not None:
                env.update(request.to_env())
        host.write_text(HEARTBEAT_FILE, f"{time.time():.0f}\n")
        if host.read_text(STATE_FILE) is None or uploaded or not host.agent_alive():
            host.start_agent(env)

    def _bootstrap(self, host: Host) -> None:
        """Check Python/CUDA/torch, install the trainer's pins only where missing, smoke-test.

        Fails in seconds, cheaply, with a clear error when the image is broken. A host running
        this very interpreter (the ``local`` provider) is checked here, in package metadata,
        without starting a process or importing torch.
        """
        if _same_interpreter(host):
            missing = missing_requirements()
            if missing:
                raise AgentError(
                    f"the trainer's dependencies are missing here: {', '.join(missing)}. "
                    "Install them with `pip install 'loraburst[train]'`."
                )
            return
        # Keep the instance's own PYTHONPATH (site folders some images use) after the bundle's code.
        check = (
            f"PYTHONPATH=bundle/code${{PYTHONPATH:+:$PYTHONPATH}} {host.python} "
            "-m loraburst.remote.agent --check"
        )
        info = self._run_check(host, check)
        missing = info.get("missing") or []
        if missing and self.provider.capabilities.installs_packages:
            from loraburst.remote.protocol import TRAINER_REQUIREMENTS

            pins = [r for r in TRAINER_REQUIREMENTS if _req_name(r) in set(missing)]
            self.view.message(f"installing on the instance: {', '.join(pins)}")
            rc, _, err = host.run(
                f"{host.python} -m pip install -q " + " ".join(f"'{p}'" for p in pins), timeout=1200
            )
            if rc != 0:
                raise AgentError(f"installing {pins} on the instance failed: {err[-800:]}")
            info = self._run_check(host, check)
            missing = info.get("missing") or []
        if missing:
            raise AgentError(
                f"the trainer's dependencies are missing on {self.provider.name}: "
                f"{', '.join(missing)}. Install them with `pip install 'loraburst[train]'`."
            )
        if info.get("cuda") and info.get("bnb_smoke") not in (None, "ok"):
            raise AgentError(f"bitsandbytes 4-bit smoke test failed: {info.get('bnb_smoke')}")

    @staticmethod
    def _run_check(host: Host, command: str) -> dict[str, Any]:
        rc, out, err = host.run(command, timeout=300)
        try:
            parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as exc:
            raise AgentError(
                f"the instance's environment check failed (exit {rc}): {err[-800:] or out[-800:]}"
            ) from exc
        return parsed

    def _push_checkpoints(self, host: Host, local: Path) -> None:
        from loraburst.providers._base import upload_tree

        complete = [p for p in local.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if not complete:
            return
        latest = max(complete, key=lambda p: int(p.name.split("-")[-1]))
        upload_tree(host, latest, f"{CHECKPOINT_DIR}/{latest.name}")
        self.view.message(f"resuming from {latest.name}")

    # -- follow ---------------------------------------------------------------------------
    def follow(self, on_tick: Callable[[Attempt], None] | None = None) -> State:
        """Follow the agent until it reaches a terminal phase; return its last State.

        Raises:
            InstanceLostError: the provider says the instance is gone.
            HostKeyMismatchError: the instance's host key changed (never retried).
            AgentError: the agent died without a terminal state.
        """
        t0 = time.time()
        last_status_check = 0.0
        dead_reads = 0
        while True:
            try:
                host = self._require_host()
                host.write_text(HEARTBEAT_FILE, f"{time.time():.0f}\n")
                text = host.read_text(STATE_FILE)
                if text:
                    self.state = self._parse_state(text)
                    if self.state.step >= 1:
                        self.durations.setdefault("to_first_step", time.time() - t0)
                self.view.update(self.state, self.spent_before + self.cost_so_far())
                if self.state.terminal:
                    break
                self._maybe_pull_checkpoint(host)
                self._enforce_budget(host)
                if on_tick is not None:
                    on_tick(self)
                if not host.agent_alive():
                    dead_reads += 1
                    if dead_reads >= 3:  # re-read state: it may have finished in between
                        text = host.read_text(STATE_FILE)
                        if text and self._parse_state(text).terminal:
                            self.state = self._parse_state(text)
                            break
                        # A dead agent on a machine the provider says is gone was preempted:
                        # that is a relaunch (InstanceLostError), not a training failure.
                        self._check_alive()
                        log = host.read_text("agent.log") or ""
                        raise AgentError(f"the agent stopped without finishing:\n{log[-1500:]}")
                else:
                    dead_reads = 0
            except HostKeyMismatchError:
                raise  # another machine answers at this address: stop, never retry
            except TransportError:
                self._reconnect()
                continue
            if time.time() - last_status_check > self.status_check_s:
                last_status_check = time.time()
                self._check_alive()
            time.sleep(self.poll_s)
        self.durations["train"] = time.time() - t0
        if self.state.phase == "failed":
            err = self.state.error or {}
            raise AgentError(
                f"training failed on {self.provider.name}: "
                f"{err.get('type', 'Error')}: {err.get('message', '')}"
            )
        return self.state

    def _parse_state(self, text: str) -> State:
        try:
            return State.from_json(text)
        except ValueError as exc:  # the agent writes it atomically: this is not a torn read
            raise AgentError(
                f"the {self.provider.name} instance's {STATE_FILE} is unreadable: {exc}",
                job_id=self.job_id,
            ) from None

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

    def _reconnect(self) -> None:
        """SSH dropped: reconnect with backoff while the detached agent keeps training."""
        self._close_host()
        self.host = None
        deadline = time.time() + self.reconnect_timeout_s
        delay = 1.0
        while time.time() < deadline:
            self._check_alive()
            try:
                self.connect()
                self.view.message("reconnected")
                return
            except HostKeyMismatchError:
                raise
            except TransportError:
                time.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 15.0)
        raise TransportError(
            f"lost SSH to {self.provider.name} instance and could not "
            f"reconnect within {self.reconnect_timeout_s:.0f}s"
        )

    def _enforce_budget(self, host: Host) -> None:
        if self.max_cost is None or self.stop_requested:
            return
        # Stop early enough that saving, pulling and teardown stay within the cap.
        if billing.must_stop(
            spent=self.spent_before + self.cost_so_far(),
            max_cost=self.max_cost,
            price_per_hour=self.offer.price_per_hour,
            increment_s=self.offer.billing_increment_s,
        ):
            self.request_stop("budget")

    def request_stop(self, reason: str) -> None:
        """Ask the agent to checkpoint, save the partial adapter and stop."""
        if self.stop_requested:
            return
        self.stop_requested = reason
        if self.host is not None:
            self.host.write_text(CONTROL_FILE, json.dumps({"stop": reason}))
        self.view.message(f"stopping: {reason}")

    def _maybe_pull_checkpoint(self, host: Host) -> None:
        """Pull each new checkpoint once training has moved past it (so it is complete)."""
        if self.provider.capabilities.same_machine:
            return  # the run folder is already on this machine
        rc, out, _ = host.run(f"ls -1 {CHECKPOINT_DIR} 2>/dev/null", timeout=30)
        steps = sorted(
            int(n.rsplit("-", 1)[1])
            for n in out.split()
            if n.startswith("checkpoint-") and n.rsplit("-", 1)[1].isdigit()
        )
        done = [s for s in steps if s < self.state.step or self.state.terminal]
        if rc != 0 or not done or done[-1] <= self._last_ckpt_pulled:
            return
        name = f"checkpoint-{done[-1]}"
        # Fetch beside, then rename: a half-pulled checkpoint must never look like one.
        final = self.local_dir / CHECKPOINT_DIR / name
        partial = final.with_name(f".partial-{name}")
        try:
            host.fetch_tree(f"{CHECKPOINT_DIR}/{name}", partial)
            with local_io(final):
                remove_quietly(final)
                partial.rename(final)
        except LocalStorageError as exc:
            # The checkpoint is only a local copy for resuming elsewhere; training goes on and
            # the next checkpoint is tried once more (the user may free space meanwhile).
            remove_quietly(partial)
            self._last_ckpt_pulled = done[-1]
            self.view.message(f"could not keep {name} locally, training goes on: {exc}")
            return
        except BaseException:
            remove_quietly(partial)
            raise
        self._last_ckpt_pulled = done[-1]
        # Only the newest complete checkpoint is needed to resume: keep the local disk bounded.
        for old in (self.local_dir / CHECKPOINT_DIR).glob("checkpoint-*"):
            if old.name != name and old.name.rsplit("-", 1)[-1].isdigit():
                remove_quietly(old)

    # -- collect --------------------------------------------------------------------------
    def collect(self, output_dir: Path, *, retries: int = 3) -> tuple[Path, dict[str, Any]]:
        """Pull ``adapter/`` and metrics, accept exactly what the manifest lists, verify every
        sha256 (re-fetch on mismatch) and move the verified adapter into ``output_dir``.

        The instance is not trusted: its manifest must be well formed and name only plain
        paths under ``adapter/`` and ``metrics.json``, and a pulled file it does not list is
        refused rather than copied. ``<output_dir>/<job id>`` appears whole or not at all.

        Raises:
            AgentError: no manifest.
            ArtifactError: a malformed manifest, unlisted or unsafe files, or files that fail
                their sha256 ``retries`` times.
            LocalStorageError: this machine could not write the pull or the copy (nothing is
                left half-written); the instance still holds the adapter.
        """
        host = self._require_host()
        t0 = time.time()
        pulled = self.local_dir / "pulled"
        manifest_text = host.read_text(MANIFEST_FILE)
        if manifest_text is None:
            raise AgentError("the agent finished but wrote no manifest.json", job_id=self.job_id)
        try:
            manifest = parse_manifest(manifest_text)
        except ManifestError as exc:
            raise ArtifactError(
                f"{self.provider.name} instance's {MANIFEST_FILE} is refused: {exc}",
                job_id=self.job_id,
            ) from None
        if manifest["files"][METRICS_FILE]["size"] > _MAX_METRICS_BYTES:
            raise ArtifactError(
                f"the instance's {METRICS_FILE} is over {_MAX_METRICS_BYTES >> 20} MiB; refusing it",
                job_id=self.job_id,
            )
        _check_room(manifest, pulled, output_dir)
        try:
            for attempt in range(1, retries + 1):
                with local_io(pulled):
                    remove_quietly(pulled)
                    pulled.mkdir(parents=True)
                host.fetch_tree(ADAPTER_DIR, pulled / ADAPTER_DIR)
                host.fetch_tree(METRICS_FILE, pulled / METRICS_FILE)
                unlisted = unlisted_files(pulled, manifest)
                if unlisted:
                    raise ArtifactError(
                        f"the instance's {ADAPTER_DIR}/ holds files its manifest does not list: "
                        f"{unlisted[:10]}; refusing them",
                        job_id=self.job_id,
                    )
                bad = verify_manifest(pulled, manifest)
                if not bad:
                    break
                self.view.message(f"artifact check failed for {bad}; fetching again ({attempt})")
            else:
                raise ArtifactError(
                    f"pulled artifacts failed their sha256 check {retries} times: {bad}",
                    job_id=self.job_id,
                )
            metrics = _metrics(pulled / METRICS_FILE, self.job_id)
            dest = self._publish(pulled, manifest, manifest_text, output_dir)
        finally:
            remove_quietly(pulled)
        self.durations["pull"] = time.time() - t0
        return dest / ADAPTER_DIR, metrics

    def _publish(
        self, pulled: Path, manifest: dict[str, Any], manifest_text: str, output_dir: Path
    ) -> Path:
        """Copy the listed files into a hidden folder beside ``<output_dir>/<job id>``, write
        the manifest last, verify, then rename it into place: a full disk leaves no
        half-copied adapter (no zero-byte files beside a manifest.json)."""
        dest = output_dir / self.job_id
        staging = output_dir / f".partial-{self.job_id}"
        try:
            with local_io(staging):
                remove_quietly(staging)
                staging.mkdir(parents=True)
                for rel in sorted(manifest["files"]):
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(pulled / rel, staging / rel)
                with open(staging / MANIFEST_FILE, "w", encoding="utf-8") as f:
                    f.write(manifest_text)
                    f.flush()
                    os.fsync(f.fileno())
            bad = verify_manifest(staging, manifest)
            if bad:
                raise ArtifactError(f"copy to {dest} does not verify: {bad}", job_id=self.job_id)
            with local_io(dest):
                remove_quietly(dest)
                staging.rename(dest)
        except BaseException:
            remove_quietly(staging)
            raise
        return dest

    # -- hold -----------------------------------------------------------------------------
    def hold(self, cause: LocalStorageError) -> LocalStorageError:
        """Keep the instance (with the only copy of the adapter) instead of tearing it down,
        because this machine could not store the adapter; returns the error to raise.

        The agent's watchdog is told not to terminate before the hold ends, the ledger row
        becomes ``held`` (``loraburst attach`` finishes the pull, ``loraburst cleanup`` keeps it
        until then), and the SSH key is kept for that attach.
        """
        self.held = True
        until = time.time() + self.hold_s
        machine = self.machine.id if self.machine is not None else self.tag
        told_agent = ""
        try:
            self._require_host().write_text(
                CONTROL_FILE, json.dumps({"hold_until": until, "reason": "local disk"})
            )
        except LoraburstError as exc:
            told_agent = (
                f" (the instance's watchdog could not be told to wait: {exc}; it may terminate "
                f"the instance {self.heartbeat_grace_s / 60:.0f} min after this client stops)"
            )
        self._close_host()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(until))
        recorded = ""
        try:
            # billed_usd: what it cost so far (attach recounts the whole instance at the end).
            self.ledger.update_instance(
                self.tag,
                state="held",
                held_until=until,
                billed_usd=self.cost_so_far(),
                note=f"local disk: {cause}"[:500],
            )
            self.ledger.update_job(self.job_id, status="held", error=str(cause)[:500])
        except LoraburstError as exc:
            recorded = f" The ledger could not record the hold ({exc})."
        release(self.job_id)
        return LocalStorageError(
            f"job {self.job_id}: {cause}. The {self.provider.name} instance {machine} is KEPT "
            f"with the only copy of the adapter (${self.offer.price_per_hour:.2f}/h) until "
            f"{when}{told_agent}. Free space, then run `loraburst attach {self.job_id}` to pull "
            f"it; `loraburst cleanup --release-held` gives it up.{recorded}",
            path=cause.path,
            errno=cause.errno,
            job_id=self.job_id,
            provider=self.provider.name,
        )

    # -- teardown -------------------------------------------------------------------------
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

    def _close_host(self) -> None:
        # A dropped connection may fail to close; that must never stop a reconnect or teardown.
        if self.host is not None:
            with contextlib.suppress(Exception):
                self.host.close()

    def _drop_key(self) -> None:
        if self.key_path is not None:
            for p in (self.key_path, self.key_path.with_suffix(".pub")):
                p.unlink(missing_ok=True)

    def _require_host(self) -> Host:
        if self.host is None:
            raise TransportError("not connected")
        return self.host


def _same_interpreter(host: Host) -> bool:
    """Whether ``host`` runs its agent with this very interpreter on this machine."""
    import sys

    return bool(getattr(host, "same_environment", False)) and host.python == sys.executable


def _check_room(manifest: dict[str, Any], pulled: Path, output_dir: Path) -> None:
    """Fail before pulling when the manifest's files cannot fit: the pull and the copy into
    ``output_dir`` (both on one disk when they share it).

    Raises:
        LocalStorageError: with ``ENOSPC``, saying how much is needed and free.
    """
    need = sum(int(meta["size"]) for meta in manifest["files"].values())
    places: dict[int, tuple[Path, int]] = {}
    for folder in (pulled.parent, output_dir):
        with local_io(folder):
            folder.mkdir(parents=True, exist_ok=True)
            dev = os.stat(folder).st_dev
        where, total = places.get(dev, (folder, 0))
        places[dev] = (where, total + need)
    for where, total in places.values():
        free = shutil.disk_usage(where).free
        if free < total:
            raise LocalStorageError(
                f"the adapter needs {total / 1e6:,.1f} MB under {where} on this machine and "
                f"only {free / 1e6:,.1f} MB are free (free space)",
                path=str(where),
                errno=errno.ENOSPC,
            )


def _metrics(path: Path, job_id: str) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(
            f"the instance's {METRICS_FILE} is unreadable: {exc}", job_id=job_id
        ) from None
    if not isinstance(metrics, dict):
        raise ArtifactError(f"the instance's {METRICS_FILE} is not a JSON object", job_id=job_id)
    return metrics


def _is_refusal(exc: ProviderError) -> bool:
    """Errors that certainly created nothing (no need to look the tag up)."""
    from ._exceptions import AuthError, CapacityError

    return isinstance(exc, (AuthError, CapacityError))


def _req_name(requirement: str) -> str:
    for sep in ("<", ">", "=", "!", "~", "["):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip()


def cancelled(job_id: str) -> JobCancelledError:
    return JobCancelledError(
        f"job {job_id} was cancelled; its instance was torn down", job_id=job_id
    )
