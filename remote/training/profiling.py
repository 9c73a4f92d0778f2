"""Profiling a few steps of a real run, for whoever asks where a step's time goes.

Set ``LORABURST_PROFILE_STEPS=FIRST:LAST`` in the agent's environment (``FIRST`` and ``LAST``
optimizer steps, 1-based, both profiled) and the trainer runs those steps under
``torch.profiler`` and writes ``profile.json`` to ``LORABURST_PROFILE_DIR`` (default: the job's
work folder): wall and GPU time a step, the GPU's busy share, GPU time by kernel kind, the top
kernels, the top host operations, and the CUDA runtime calls that stall the host (allocations,
synchronisations). It is the trainer's real path, data and all, not a benchmark loop; steps
outside the window run untraced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["ENV_DIR", "ENV_STEPS", "StepProfiler", "from_env", "summarise"]

ENV_STEPS = "LORABURST_PROFILE_STEPS"
ENV_DIR = "LORABURST_PROFILE_DIR"

# Kernel kinds by name fragment, first match wins (the order matters: "flash" before "gemm").
_KINDS = (
    ("memcpy", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention", "mha")),
    ("dequant", ("dequant", "kdequantize", "nf4")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "splitk", "sm90", "sm80")),
    ("triton", ("triton",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
)
# Runtime calls that make the host wait (or that show the allocator working at its limit).
_STALLS = ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize",
           "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "cudaHostAlloc",
           "cuMemCreate", "cuMemMap", "cuMemUnmap", "cuMemRelease", "cuMemSetAccess")  # fmt: skip


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name: gemm, attention, dequant, triton, ... or other."""
    low = name.lower()
    for kind, fragments in _KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def summarise(averages: Any, wall_s: float, steps: int, top: int = 30) -> dict[str, Any]:
    """A JSON-able summary of ``torch.profiler``'s ``key_averages()`` over ``steps`` steps."""
    kinds: dict[str, float] = {}
    kernels: list[tuple[float, int, str]] = []
    host: list[tuple[float, int, str]] = []
    stalls: dict[str, dict[str, float]] = {}
    for ev in averages:
        device_us = float(getattr(ev, "self_device_time_total", 0.0) or 0.0)
        if device_us > 0 and "cuda" in str(getattr(ev, "device_type", "")).lower():
            kind = kernel_kind(ev.key)
            kinds[kind] = kinds.get(kind, 0.0) + device_us
            kernels.append((device_us, int(ev.count), ev.key))
            continue
        cpu_us = float(getattr(ev, "self_cpu_time_total", 0.0) or 0.0)
        if ev.key in _STALLS:
            stalls[ev.key] = {"calls_per_step": round(ev.count / steps, 1),
                              "ms_per_step": round(cpu_us / 1e3 / steps, 2)}  # fmt: skip
        elif cpu_us > 0:
            host.append((cpu_us, int(ev.count), ev.key))
    busy = sum(kinds.values()) / 1e6
    kernels.sort(reverse=True)
    host.sort(reverse=True)

    def rows(items: list[tuple[float, int, str]]) -> list[dict[str, Any]]:
        return [{"ms_per_step": round(us / 1e3 / steps, 2), "calls_per_step": round(n / steps, 1),
                 "name": name[:120]} for us, n, name in items[:top]]  # fmt: skip

    return {
        "steps": steps,
        "wall_s_per_step": round(wall_s / steps, 4),
        "gpu_s_per_step": round(busy / steps, 4),
        "gpu_busy_share": round(busy / wall_s, 3) if wall_s > 0 else None,
        "ms_per_step_by_kind": {k: round(v / 1e3 / steps, 2) for k, v in sorted(kinds.items())},
        "top_kernels": rows(kernels),
        "top_host_ops": rows(host),
        "runtime_stalls": stalls,
    }


class StepProfiler:
    """Traces optimizer steps ``first`` to ``last`` (1-based) and writes ``profile.json``."""

    def __init__(self, first: int, last: int, folder: Path) -> None:
        if not 1 <= first <= last:
            raise ValueError(f"{ENV_STEPS} wants FIRST:LAST with 1 <= FIRST <= LAST, got "
                             f"{first}:{last}")  # fmt: skip
        self.first, self.last, self.folder = first, last, folder
        self._prof: Any = None
        self._t0 = 0.0
        self.written: Path | None = None
        self.summary: dict[str, Any] | None = None  # what was written, once it is

    def step_begin(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based) starts."""
        if step != self.first or self._prof is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()  # the window starts with an idle GPU
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        """Call after optimizer step ``step`` ended; closes the window at ``last``."""
        if step != self.last or self._prof is None:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the last step's kernels finish inside the window
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        summary = summarise(self._prof.key_averages(), wall, self.last - self.first + 1)
        summary["window"] = [self.first, self.last]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = self.folder / "profile.json"
        self.written.write_text(json.dumps(summary, indent=1) + "\n")
        self.summary = summary
        self._prof = None


def from_env(workdir: Path) -> StepProfiler | None:
    """The profiler ``LORABURST_PROFILE_STEPS`` asks for, or None when it is unset.

    Raises:
        ValueError: the variable is not ``FIRST:LAST`` (the message says what it got).
    """
    raw = os.environ.get(ENV_STEPS, "").strip()
    if not raw:
        return None
    try:
        first, _, last = raw.partition(":")
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"{ENV_STEPS}={raw!r}: expected FIRST:LAST, e.g. 10:12") from None
    folder = Path(os.environ.get(ENV_DIR) or workdir)
    return StepProfiler(a, b, folder)
