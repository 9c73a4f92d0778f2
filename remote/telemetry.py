"""GPU telemetry: utilisation, memory and power sampled through the run, and the run's timeline.

The agent starts a :class:`Telemetry` thread beside the watchdog. Every ``interval_s`` it reads
each GPU through a :class:`GpuSource` (NVML, via ``nvidia-ml-py``'s ``pynvml``, imported here
only when the agent starts it) and appends a ``gpu`` event; the newest sample rides on every
``step`` event and in ``state.json`` (``gpu_util``, ``gpu_mem_gb``), where the client's progress
line shows it. A run whose GPU sat mostly idle while training gets one ``warning`` event.

At the end :func:`record` folds the events into ``metrics["timeline"]`` (steps, GPU samples and
phase boundaries, thinned to at most :data:`MAX_POINTS` each) and ``metrics["telemetry"]`` (a
summary), so the report on the client is drawn from the verified metrics alone.

Standard library only at import (the agent runs before anything else is known to exist).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .protocol import EVENTS_FILE, METRICS_FILE, read_events, write_atomic

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = [
    "GpuSource",
    "NvmlSource",
    "Telemetry",
    "latest",
    "open_source",
    "record",
    "start",
    "timeline",
]

_GIB = 1024**3
INTERVAL_S = 5.0  # one sample per GPU every 5 s: ~60 bytes an event, 70 KB an hour
IDLE_UTIL = 30.0  # mean utilisation (%) while training below which the GPU counts as idle
IDLE_MIN_SAMPLES = 6  # ... over at least this many samples (30 s), so warm-up alone never warns
MAX_POINTS = 2000  # per series in metrics.json: a 100k-step run stays a few hundred KB
# Phases whose start the timeline marks (the agent's phase events, in walking order).
PHASE_EVENTS = ("loading", "training", "evaluating", "exporting", "done", "stopped", "failed")


class GpuSource(Protocol):
    """What telemetry reads: one dict per GPU with ``util`` (%), ``mem_gb``, ``mem_total_gb``
    and ``power_w`` (None when the device does not say)."""

    def sample(self) -> list[dict[str, float | None]]: ...

    def close(self) -> None: ...


class NvmlSource:
    """GPUs through NVML. ``nvml`` is the ``pynvml`` module (``nvidia-ml-py``) or any object
    with the same functions (the tests' fake device).

    Raises:
        Exception: whatever ``nvmlInit`` raises (no driver, no device): the caller turns it off.
    """

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]

    def sample(self) -> list[dict[str, float | None]]:
        out: list[dict[str, float | None]] = []
        for h in self.handles:
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                power: float | None = self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:  # some boards do not report power; the rest is still worth it
                power = None
            out.append(
                {
                    "util": float(util.gpu),
                    "mem_gb": round(mem.used / _GIB, 3),
                    "mem_total_gb": round(mem.total / _GIB, 3),
                    "power_w": round(power, 1) if power is not None else None,
                }
            )
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # shutting down a library that is going away anyway
            return


def open_source() -> tuple[GpuSource | None, str]:
    """NVML when this machine has it: ``(source, "")``, else ``(None, why not)``."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed on the instance (pip install nvidia-ml-py)"
    try:
        source = NvmlSource(pynvml)
    except Exception as exc:  # NVMLError: no driver / no GPU, as on a CPU machine
        return None, f"NVML unavailable: {exc}"
    if not source.handles:
        source.close()
        return None, "NVML sees no GPU"
    return source, ""


class Telemetry:
    """Samples ``source`` every ``interval_s`` from a thread until :meth:`close`.

    Each sample becomes a ``gpu`` event; :meth:`latest` is the newest one in the fields that
    step events and ``state.json`` carry. Reporting never stops training: a failing read is
    logged once and sampling stops.
    """

    def __init__(
        self, source: GpuSource, reporter: Reporter, *, interval_s: float = INTERVAL_S
    ) -> None:
        self.source, self.reporter, self.interval_s = source, reporter, interval_s
        self._latest: dict[str, float | None] = {}
        self._training_utils: list[float] = []
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)

    def start(self) -> Telemetry:
        self._thread.start()
        return self

    def latest(self) -> dict[str, float | None]:
        """The newest sample as ``gpu_util`` (mean %), ``gpu_mem_gb`` (max), ``gpu_power_w``."""
        return dict(self._latest)

    def close(self) -> None:
        """Stop sampling (one last sample first) and warn if training left the GPU idle."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.source.close()
        self._idle_warning()

    def _loop(self) -> None:
        while True:
            try:
                self._sample()
            except Exception as exc:  # telemetry must never take training down
                print(f"[agent] GPU telemetry stopped: {exc!r}", flush=True)
                return
            if self._stop.wait(self.interval_s):
                return

    def _sample(self) -> None:
        gpus = self.source.sample()
        if not gpus:
            return
        utils = [g["util"] for g in gpus if g["util"] is not None]
        mems = [g["mem_gb"] for g in gpus if g["mem_gb"] is not None]
        powers = [g["power_w"] for g in gpus if g["power_w"] is not None]
        util = round(sum(utils) / len(utils), 1) if utils else None
        self._latest = {
            "gpu_util": util,
            "gpu_mem_gb": max(mems) if mems else None,
            "gpu_power_w": round(sum(powers), 1) if powers else None,
        }
        if util is not None and self.reporter.state.phase == "training":
            self._training_utils.append(util)
        self.reporter.event("gpu", t=round(time.time(), 3), gpus=gpus, **self._latest)

    def _idle_warning(self) -> None:
        utils = self._training_utils
        if self._warned or len(utils) < IDLE_MIN_SAMPLES:
            return
        mean = sum(utils) / len(utils)
        if mean < IDLE_UTIL:
            self._warned = True
            self.reporter.event(
                "warning",
                gpu_idle=True,
                message=f"the GPU was mostly idle while training (mean utilisation {mean:.0f}% "
                f"over {len(utils)} samples): the run is bound by something else (data, the "
                "CPU, a small micro-batch); a smaller GPU would cost less",
            )


def start(reporter: Reporter) -> Telemetry | None:
    """Start sampling this machine's GPUs for ``reporter`` (its ``telemetry``), or say in a
    ``telemetry`` event why not (no NVML on a CPU machine)."""
    source, why = open_source()
    if source is None:
        reporter.event("telemetry", off=why)
        return None
    reporter.event("telemetry", source="nvml", gpus=len(source.sample()))
    return Telemetry(source, reporter).start()


def latest(reporter: Any) -> dict[str, float | None]:
    """The reporter's newest GPU sample fields, or nothing when telemetry is off."""
    telemetry = getattr(reporter, "telemetry", None)
    return telemetry.latest() if telemetry is not None else {}


