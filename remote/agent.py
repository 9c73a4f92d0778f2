"""The on-instance agent: ``python -m loraburst.remote.agent WORKDIR`` (or ``--check``).

It owns the run's wire files (``state.json``, ``events.jsonl``; see :mod:`.protocol`), starts
the :class:`~.watchdog.Watchdog`, runs the trainer, and reports any failure as
``{"type", "message"}``. On an instance of several GPUs (:func:`trainer_processes`) the trainer
runs as one process per GPU under ``torchrun`` (:mod:`.rank`): the agent passes the watchdog's
stop reason on in a file, and ends torchrun's process group with the job. A job resuming a
checkpoint written under FSDP (:func:`fsdp_resume`) runs under torchrun even on one GPU, as one
FSDP rank. After training it stays only as long as the watchdog may still have to terminate the
instance. Standard library only: the trainer's imports happen inside
:func:`loraburst.remote.trainer.run`, so a missing dependency becomes a ``failed`` state, not a
crash without one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .backends import MLX_REQUIREMENTS, is_apple_silicon
from .protocol import (
    BUNDLE_DIR,
    ENV_AGENT_PID,
    ENV_ARTIFACTS,
    ENV_GPUS,
    MANIFEST_FILE,
    PROTOCOL_VERSION,
    RANK_STOP_FILE,
    STATE_FILE,
    State,
    append_event,
    error_dict,
    missing_requirements,
    write_atomic,
)
from .watchdog import Watchdog

__all__ = ["Reporter", "check", "fsdp_resume", "main", "trainer_processes"]

_GIB = 1024**3


class Reporter:
    """Writes ``state.json`` (atomically) and ``events.jsonl``, and says whether to stop.

    Args:
        workdir: The run's work directory.
        stop_source: Returns why training should stop (the watchdog's reason), or None.
        echo: Also print each event to stdout (which the runner keeps as agent.log).
    """

    def __init__(
        self,
        workdir: Path,
        stop_source: Callable[[], str | None] | None = None,
        *,
        echo: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state = State(pid=os.getpid(), started_at=time.time())
        self._stop_source = stop_source
        self._echo = echo
        self.telemetry: Any = None  # a telemetry.Telemetry while the agent samples the GPUs

    @property
    def stop_reason(self) -> str | None:
        """Why training should stop now, or None."""
        return self._stop_source() if self._stop_source is not None else None

    def update(self, **fields: Any) -> None:
        """Set fields of the State and replace ``state.json``."""
        for key, value in fields.items():
            setattr(self.state, key, value)
        self.state.updated_at = time.time()
        write_atomic(self.workdir / STATE_FILE, self.state.to_json())

    def event(self, kind: str, **fields: Any) -> None:
        """Append an event (and echo it to the log)."""
        append_event(self.workdir, kind, **fields)
        if self._echo:
            detail = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"[agent {time.strftime('%H:%M:%S')}] {kind} {detail}".rstrip(), flush=True)


def _bnb_smoke(torch: Any) -> str:
    """A 4-bit NF4 matmul on the GPU, compared with the dequantised weights; "ok" or why not."""
    try:
        bnb: Any = importlib.import_module("bitsandbytes")

        layer = bnb.nn.Linear4bit(
            64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
        ).cuda()
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        y = layer(x)
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        ref = x @ weight.to(torch.bfloat16).t()
        err = float((y.float() - ref.float()).abs().max())
        return "ok" if torch.isfinite(y).all() and err < 0.5 else f"max error {err:.3g}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def check() -> dict[str, Any]:
    """What this machine offers the trainer; runs with only the standard library present."""
    info: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": None,
        "cuda": False,
        "gpus": [],
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "bnb_smoke": None,
        "missing": [],
        "errors": {},
    }
    info["missing"] = missing_requirements()
    # The MLX recipe's needs (train.backend: mlx): the client reads this list for such jobs.
    info["missing_mlx"] = missing_requirements(MLX_REQUIREMENTS)
    info["apple_silicon"] = is_apple_silicon()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if info["cuda"] else 0):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"name": props.name, "vram_gb": round(props.total_memory / _GIB, 1)}
            )
    except Exception as exc:  # report a broken torch, never raise: the client decides
        info["errors"]["torch"] = f"{type(exc).__name__}: {exc}"
    if info["cuda"] and info["bitsandbytes"]:
        import torch

        info["bnb_smoke"] = _bnb_smoke(torch)
    return info


def trainer_processes(workdir: Path) -> int:
    """How many trainer processes (GPUs) to start: ``LORABURST_GPUS`` (the GPUs the client
    rented; tests on CPU set it to ask for gloo processes), else the CUDA GPUs ``nvidia-smi``
    lists; one for a job that trains on one GPU (DPO/ORPO, MLX)."""
    if not _runs_ranks(_spec(workdir)):
        return 1
    wanted = os.environ.get(ENV_GPUS, "").strip()
    if wanted:
        try:
            return max(1, int(wanted))
        except ValueError:
            return 1
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 1
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))


def _spec(workdir: Path) -> dict[str, Any]:
    try:
        spec = json.loads((workdir / BUNDLE_DIR / "spec.json").read_text()).get("spec", {})
    except (OSError, ValueError):
        spec = {}
    return spec if isinstance(spec, dict) else {}


def _runs_ranks(spec: dict[str, Any]) -> bool:
    """Whether the job's recipe can run as ranks under torchrun (SFT on torch)."""
    objective = (spec.get("objective") or {}).get("type", "sft")
    return objective == "sft" and (spec.get("train") or {}).get("backend") != "mlx"


def fsdp_resume(workdir: Path, reporter: Reporter) -> str | None:
    """The checkpoint this job resumes from, by name, when it was written under FSDP (it
    resumes under FSDP again, even on one GPU); None otherwise.

    The checkpoint is the one the trainer will find: the newest here, else the newest in the
    job's object storage, downloaded now, once, before any rank starts (ranks downloading it
    side by side would race for the same folder).
    """
    spec = _spec(workdir)
    if not _runs_ranks(spec):
        return None
    from .training.checkpoints import resume_point, written_under_fsdp

    upload = os.environ.get(ENV_ARTIFACTS) or spec.get("artifacts")
    found = resume_point(workdir, str(upload) if upload else None, reporter)
    return found.name if found is not None and written_under_fsdp(found) else None


def _run_ranks(
    workdir: Path, n: int, watchdog: Watchdog, reporter: Reporter, *, why: str | None = None
) -> None:
    """The trainer as ``n`` ranks under torchrun; raises when they did not finish cleanly."""
    (workdir / RANK_STOP_FILE).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "loraburst.remote.rank", str(workdir)]  # fmt: skip
    env = {**os.environ, ENV_AGENT_PID: str(os.getpid())}
    reporter.event("launching", processes=n, launcher="torchrun", **({"why": why} if why else {}))
    # Its own process group: a signal to the agent's group leaves the ranks to stop at a step
    # boundary (through the stop file) and save; the agent ends the group itself below.
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, start_new_session=True)
    told = False
    try:
        while proc.poll() is None:
            reason = watchdog.stop_reason
            if reason is not None and not told:
                write_atomic(workdir / RANK_STOP_FILE, reason)
                told = True
            time.sleep(0.5)
    finally:
        _end_group(proc)
    state = _read_state(workdir)
    if state is not None:
        reporter.state = state  # the ranks' last word (step, loss), for what the agent writes
    if proc.returncode != 0:
        if state is not None and state.phase == "failed":
            raise _RanksFailed(None)  # rank 0 said why
        raise _RanksFailed(
            f"a training rank failed: torchrun exited with {proc.returncode} and ended every "
            "rank (see agent.log for the rank's traceback)"
        )


