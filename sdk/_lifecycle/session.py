"""The agent session: connect (and reconnect while the detached agent keeps training), upload
the bundle, check the instance's stack, start the agent with its environment, and follow it to
a terminal phase — touching its heartbeat, keeping the budget and honouring stops."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraburst.providers import Host, Machine, Offer, Provider
from loraburst.remote.backends import requirements, resolve_backend
from loraburst.remote.protocol import (
    CHECKPOINT_DIR,
    CONTROL_FILE,
    ENV_BACKEND,
    ENV_DEADLINE,
    ENV_DEADLINE_REASON,
    ENV_GPUS,
    ENV_HEARTBEAT_GRACE,
    ENV_MODEL_DIR,
    HEARTBEAT_FILE,
    STATE_FILE,
    State,
    missing_requirements,
)

from .._cost import billing as billing
from .._data.bundle import Bundle
from .._data.model_folder import content_digest
from .._exceptions import (
    AgentError,
    HostKeyMismatchError,
    TransportError,
)
from .._progress import ProgressView

__all__ = ["AgentSession"]


class AgentSession:
    """Talking to the agent on a provisioned instance.

    Shared state (on the attempt): ``provider``, ``offer``, ``job_id``, ``tag``, ``ledger``,
    ``view``, ``machine``, ``host``, ``key_path``, ``launched_at``, ``durations``, ``state``.
    """

    provider: Provider
    offer: Offer
    job_id: str
    view: ProgressView
    machine: Machine | None
    host: Host | None
    key_path: Path | None
    local_dir: Path
    extra_env: dict[str, str]
    backend: str | None
    durations: dict[str, float]
    state: State
    stop_requested: str | None
    spent_before: float
    max_cost: float | None
    poll_s: float
    status_check_s: float
    reconnect_timeout_s: float
    heartbeat_grace_s: float

    if TYPE_CHECKING:  # provided by the other parts of Attempt

        def cost_so_far(self) -> float: ...  # the attempt's
        def _deadline(self) -> billing.Deadline | None: ...  # the attempt's
        def _check_alive(self) -> None: ...  # provisioning's
        def _maybe_pull_checkpoint(self, host: Host) -> None: ...  # pull-back's

    def connect(self) -> Host:
        assert self.machine is not None
        workdir = f"{self.machine.workdir_root}/runs/{self.job_id}"
        if self.provider.capabilities.same_machine:
            workdir = str(self.local_dir)  # the run folder is already here
        t0 = time.time()
        self.host = self.provider.connect(self.machine, self.key_path, workdir)
        self.durations.setdefault("connect", time.time() - t0)
        return self.host

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
        if self.backend is not None:
            env[ENV_BACKEND] = self.backend  # the agent resolves "auto" as the client did
        if self.offer.gpu_count >= 1:
            # The GPUs rented: above one the agent trains under torchrun, one rank per GPU.
            env[ENV_GPUS] = str(self.offer.gpu_count)
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
        if missing and self.provider.capabilities.installs_packages:
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

    def follow(self, on_tick: Callable[[Any], None] | None = None) -> State:
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

    def _close_host(self) -> None:
        # A dropped connection may fail to close; that must never stop a reconnect or teardown.
        if self.host is not None:
            with contextlib.suppress(Exception):
                self.host.close()

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


def _req_name(requirement: str) -> str:
    for sep in ("<", ">", "=", "!", "~", "["):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip()
