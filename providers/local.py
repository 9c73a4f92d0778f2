"""The local provider: the same agent, as a subprocess on this machine's GPU (or CPU).

No renting and no SSH: the "instance" is a run folder under ``$LORABURST_HOME/runs`` and the
agent runs detached (its own session), so it survives the client like a remote agent would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

from loraburst._cost.gpus import apple_gpu_memory_gib
from loraburst._state.disk import local_io, remove_quietly
from loraburst._state.home import runs_dir
from loraburst.remote.backends import is_apple_silicon, resolve_backend
from loraburst.remote.protocol import BUNDLE_DIR, LOG_FILE, pid_alive, safe_extract

from ._base import Capabilities, Host, LaunchRequest, Machine, Offer, SelfTermination

__all__ = ["LocalHost", "LocalProvider", "detect_apple_gpu", "detect_gpus", "pid_alive"]

_PID_FILE = "agent.pid"


def detect_apple_gpu(
    brand: str | None = None, memory_bytes: int | None = None
) -> list[tuple[str, float]]:
    """This Mac's Apple Silicon GPU as ``[(chip, GPU memory GiB)]``, e.g. ``("M4 Max", 96.0)``.

    The chip comes from ``sysctl machdep.cpu.brand_string`` ("Apple M4 Max"), the memory from
    ``hw.memsize``; the GPU may use Metal's working set of it (:func:`apple_gpu_memory_gib`).
    ``brand`` and ``memory_bytes`` replace the sysctl reads (another Mac's values). Empty when
    sysctl is missing or says something else.
    """
    if brand is None or memory_bytes is None:
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.splitlines()
            brand, memory_bytes = out[0], int(out[1])
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return []
    if not brand.startswith("Apple M"):
        return []
    chip = brand.removeprefix("Apple ").strip()
    return [(chip, apple_gpu_memory_gib(memory_bytes / 1024**3))]


def detect_gpus() -> list[tuple[str, float]]:
    """Local GPUs as ``(name, vram_gb)``: an Apple Silicon Mac's GPU (:func:`detect_apple_gpu`),
    else the CUDA GPUs nvidia-smi lists (no torch import)."""
    if is_apple_silicon():
        return detect_apple_gpu()
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append(
                (
                    name.strip().removeprefix("NVIDIA ").removeprefix("GeForce "),
                    round(float(mib) / 1024, 1),
                )
            )
        except ValueError:
            continue
    return gpus


def _by_model(gpus: list[tuple[str, float]]) -> list[tuple[tuple[str, float], int]]:
    """``[((name, vram), how many), ...]`` of this machine's cards, by model."""
    counts: dict[tuple[str, float], int] = {}
    for g in gpus:
        counts[g] = counts.get(g, 0) + 1
    return sorted(counts.items())


class LocalHost:
    """A run folder on this machine, driven with plain files and a subprocess."""

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        # The agent runs on this machine, in this environment when ``python`` is ours: the
        # runner then checks the trainer's dependencies here instead of in a new process.
        self.same_environment = True
        self.workdir = str(workdir)
        self._dir = workdir
        self._python = python
        self._dir.mkdir(parents=True, exist_ok=True)

    @property
    def python(self) -> str:
        return self._python

    def upload_bundle(self, local_path: Path, sha256: str) -> bool:
        marker = self._dir / BUNDLE_DIR / ".sha256"
        if marker.is_file() and marker.read_text() == sha256:
            return False
        shutil.rmtree(self._dir / BUNDLE_DIR, ignore_errors=True)
        safe_extract(local_path, self._dir / BUNDLE_DIR)
        marker.write_text(sha256)
        return True

    def provide_model(self, local_dir: Path, digest: Callable[[], str]) -> str:
        """The folder itself: the agent reads it in place (no copy, no hash)."""
        return str(local_dir)

    def start_agent(self, env: Mapping[str, str]) -> None:
        full_env = {**os.environ, **env}
        code = str(self._dir / BUNDLE_DIR / "code")
        full_env["PYTHONPATH"] = code + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self._dir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [self._python, "-m", "loraburst.remote.agent", self.workdir],
                cwd=self._dir,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (self._dir / _PID_FILE).write_text(str(proc.pid))
        self._proc = proc

    def _pid(self) -> int | None:
        try:
            return int((self._dir / _PID_FILE).read_text())
        except (OSError, ValueError):
            return None

    def agent_alive(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            return proc.poll() is None
        pid = self._pid()
        return pid is not None and pid_alive(pid)

    def stop_agent(self) -> None:
        """Send SIGTERM to the agent's process group (used when a local job is cancelled)."""
        pid = self._pid()
        if pid is not None and self.agent_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)

    def read_text(self, rel: str) -> str | None:
        try:
            return (self._dir / rel).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        path = self._dir / rel
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def fetch_tree(self, rel: str, dest: Path) -> None:
        """Copy; a local write failure is a ``LocalStorageError`` and leaves nothing at ``dest``."""
        src = self._dir / rel
        try:
            with local_io(dest):
                if dest.exists():
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                dest.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dest)
                else:
                    shutil.copy2(src, dest)
        except BaseException:
            remove_quietly(dest)
            raise

    def run(self, command: str, timeout: float = 600.0) -> tuple[int, str, str]:
        proc = subprocess.run(
            command, shell=True, cwd=self._dir, capture_output=True, text=True, timeout=timeout
        )
        return proc.returncode, proc.stdout, proc.stderr

    def close(self) -> None:
        return None


