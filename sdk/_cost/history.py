"""Estimates that learn from every job: what was planned, what was measured, and the correction.

For every attempt the ledger keeps the estimate its offer was chosen on (``planned``) and, once
the job is back, what it measured (``measured``: tokens/s, peak memory, each phase's seconds,
dollars). From the user's own finished jobs the estimator learns a correction per
``(provider, GPU, model family)``:

- ``speed``: measured tokens/s over the model's raw tokens/s (training time scales by 1/speed);
- ``overhead``: measured seconds outside training (boot, upload, load, evaluation, export,
  pull, teardown) over the model's setup and export seconds.

Each is the geometric mean of the job ratios, pulled toward 1 while few jobs back it
(``ratio ** (n / (n + PRIOR_JOBS))``) and clamped to :data:`BOUNDS`, so one odd run cannot
wreck the next estimate. Ratios are taken against the *raw* model (the record keeps the
factors that were applied), so corrections never compound. The estimator applies them unless
asked not to (``loraburst estimate --no-history``) and says so in a note, with the job count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .._exceptions import EstimateError
from . import billing as billing

if TYPE_CHECKING:
    from .._state.ledger import Ledger
    from .estimate import Estimate, EstimateRow
    from .shapes import ModelShape

__all__ = [
    "BOUNDS",
    "Correction",
    "apply",
    "corrections",
    "family",
    "measured",
    "phases",
    "pinned",
    "planned",
    "record_measured",
    "record_planned",
]

BOUNDS = (0.5, 2.0)  # a correction never more than halves or doubles the raw model
PRIOR_JOBS = 2.0  # weight of the raw model, in jobs: one job moves it a third of the way (log)
RECENT_JOBS = 20  # per key: newer jobs say more about today's images and drivers
_FINISHED = ("succeeded", "budget_exhausted", "stopped")


def family(ms: ModelShape) -> str:
    """A model family: its architecture and size class (``"llama 4-15B"``)."""
    billions = ms.params / 1e9
    size = next(
        (label for top, label in ((1, "<1B"), (4, "1-4B"), (15, "4-15B"), (40, "15-40B"))
         if billions < top),
        "40B+",
    )  # fmt: skip
    return f"{ms.config.get('model_type', 'unknown')} {size}"


def _family_of(model: str, revision: str | None = None) -> str:
    from .shapes import model_shape

    try:
        return family(model_shape(model, revision))
    except EstimateError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Correction:
    """The learned factors for one (provider, GPU, model family), from ``jobs`` jobs."""

    provider: str
    gpu: str
    family: str
    speed: float
    overhead: float
    jobs: int

    def describe(self) -> str:
        return (
            f"{self.provider} {self.gpu} ({self.family}): speed x{self.speed:.2f}, "
            f"overhead x{self.overhead:.2f} from {self.jobs} finished job"
            f"{'s' if self.jobs != 1 else ''}"
        )


def _learned(ratios: list[float]) -> float:
    ratios = [r for r in ratios if r > 0 and math.isfinite(r)]
    if not ratios:
        return 1.0
    mean_log = sum(math.log(r) for r in ratios) / len(ratios)
    factor = math.exp(mean_log * len(ratios) / (len(ratios) + PRIOR_JOBS))
    return min(BOUNDS[1], max(BOUNDS[0], factor))


# Corrections held fixed while a batch runs (see pinned()); None: read the ledger each time.
_PINNED: ContextVar[dict[tuple[str, str, str], Correction] | None] = ContextVar(
    "loraburst_history_pinned", default=None
)


@contextmanager
def pinned(ledger: Ledger | None = None) -> Iterator[None]:
    """Estimates made inside (in this context, and in contexts copied from it) use the
    corrections as they stand on entry.

    A batch reserves each job's upper cost bound and hands it to the job as its ``max_cost``;
    the job then places itself again. Without a pin, a job finishing in between moves the
    correction, the job's bound can rise past its reservation, and it fails before renting.
    """
    token = _PINNED.set(corrections(ledger))
    try:
        yield
    finally:
        _PINNED.reset(token)


def corrections(ledger: Ledger | None = None) -> dict[tuple[str, str, str], Correction]:
    """Every key's correction from the ledger's finished jobs with a plan and a measurement
    (those pinned by :func:`pinned`, when inside it)."""
    from .._state.ledger import Ledger

    held = _PINNED.get()
    if held is not None:
        return held

    ledger = ledger or Ledger()
    speed: dict[tuple[str, str, str], list[float]] = {}
    overhead: dict[tuple[str, str, str], list[float]] = {}
    for status, plan, got in ledger.outcomes():  # newest first
        if status not in _FINISHED or not plan or not got:
            continue
        key = (str(plan.get("provider")), str(plan.get("gpu")), str(plan.get("family")))
        if len(speed.setdefault(key, [])) >= RECENT_JOBS:
            continue
        raw_tps = _num(plan.get("raw_tokens_per_s"))
        tps = _num(got.get("tokens_per_s"))
        if raw_tps and tps:
            speed[key].append(tps / raw_tps)
        raw_over = _num(plan.get("raw_overhead_s"))
        over = _num(got.get("overhead_s"))
        if raw_over and over:
            overhead.setdefault(key, []).append(over / raw_over)
    out = {}
    for key, ratios in speed.items():
        n = max(len(ratios), len(overhead.get(key, [])))
        if n:
            out[key] = Correction(*key, _learned(ratios), _learned(overhead.get(key, [])), n)
    return out


def _num(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok and math.isfinite(value) else None


def apply(est: Estimate, ms: ModelShape, ledger: Ledger | None = None) -> Estimate:
    """``est`` with each row's time and cost corrected by its key's learned factors, re-sorted,
    and a note naming each correction and how many jobs it comes from."""
    table = corrections(ledger)
    fam = family(ms)
    used: list[Correction] = []
    rows = []
    for r in est.rows:
        c = table.get((r.provider, r.gpu, fam))
        if c is None or not r.fits:
            rows.append(r)
            continue
        used.append(c)
        rows.append(_corrected(r, c))
    if not used:
        return est
    rows.sort(key=lambda r: (not r.feasible, r.cost_usd, r.total_s))
    notes = [
        *est.notes,
        "learned from your jobs (loraburst estimate --no-history for the raw model): "
        + "; ".join(c.describe() for c in used),
    ]
    return dataclasses.replace(est, rows=rows, notes=notes)


def _corrected(r: EstimateRow, c: Correction) -> EstimateRow:
    train = r.train_s / c.speed
    other = (r.total_s - r.train_s) * c.overhead
    scale = (train + other) / r.total_s if r.total_s else 1.0

    def cost(seconds: float) -> float:
        return round(billing.billed_cost(r.price_per_hour, seconds, r.billing_increment_s), 4)

    total, low, high = train + other, r.total_low_s * scale, r.total_high_s * scale
    note = f"history x{c.speed:.2f} speed, x{c.overhead:.2f} overhead ({c.jobs} jobs)"
    return dataclasses.replace(
        r,
        tokens_per_s=round(r.tokens_per_s * c.speed, 1),
        train_s=round(train, 1),
        setup_s=round(r.setup_s * c.overhead, 1),
        export_s=round(r.export_s * c.overhead, 1),
        total_s=round(total, 1),
        total_low_s=round(low, 1),
        total_high_s=round(high, 1),
        cost_usd=cost(total),
        cost_low_usd=cost(low),
        cost_high_usd=cost(high),
        note="; ".join(n for n in (r.note, note) if n),
    )


# -- what the ledger keeps per job ----------------------------------------------------------
def planned(row: EstimateRow, fam: str, applied: Correction | None) -> dict[str, Any]:
    """The estimate an attempt was chosen on, with the raw model's figures beside it."""
    speed = applied.speed if applied else 1.0
    over = applied.overhead if applied else 1.0
    return {
        "provider": row.provider,
        "gpu": row.gpu,
        "family": fam,
        "price_per_hour": row.price_per_hour,
        "tokens_per_s": row.tokens_per_s,
        "peak_vram_gb": row.peak_vram_gb,
        "steps": row.steps,
        "train_s": row.train_s,
        "setup_s": row.setup_s,
        "export_s": row.export_s,
        "total_s": row.total_s,
        "cost_usd": row.cost_usd,
        "cost_low_usd": row.cost_low_usd,
        "cost_high_usd": row.cost_high_usd,
        "raw_tokens_per_s": row.tokens_per_s / speed,
        "raw_overhead_s": (row.total_s - row.train_s) / over,
        "correction": dataclasses.asdict(applied) if applied else None,
    }


