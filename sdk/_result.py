"""What a finished job returns."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

__all__ = ["Attempt", "JobResult", "JobStatus"]

JobStatus = Literal["succeeded", "budget_exhausted", "stopped", "failed", "cached"]


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One try on one offer: where, and how it ended."""

    provider: str
    gpu: str
    outcome: str  # "ok", "capacity", "auth", "not ready", "preempted", "error: ..."
    cost_usd: float = 0.0


@dataclasses.dataclass(frozen=True)
class JobResult:
    """The outcome of ``Job.run``.

    Attributes:
        status: ``"succeeded"``; ``"budget_exhausted"`` / ``"stopped"`` with a partial adapter;
            ``"cached"`` when an identical finished job's adapter was reused at $0.
        adapter_path: the verified adapter folder (loadable with ``PeftModel.from_pretrained``).
        cost_usd: what the providers billed (price x billed time, setup included).
        durations: seconds spent per phase (bundle, provision, train, pull, teardown, total).
    """

    job_id: str
    status: JobStatus
    adapter_path: Path | None
    metrics: dict[str, Any]
    provider: str | None
    gpu: str | None
    cost_usd: float
    durations: dict[str, float]
    attempts: tuple[Attempt, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "cached")