class _RanksFailed(RuntimeError):
    """The ranks ended without finishing; ``None``: rank 0 has already reported why."""

    def __init__(self, message: str | None) -> None:
        super().__init__(message or "")
        self.reported = message is None


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to torchrun's process group (its ranks), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return  # torchrun and every rank are gone
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _read_state(workdir: Path) -> State | None:
    try:
        return State.from_json((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def run(workdir: Path) -> int:
    """Run one job in ``workdir``; returns the process exit code (0 done/stopped, 1 failed)."""
    # Micro-batches change shape from step to step (padding-free rows): growable segments keep
    # the caching allocator from fragmenting (set before torch is imported).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    workdir = Path(workdir).resolve()
    # A manifest means "complete": one left by an earlier (stopped) run is not this run's.
    (workdir / MANIFEST_FILE).unlink(missing_ok=True)
    watchdog = Watchdog(workdir)
    reporter = Reporter(workdir, stop_source=lambda: watchdog.stop_reason)
    reporter.update(phase="preparing")
    reporter.event("agent_started", pid=os.getpid(), protocol_version=PROTOCOL_VERSION)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        watchdog.request_stop("signal")
        # A second signal is not asked twice: the default handler ends the process.
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watchdog.start()
    code = 0
    try:
        from . import telemetry

        reporter.telemetry = telemetry.start(reporter)  # telemetry hook: GPU samples
        processes = trainer_processes(workdir)
        fsdp = fsdp_resume(workdir, reporter)
        if processes > 1 or fsdp is not None:
            # One GPU resuming an FSDP checkpoint runs FSDP on one rank: Trainer loads FSDP's
            # model and optimizer state only under FSDP.
            why = f"{fsdp} was written under FSDP" if processes == 1 else None
            _run_ranks(workdir, processes, watchdog, reporter, why=why)
        else:
            from .trainer import run as train

            train(workdir, reporter)
    except _RanksFailed as exc:
        if not exc.reported:
            error = {"type": "TrainerError", "message": str(exc)}
            reporter.update(phase="failed", error=error)
            reporter.event("failed", error=error)
        code = 1
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        reporter.update(phase="failed", error=error_dict(exc))
        reporter.event("failed", error=error_dict(exc))
        code = 1
    finally:
        if reporter.telemetry is not None:
            reporter.telemetry.close()
        watchdog.close()
        sys.stdout.flush()
    watchdog.linger()
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``agent WORKDIR`` runs the job, ``agent --check`` prints the environment."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        print(json.dumps(check(), sort_keys=True), flush=True)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m loraburst.remote.agent WORKDIR | --check", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