# Client-side phases (Attempt.durations) and instance-side phase events -> the report's phases.
_CLIENT_PHASES = {
    "boot": ("provision",),
    "upload": ("connect", "upload", "bootstrap", "model_upload"),
    "pull": ("pull",),
    "teardown": ("teardown",),
}


def phases(metrics: Mapping[str, Any], durations: Mapping[str, float]) -> dict[str, float]:
    """Seconds per phase: boot, upload (with the stack check), load, train, evaluate, export
    (from the instance's timeline), pull and teardown (measured here)."""
    out: dict[str, float] = {}
    for name, keys in _CLIENT_PHASES.items():
        seconds = sum(float(durations.get(k, 0.0)) for k in keys)
        if any(k in durations for k in keys):
            out[name] = round(seconds, 3)
    marks = (metrics.get("timeline") or {}).get("phases") or {}
    order = [("load", "loading"), ("train", "training"), ("evaluate", "evaluating"),
             ("export", "exporting")]  # fmt: skip
    ends = [marks.get(k) for k in ("training", "evaluating", "exporting", "sealed")]
    for i, (name, start_key) in enumerate(order):
        start = marks.get(start_key)
        end = next((e for e in ends[i:] if isinstance(e, (int, float))), None)
        if isinstance(start, (int, float)) and end is not None and end >= start:
            out[name] = round(end - start, 3)
    return out


