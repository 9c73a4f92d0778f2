"""What evaluation before teardown (remote/evaluate.py) adds to a job's time, hence its cost.

Three parts, each from figures the estimator already has for the row:

- held-out loss of base and tuned: two forward passes over the eval tokens, at a third of the
  training rate (a training step is a forward and a backward of about twice its cost);
- samples: base and tuned each decode ``samples x max_new_tokens`` tokens one at a time; a
  decode step reads every weight once (memory-bound), with a floor for the per-token overhead
  of ``generate`` on a small model;
- lm-eval tasks: ``limit`` examples per task, each about :data:`TASK_REQUESTS` scored
  continuations of :data:`TASK_TOKENS` tokens, for base and tuned, plus a fixed start-up.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .._api.export import ExportCost
from .._api.spec import JobSpec

if TYPE_CHECKING:
    from .gpus import GPUSpec

__all__ = ["EvaluationCost", "evaluation_cost", "evaluation_note", "notes", "with_evaluation"]

DECODE_FLOOR_S = 0.02  # per generated token: Python and kernel-launch overhead of generate()
TASK_REQUESTS = 4  # scored continuations per lm-eval example (multiple choice: one per option)
TASK_TOKENS = 256  # tokens per lm-eval request (context + continuation)
TASK_STARTUP_S = 60.0  # per lm-eval run: building the task, reading its data
EVAL_DATASET_SHARE = 0.1  # an eval dataset's size against the training split's, when unknown


@dataclasses.dataclass(frozen=True)
class EvaluationCost:
    """Seconds of evaluation in a row's total, and a note for the estimate (empty: none)."""

    seconds: float
    note: str


def evaluation_cost(
    spec: JobSpec,
    *,
    params: int,
    train_tokens: float,
    tokens_per_s: float,
    bandwidth_gbs: float,
) -> EvaluationCost:
    """The evaluation's seconds on one GPU row.

    Args:
        spec: the job (``evaluation``, ``eval_dataset``, ``train.eval_fraction``).
        params: the base model's parameter count.
        train_tokens: tokens of one epoch of the training split; the held-out split is
            ``eval_fraction`` of the data, and an eval dataset is taken as a tenth of it
            (:data:`EVAL_DATASET_SHARE`; its rows are not counted for the estimate).
        tokens_per_s: the row's training rate.
        bandwidth_gbs: the GPU's memory bandwidth.
    """
    cfg = spec.evaluation
    if not evaluation_note(spec) or tokens_per_s <= 0:
        return EvaluationCost(0.0, "")
    if spec.eval_dataset is not None:
        eval_tokens = train_tokens * EVAL_DATASET_SHARE
    else:
        share = spec.train.eval_fraction
        eval_tokens = train_tokens * share / (1 - share)
    forward_rate = tokens_per_s * 3
    loss_s = 2 * eval_tokens / forward_rate
    bits = spec.quant.bits if spec.quantized else 16
    step_s = max(DECODE_FLOOR_S, params * bits / 8 / (bandwidth_gbs * 1e9))
    samples_s = 2 * cfg.samples * cfg.max_new_tokens * step_s
    tasks_s = 0.0
    if cfg.tasks:
        examples = len(cfg.tasks) * (cfg.limit or 1000)
        tasks_s = 2 * (examples * TASK_REQUESTS * TASK_TOKENS / forward_rate + TASK_STARTUP_S)
    seconds = loss_s + samples_s + tasks_s
    return EvaluationCost(round(seconds, 1), evaluation_note(spec))


def evaluation_note(spec: JobSpec) -> str:
    """What the job evaluates, or "" when it does not (no held-out rows, or turned off)."""
    cfg = spec.evaluation
    held_out = spec.eval_dataset is not None or spec.train.eval_fraction > 0
    if cfg.enabled is False or not held_out:
        return ""
    what = f"base vs tuned eval loss, {cfg.samples} samples"
    if cfg.tasks:
        what += f", lm-eval {', '.join(cfg.tasks)} (limit {cfg.limit})"
    return f"evaluation before teardown ({what})"


def with_evaluation(
    spec: JobSpec,
    exports: ExportCost,
    params: int,
    train_tokens: float,
    tokens_per_s: float,
    gpu: GPUSpec,
) -> ExportCost:
    """``exports`` with the evaluation's seconds added: both run after training, before
    teardown, and the estimator counts them together (in ``export_s``, total and cost)."""
    ev = evaluation_cost(spec, params=params, train_tokens=train_tokens,
                         tokens_per_s=tokens_per_s, bandwidth_gbs=gpu.bandwidth_gbs)  # fmt: skip
    return dataclasses.replace(exports, seconds=exports.seconds + ev.seconds)


def notes(spec: JobSpec) -> list[str]:
    """The estimate's note for the evaluation (none when the job does not evaluate)."""
    note = evaluation_note(spec)
    return [note + "; included in time and cost (with the exports)"] if note else []
