"""What a finished job returns."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .export import ExportResult

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
        exports: each export of the spec (merged, GGUF), made and checked before teardown;
            a failed one says why while the adapter and the others still come back.
        hub: the hub push's outcome (repo, url, commit, ok, error) when the spec asks for one.
        report_path: the job's HTML report beside the adapter (loss curves, GPU, phases,
            dollars against the estimate, evaluation, samples); ``loraburst report`` redraws it.
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
    exports: tuple[ExportResult, ...] = ()
    hub: dict[str, Any] | None = None
    report_path: Path | None = None

    @property
    def evaluation(self) -> dict[str, Any]:
        """Base against tuned, measured on the instance before teardown: ``base_eval_loss``,
        ``tuned_eval_loss``, ``samples``, ``tasks``, ``passed``, ``verdict`` (empty when the
        job had no held-out rows)."""
        ev = self.metrics.get("evaluation")
        return ev if isinstance(ev, dict) else {}

    @property
    def passed(self) -> bool | None:
        """The evaluation's verdict against ``evaluation.min_loss_drop``: None without a
        threshold (or an evaluation); False marks the result, the adapter is still here."""
        value = self.evaluation.get("passed")
        return value if isinstance(value, bool) else None

    @property
    def ok(self) -> bool:
        """The adapter came back (succeeded or cached); exports are judged by ``exports_ok``."""
        return self.status in ("succeeded", "cached")

    @property
    def exports_ok(self) -> bool:
        """Every export (and the hub push, when asked) was made and passed its checks."""
        return all(e.ok for e in self.exports) and (self.hub is None or bool(self.hub.get("ok")))

    def export(self, name: str) -> ExportResult:
        """The result of one export by name (``"merged"``, ``"gguf:q4_k_m"``).

        Raises:
            KeyError: the job had no such export (the message lists the ones it had).
        """
        for e in self.exports:
            if e.name == name:
                return e
        raise KeyError(f"no export {name!r}; this job has {[e.name for e in self.exports]}")