def measured(
    metrics: Mapping[str, Any], durations: Mapping[str, float], cost_usd: float
) -> dict[str, Any]:
    """What a finished job measured: tokens/s, peak memory, phases, seconds and dollars."""
    ph = phases(metrics, durations)
    total = float(durations.get("total", 0.0))
    train = ph.get("train", float(metrics.get("train_runtime_s") or 0.0))
    tele = metrics.get("telemetry") or {}
    return {
        "tokens_per_s": metrics.get("tokens_per_s"),
        "peak_vram_gb": metrics.get("peak_vram_gb") or tele.get("peak_mem_gb"),
        "gpu_util": tele.get("mean_util_training"),
        "phases": ph,
        "train_s": round(train, 3),
        "total_s": round(total, 3),
        "overhead_s": round(max(0.0, total - train), 3) if total else None,
        "cost_usd": cost_usd,
    }


def record_planned(ledger: Ledger, job_id: str, provider: str, row: EstimateRow | None) -> None:
    """Keep the estimate an attempt was chosen on (nothing for the unestimated local CPU)."""
    if row is None:
        return
    job = ledger.job(job_id)
    spec = json.loads(job.spec_json) if job else {}
    fam = _family_of(str(spec.get("model", "")), spec.get("model_revision"))
    applied = corrections(ledger).get((row.provider, row.gpu, fam))
    doc = planned(row, fam, applied if row.note and "history x" in row.note else None)
    doc["provider"] = provider if row.provider in ("-", "") else row.provider
    ledger.update_job(job_id, estimate_json=json.dumps(doc))


def record_measured(
    ledger: Ledger,
    job_id: str,
    metrics: Mapping[str, Any],
    durations: Mapping[str, float],
    cost_usd: float,
) -> None:
    """Keep what a finished job measured, beside its estimate."""
    ledger.update_job(job_id, actual_json=json.dumps(measured(metrics, durations, cost_usd)))
