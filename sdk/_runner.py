"""The runner: one attempt of a job on one offer, from create to confirmed teardown.

An attempt walks ``provision -> connect -> bootstrap -> upload -> start -> follow -> collect``
and always ends in ``teardown`` (terminate, then confirm with the provider that the instance is
gone, and only then close the ledger row). ``follow`` touches the agent's heartbeat, keeps the
budget, pulls checkpoints and reconnects when SSH drops while the detached agent keeps training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loraburst.providers import Host, LaunchRequest, Machine, Offer, Provider
from loraburst.remote.backends import requirements, resolve_backend
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONTROL_FILE,
    ENV_BACKEND,
    ENV_DEADLINE,
    ENV_HEARTBEAT_GRACE,
    ENV_MODEL_DIR,
    HEARTBEAT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    STATE_FILE,
    State,
    missing_requirements,
    verify_manifest,
)

from ._bundle import Bundle
from ._exceptions import (
    AgentError,
    ArtifactError,
    JobCancelledError,
    ProviderAPIError,
    ProviderError,
    RateLimitError,
    TeardownError,
    TransportError,
)
from ._home import runs_dir
from ._ledger import Ledger
from ._model_folder import content_digest
from ._progress import ProgressView

__all__ = ["Attempt", "Lost", "billed_cost"]


class Lost(Exception):
    """The instance is gone (preempted or vanished) mid-run; the caller may relaunch."""


def billed_cost(price_per_hour: float, seconds: float, increment_s: int) -> float:
    """Dollars billed for ``seconds`` of use at the provider's billing granularity."""
    if price_per_hour <= 0 or seconds <= 0:
        return 0.0
    inc = max(1, increment_s)
    return price_per_hour * math.ceil(seconds / inc) * inc / 3600.0


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
        backend: str | None = None,
    ) -> None:
        self.job_id = job_id
        # The recipe the machine will run ("torch"/"mlx"), when the client knows it (an explicit
        # train.backend, or a provider that resolves "auto"); None: the instance decides.
        self.backend = backend
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

    # -- money ----------------------------------------------------------------------------
    def elapsed_billable(self) -> float:
        return time.time() - self.launched_at if self.launched_at else 0.0

    def cost_so_far(self) -> float:
        return billed_cost(
            self.offer.price_per_hour, self.elapsed_billable(), self.offer.billing_increment_s
        )

    def _budget_deadline(self) -> float | None:
        """Unix time by which the agent must stop so that spend stays under ``max_cost``.

        The margin covers saving, pulling the adapter, terminating, and one billing increment.
        """
        deadlines = []
        if self.max_runtime is not None:
            deadlines.append(time.time() + self.max_runtime)
        if self.max_cost is not None and self.offer.price_per_hour > 0:
            remaining = self.max_cost - self.spent_before
            seconds = remaining / self.offer.price_per_hour * 3600.0
            margin = 45.0 + self.offer.billing_increment_s
            start = self.launched_at or time.time()
            deadlines.append(start + max(0.0, seconds - margin))
        return min(deadlines) if deadlines else None

    # -- provision ------------------------------------------------------------------------
    def provision(self) -> Machine:
        """Record the instance, create it, and wait until it is reachable."""
        t0 = time.time()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # While this file names a live process, `loraburst cleanup` leaves the instance alone.
        (self.local_dir / "client.pid").write_text(str(os.getpid()))
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
        if self.provider.name != "local":
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
                raise Lost(f"{self.provider.name} instance {machine.id} vanished while booting")
            if current.ready:
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
        if self.provider.name == "local":
            workdir = str(self.local_dir)
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
        deadline = self._budget_deadline()
        if deadline is not None:
            env[ENV_DEADLINE] = f"{deadline:.0f}"
        if self.backend is not None:
            env[ENV_BACKEND] = self.backend  # the agent resolves "auto" as the client did
        if self.provider.name != "local":
            env[ENV_HEARTBEAT_GRACE] = f"{self.heartbeat_grace_s:.0f}"
        # Optional provider hook: credentials the watchdog needs to terminate its own instance
        # (RunPod pods already carry a pod-scoped key; Lambda's is opt-in).
        agent_env = getattr(self.provider, "agent_env", None)
        if agent_env is not None and self.machine is not None:
            env.update(agent_env(self.machine))
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
            backend = self.backend or resolve_backend("auto")  # this very machine
            missing = missing_requirements(requirements(backend))
            if missing:
                raise AgentError(_missing_message(backend, missing, "here"))
            return
        # Keep the instance's own PYTHONPATH (site folders some images use) after the bundle's code.
        check = (
            f"PYTHONPATH=bundle/code${{PYTHONPATH:+:$PYTHONPATH}} {host.python} "
            "-m loraburst.remote.agent --check"
        )
        info = self._run_check(host, check)
        # "auto" unresolved by the provider resolves as the instance will: MLX on a Mac.
        backend = self.backend or ("mlx" if info.get("apple_silicon") else "torch")
        field = "missing_mlx" if backend == "mlx" else "missing"
        missing = info.get(field) or []
        if missing and self.provider.name != "local":
            pins = [r for r in requirements(backend) if _req_name(r) in set(missing)]
            self.view.message(f"installing on the instance: {', '.join(pins)}")
            rc, _, err = host.run(
                f"{host.python} -m pip install -q " + " ".join(f"'{p}'" for p in pins), timeout=1200
            )
            if rc != 0:
                raise AgentError(f"installing {pins} on the instance failed: {err[-800:]}")
            info = self._run_check(host, check)
            missing = info.get(field) or []
        if missing:
            raise AgentError(_missing_message(backend, missing, f"on {self.provider.name}"))
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
            Lost: the provider says the instance is gone.
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
                    self.state = State.from_json(text)
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
                        if text and State.from_json(text).terminal:
                            self.state = State.from_json(text)
                            break
                        # A dead agent on a machine the provider says is gone was preempted:
                        # that is a relaunch (Lost), not a training failure.
                        self._check_alive()
                        log = host.read_text("agent.log") or ""
                        raise AgentError(f"the agent stopped without finishing:\n{log[-1500:]}")
                else:
                    dead_reads = 0
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

    def _check_alive(self) -> None:
        assert self.machine is not None
        if self.provider.name == "local":
            return
        known, current = self._get_tolerant(self.machine.id, self._outage_deadline())
        if not known:
            return  # the API is having a moment; the instance and the agent carry on
        if current is None or current.status in ("terminated", "preempted"):
            raise Lost(
                f"{self.provider.name} instance {self.machine.id} is gone "
                f"({current.status if current else 'unknown to the provider'})"
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
        margin = billed_cost(self.offer.price_per_hour, 45.0 + self.offer.billing_increment_s, 1)
        if self.spent_before + self.cost_so_far() + margin >= self.max_cost:
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
        if self.provider.name == "local":
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
        host.fetch_tree(f"{CHECKPOINT_DIR}/{name}", partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        self._last_ckpt_pulled = done[-1]

    # -- collect --------------------------------------------------------------------------
    def collect(self, output_dir: Path, *, retries: int = 3) -> tuple[Path, dict[str, Any]]:
        """Pull ``adapter/``, metrics and manifest; verify every sha256 (re-fetch on mismatch)
        and copy the verified adapter to ``output_dir``."""
        host = self._require_host()
        t0 = time.time()
        pulled = self.local_dir / "pulled"
        for attempt in range(1, retries + 1):
            manifest_text = host.read_text(MANIFEST_FILE)
            if manifest_text is None:
                raise AgentError("the agent finished but wrote no manifest.json")
            manifest = json.loads(manifest_text)
            shutil.rmtree(pulled, ignore_errors=True)
            pulled.mkdir(parents=True)
            host.fetch_tree(ADAPTER_DIR, pulled / ADAPTER_DIR)
            host.fetch_tree(METRICS_FILE, pulled / METRICS_FILE)
            bad = verify_manifest(pulled, manifest)
            if not bad:
                break
            self.view.message(f"artifact check failed for {bad}; fetching again ({attempt})")
        else:
            raise ArtifactError(
                f"pulled artifacts failed their sha256 check {retries} times: {bad}",
                job_id=self.job_id,
            )
        (pulled / MANIFEST_FILE).write_text(manifest_text)
        dest = output_dir / self.job_id
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(pulled, dest)
        bad = verify_manifest(dest, manifest)
        if bad:
            raise ArtifactError(f"copy to {dest} does not verify: {bad}", job_id=self.job_id)
        self.durations["pull"] = time.time() - t0
        metrics: dict[str, Any] = json.loads((dest / METRICS_FILE).read_text())
        return dest / ADAPTER_DIR, metrics

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
        (self.local_dir / "client.pid").unlink(missing_ok=True)
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


def _missing_message(backend: str, missing: list[str], where: str) -> str:
    extra = "mlx" if backend == "mlx" else "train"
    return (
        f"the {backend} trainer's dependencies are missing {where}: {', '.join(missing)}. "
        f"Install them with `pip install 'loraburst[{extra}]'`."
    )


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