class LocalProvider:
    """Runs jobs on this machine: its CUDA GPUs, an Apple Silicon Mac's GPU (with MLX), else
    the CPU (tiny models).

    Args:
        python: the interpreter that runs the agent (default: this one).
        apple_silicon: whether this machine is an Apple Silicon Mac (default: ask the platform);
            it decides what ``train.backend: auto`` resolves to (``capabilities.backend``).
    """

    name: ClassVar[str] = "local"
    # This machine: no SSH key, the run folder is the client's own, nothing installed on the
    # user's environment behind their back, nothing to terminate itself.
    capabilities: Capabilities = Capabilities(
        ssh=False,
        same_machine=True,
        installs_packages=False,
        self_terminates=False,
        gpu_counts=(0, 1),  # the CPU or one GPU; __init__ adds the counts this machine has
        needs_credentials=False,  # always there: the last resort of provider="auto"
        billed=False,
    )
    unsupported: ClassVar[Mapping[str, str]] = {
        "spot": "a local machine cannot be preempted or bid on",
        "self_terminate": "there is no instance to terminate; the agent just exits",
    }

    def __init__(self, *, python: str | None = None, apple_silicon: bool | None = None) -> None:
        self._python = python or sys.executable
        self._machines: dict[str, Machine] = {}
        self._apple = is_apple_silicon() if apple_silicon is None else apple_silicon
        # What ``train.backend: auto`` trains with here: "mlx" on Apple Silicon (no CUDA, and
        # torch's CPU path is far too slow for a 7B model), else "torch".
        # GPUs a job may train on here: the CPU, one card, or (torchrun) up to every card of
        # one model this machine has.
        cards = 0 if self._apple else max((n for _, n in _by_model(detect_gpus())), default=0)
        self.capabilities = dataclasses.replace(
            type(self).capabilities,
            backend=resolve_backend("auto", apple_silicon=self._apple),
            gpu_counts=(0, 1, *range(2, cards + 1)),
        )

    def offers(self) -> list[Offer]:
        gpus = detect_apple_gpu() if self._apple else detect_gpus()
        if not gpus:
            return [
                Offer(
                    provider="local",
                    gpu="cpu",
                    gpu_count=0,
                    vram_gb=0.0,
                    price_per_hour=0.0,
                    instance_type="cpu",
                    price_source="local",
                )
            ]
        # Per card model: one card, and all of them (torchrun) where there are several.
        return [
            Offer(
                provider="local",
                gpu=name,
                gpu_count=n,
                vram_gb=vram,
                price_per_hour=0.0,
                instance_type=name,
                price_source="local",
            )
            for (name, vram), count in _by_model(gpus)
            for n in sorted({1, count})
        ]

    def launch(self, request: LaunchRequest) -> Machine:
        m = Machine(
            provider="local",
            id=request.tag,
            tag=request.tag,
            status="running",
            python=self._python,
            workdir_root=str(runs_dir()),
        )
        self._machines[m.id] = m
        return m

    def get(self, machine_id: str) -> Machine | None:
        """Running while this provider launched it or its agent still runs; else gone."""
        if machine_id in self._machines:
            return self._machines[machine_id]
        host = self._host_for(machine_id)
        if host is not None and host.agent_alive():
            return Machine(
                provider="local",
                id=machine_id,
                tag=machine_id,
                status="running",
                python=self._python,
                workdir_root=str(runs_dir()),
            )
        return None

    def _host_for(self, tag: str) -> LocalHost | None:
        # Tags are "lb-<job id>-<attempt>" and the run folder is named by the job id.
        job_id = tag.removeprefix("lb-").rpartition("-")[0]
        folder = runs_dir() / job_id
        return LocalHost(folder, python=self._python) if job_id and folder.is_dir() else None

    def find(self, tag: str) -> Machine | None:
        return self._machines.get(tag)

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return [m for t, m in self._machines.items() if t.startswith(prefix)]

    def terminate(self, machine_id: str) -> None:
        """Stop the run's agent if it is still running (a cancelled or abandoned local job)."""
        self._machines.pop(machine_id, None)
        host = self._host_for(machine_id)
        if host is not None:
            host.stop_agent()

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """None: a local run is stopped through its process, never by terminating a machine."""
        return None

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        return LocalHost(Path(workdir), python=machine.python)