def _thin(points: list[Any], limit: int = MAX_POINTS) -> list[Any]:
    """At most ``limit`` points, evenly spread, the last one always kept."""
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return [*picked, points[-1]]


def timeline(workdir: Path) -> dict[str, Any]:
    """The run's series from ``events.jsonl``: ``steps`` (t, step, loss, tokens/s, GPU %),
    ``gpu`` (t, util %, memory GiB, power W), ``phases`` ({phase: first t}), ``warnings``."""
    path = workdir / EVENTS_FILE
    events = list(read_events(path.read_text(encoding="utf-8"))) if path.is_file() else []
    steps, gpu, phases, warnings = [], [], {}, []
    off = None
    for e in events:
        kind = e.get("kind")
        if kind == "step":
            steps.append(
                [e.get("t", e.get("ts")), e.get("step"), e.get("loss"), e.get("tokens_per_s"),
                 e.get("gpu_util")]
            )  # fmt: skip
        elif kind == "gpu":
            gpu.append([e.get("t", e.get("ts")), e.get("gpu_util"), e.get("gpu_mem_gb"),
                        e.get("gpu_power_w")])  # fmt: skip
        elif kind == "telemetry":
            off = e.get("off")
        elif kind == "warning" and isinstance(e.get("message"), str):
            warnings.append(e["message"])
        if kind == "export_started":
            kind = "exporting"
        if kind in PHASE_EVENTS and kind not in phases:
            phases[kind] = e.get("ts")
        if kind == "agent_started" and "started" not in phases:
            phases["started"] = e.get("ts")
    return {
        "steps": _thin(steps),
        "step_fields": ["t", "step", "loss", "tokens_per_s", "gpu_util"],
        "gpu": _thin(gpu),
        "gpu_fields": ["t", "util", "mem_gb", "power_w"],
        "phases": phases,
        "warnings": warnings,
        "off": off,
    }


def summary(line: dict[str, Any]) -> dict[str, Any]:
    """Mean GPU utilisation while training, peak memory and mean power (None when unknown)."""
    start = line["phases"].get("training")
    end = next((line["phases"][p] for p in PHASE_EVENTS[2:] if p in line["phases"]), None)
    during = [
        s
        for s in line["gpu"]
        if start is not None and s[0] >= start and (end is None or s[0] <= end)
    ]
    utils = [s[1] for s in during if s[1] is not None]
    mems = [s[2] for s in line["gpu"] if s[2] is not None]
    powers = [s[3] for s in during if s[3] is not None]
    mean_util = sum(utils) / len(utils) if utils else None
    return {
        "samples": len(line["gpu"]),
        "mean_util_training": round(mean_util, 1) if mean_util is not None else None,
        "peak_mem_gb": max(mems) if mems else None,
        "mean_power_w": round(sum(powers) / len(powers), 1) if powers else None,
        "idle": mean_util is not None and len(utils) >= IDLE_MIN_SAMPLES and mean_util < IDLE_UTIL,
        "off": line.get("off"),
    }


def record(workdir: Path, metrics: dict[str, Any]) -> None:
    """Fold the run's events into ``metrics`` (``timeline``, ``telemetry``) and rewrite
    ``metrics.json`` (before the manifest seals it)."""
    line = timeline(workdir)
    line["phases"]["sealed"] = round(time.time(), 3)  # the instance's work ends here
    metrics["timeline"] = line
    metrics["telemetry"] = summary(line)
    write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
