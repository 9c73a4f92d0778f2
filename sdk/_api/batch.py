"""``Batch``: many jobs under one dollar budget.

Each job's estimated upper cost bound is reserved against the budget before it starts and is
passed to it as its ``max_cost`` (so the runtime cap holds it there); what a finished job did
not spend is released. A job whose cheapest feasible bound no longer fits in what is left is
never started. One job's failure does not stop the others.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table
from rich.text import Text

from .._cost import history
from .._cost.placement import plan
from .._exceptions import BudgetExceededError, ConfigError, LoraburstError
from .job import Job, load_yaml_file

__all__ = ["Batch", "BatchResult", "BatchRow"]

# Job.run arguments that also decide placement (so reservations use the same offers).
_PLACEMENT_KEYS = ("gpu", "max_price_per_hour", "prefer", "deadline")


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One job's line in the batch table."""

    name: str
    status: str  # a JobResult status, "failed" or "skipped (budget)"
    provider: str | None = None
    gpu: str | None = None
    reserved_usd: float = 0.0
    cost_usd: float = 0.0
    adapter_path: str | None = None
    error: str | None = None
    job_id: str | None = None  # the ledger's job (its report, estimate and evaluation)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Every job's row, the budget and what was spent; ``report_path`` is the HTML page that
    compares the jobs (loss, evaluation, estimate and cost, sortable)."""

    rows: tuple[BatchRow, ...]
    budget: float
    spent_usd: float
    report_path: Path | None = None

    @property
    def all_ok(self) -> bool:
        return all(r.status in ("succeeded", "cached") for r in self.rows)

    def table(self) -> Table:
        t = Table(
            "job",
            "status",
            "provider",
            "gpu",
            "reserved $",
            "spent $",
            "adapter / error",
            title=f"batch: spent ${self.spent_usd:.4f} of ${self.budget:.2f}",
        )
        for r in self.rows:
            cells = (
                r.name,
                r.status,
                r.provider or "",
                r.gpu or "",
                f"{r.reserved_usd:.4f}",
                f"{r.cost_usd:.4f}",
                r.adapter_path or (r.error or "")[:80],
            )
            # Text, not str: paths and provider errors must never be parsed as markup.
            t.add_row(*(Text(c) for c in cells))
        return t


class Batch:
    """Run ``jobs`` concurrently under one dollar ``budget``.

    Args:
        jobs: the jobs; each needs a distinct ``name`` (sweeps name them for you).
        budget: dollars for the whole batch; the providers' billed total stays within it.
        max_concurrent: jobs running at once.
        provider, **run_kwargs: passed to each ``Job.run`` (chains, ``gpu=``, ``prefer=`` ...).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        budget: float,
        max_concurrent: int = 2,
        provider: Any = "auto",
        progress: bool = False,
        **run_kwargs: Any,
    ) -> None:
        if not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
            raise ConfigError(f"Batch budget must be a positive number of dollars, not {budget!r}")
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ConfigError(f"max_concurrent must be a whole number, not {max_concurrent!r}")
        if max_concurrent < 1:
            raise ConfigError("max_concurrent must be at least 1")
        names = [j.spec.name or f"job-{i}" for i, j in enumerate(jobs)]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"batch job names must be unique; repeated: {sorted(dupes)}")
        self.jobs = list(jobs)
        self.names = names
        self.budget = budget
        self.max_concurrent = max_concurrent
        self.provider = provider
        self.progress = progress
        self.run_kwargs = run_kwargs
        self._lock = threading.Lock()
        self._reserved = 0.0
        self._spent = 0.0

    @classmethod
    def sweep(
        cls,
        job: Job,
        *,
        lora: Mapping[str, Sequence[Any]] | None = None,
        train: Mapping[str, Sequence[Any]] | None = None,
        quant: Mapping[str, Sequence[Any]] | None = None,
        **batch_kwargs: Any,
    ) -> Batch:
        """The grid of ``job`` over every combination of the given values, as one Batch.

        Example: ``Batch.sweep(job, lora={"r": [8, 16, 32]}, train={"learning_rate": [1e-4,
        2e-4]}, budget=20)`` makes six jobs named ``<name>-0`` ... ``<name>-5``.
        """
        axes = [
            (sec, key, list(vals))
            for sec, grid in (("lora", lora), ("train", train), ("quant", quant))
            if grid
            for key, vals in grid.items()
        ]
        if not axes:
            raise ConfigError("sweep needs at least one axis, e.g. lora={'r': [8, 16]}")
        base = job.spec.model_dump()
        stem = (job.spec.name or "sweep")[:32]
        jobs = []
        for i, combo in enumerate(itertools.product(*(vals for _, _, vals in axes))):
            data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
            for (sec, key, _), value in zip(axes, combo, strict=True):
                data[sec][key] = value
            data["name"] = f"{stem}-{i}"
            jobs.append(Job.from_spec(Job._validate(data)))
        return cls(jobs, **batch_kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Batch:
        """Load a batch file (see ``examples/batch.yaml``).

        Keys: ``budget:``, ``max_concurrent:``, ``provider:`` (a name or a list), the
        placement filters ``gpu:``, ``max_price_per_hour:``, ``prefer:``, ``deadline:``, and
        either ``jobs:`` (paths of job YAML files relative to this file, or inline job
        mappings) or ``sweep:`` (``job:`` a job file, and ``lora:``/``train:``/``quant:`` grids).

        Raises:
            ConfigError: unreadable YAML, unknown keys, or an invalid job (naming it).
        """
        path = Path(path)
        raw = load_yaml_file(path, "batch file")
        if not isinstance(raw, dict) or "budget" not in raw:
            raise ConfigError(f"{path}: a batch file needs budget: and jobs: (or sweep:)")
        settings = ("budget", "max_concurrent", "provider", *_PLACEMENT_KEYS)
        unknown = set(raw) - {*settings, "jobs", "sweep"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown keys {sorted(map(str, unknown))}; known: "
                f"{sorted({*settings, 'jobs', 'sweep'})}"
            )
        kwargs = {k: raw[k] for k in settings if k in raw}
        if "sweep" in raw:
            if not isinstance(raw["sweep"] or {}, dict):
                raise ConfigError(f"{path}: sweep: must be a mapping with job: and grids")
            sw = dict(raw["sweep"] or {})
            bad = set(sw) - {"job", "lora", "train", "quant"}
            if "job" not in sw or bad:
                raise ConfigError(
                    f"{path}: sweep: needs job: (a job file) and grids under lora:, train: "
                    f"or quant:{f'; unknown keys {sorted(bad)}' if bad else ''}"
                )
            base = Job.from_yaml(path.parent / sw.pop("job"))
            return cls.sweep(base, **sw, **kwargs)
        items = raw.get("jobs") or []
        if not isinstance(items, list):
            raise ConfigError(f"{path}: jobs: must be a list of job files or job mappings")
        jobs = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                jobs.append(Job.from_yaml(path.parent / item))
            elif isinstance(item, dict):
                tmp = path.parent / f".{path.stem}-job{i}.yaml"
                tmp.write_text(yaml.safe_dump(item))
                try:
                    jobs.append(Job.from_yaml(tmp))
                finally:
                    tmp.unlink()
            else:
                raise ConfigError(f"{path}: jobs[{i}] must be a path or a mapping")
        return cls(jobs, **kwargs)

    # -- budget ---------------------------------------------------------------------------
    def _reserve(self, job: Job) -> float | None:
        """Reserve the upper cost bound of the offer ``job`` would launch on; None when no
        offer's bound fits in what is left of the budget.

        The reservation becomes the job's ``max_cost``: its placement then only considers
        offers within it and the runtime cap holds its spend there, failovers included.
        """
        with self._lock:
            left = self.budget - self._spent - self._reserved
        if left <= 0:
            return None
        try:
            cands = plan(job, self.provider, max_cost=left, **self._placement_kwargs())
        except BudgetExceededError:
            return None
        amount = cands[0].cost_high
        with self._lock:
            if amount > self.budget - self._spent - self._reserved + 1e-12:
                return None
            self._reserved += amount
        return amount

    def _placement_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.run_kwargs.items() if k in _PLACEMENT_KEYS}

    def _settle(self, reserved: float, spent: float) -> None:
        with self._lock:
            self._reserved -= reserved
            self._spent += spent

    def _run_one(self, job: Job, name: str, reserved: float) -> BatchRow:
        try:
            # The reservation is the job's cap: the runtime budget keeps it there.
            r = job.run(
                self.provider,
                max_cost=reserved if reserved > 0 else None,
                progress=self.progress,
                **self.run_kwargs,
            )
        except Exception as exc:  # one job's failure, whatever it is, must not stop the batch
            known = isinstance(exc, LoraburstError)
            # What an unexpected error spent is unknown: count its whole reservation.
            spent = (
                float(exc.context.get("cost_usd", 0.0))
                if isinstance(exc, LoraburstError)
                else reserved
            )
            self._settle(reserved, spent)
            first = str(exc).splitlines()[0] if str(exc) else ""
            return BatchRow(
                name,
                "failed",
                reserved_usd=reserved,
                cost_usd=spent,
                error=first if known else f"{type(exc).__name__}: {first}",
            )
        self._settle(reserved, r.cost_usd)
        return BatchRow(
            name,
            r.status,
            r.provider,
            r.gpu,
            reserved,
            r.cost_usd,
            str(r.adapter_path) if r.adapter_path else None,
            job_id=r.job_id,
        )

    def run(self) -> BatchResult:
        """Run every job that fits the budget; return the table and the total spent.

        Estimates inside the batch use the history corrections as they stood when it began,
        so the bound a job was reserved on is the bound it places itself on.
        """
        rows: dict[int, BatchRow] = {}
        pending = list(range(len(self.jobs)))
        running: dict[Future[BatchRow], int] = {}
        with history.pinned(), ThreadPoolExecutor(max_workers=self.max_concurrent) as pool:
            while pending or running:
                started = False
                for i in list(pending):
                    if len(running) >= self.max_concurrent:
                        break
                    try:
                        amount = self._reserve(self.jobs[i])
                    except LoraburstError as exc:
                        rows[i] = BatchRow(self.names[i], "failed", error=str(exc).splitlines()[0])
                        pending.remove(i)
                        continue
                    if amount is None:
                        continue
                    pending.remove(i)
                    # Each worker runs in a copy of this context: it sees the pinned history.
                    ctx = contextvars.copy_context()
                    fut = pool.submit(ctx.run, self._run_one, self.jobs[i], self.names[i], amount)
                    running[fut] = i
                    started = True
                if not running:
                    # Nothing runs and nothing else fits: what is left would break the budget.
                    for i in pending:
                        rows[i] = BatchRow(
                            self.names[i],
                            "skipped (budget)",
                            error="its estimate does not fit the budget left",
                        )
                    break
                if not started or len(running) >= self.max_concurrent or not pending:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        rows[running.pop(fut)] = fut.result()
                time.sleep(0.01)
        ordered = tuple(rows[i] for i in sorted(rows))
        result = BatchResult(
            rows=ordered, budget=self.budget, spent_usd=sum(r.cost_usd for r in ordered)
        )
        return self._report(result)

    def _report(self, result: BatchResult) -> BatchResult:
        """The batch's comparison page, in the first job's output folder (report hook)."""
        from .report import write_batch_report

        folder = Path(self.jobs[0].spec.output_dir).expanduser() if self.jobs else Path(".")
        name = time.strftime("batch-%Y%m%d-%H%M%S")
        try:
            path = write_batch_report(result, folder, name=name)
        except OSError as exc:  # the jobs and their money are done; the page can wait
            print(f"batch report not written: {exc}")
            return result
        return dataclasses.replace(result, report_path=path)
