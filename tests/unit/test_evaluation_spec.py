"""The evaluation section: checked before anything runs, judged on the instance, costed up front,
and the progress line that shows the GPU and the burn rate."""

from __future__ import annotations

import pytest
from loraburst import ConfigError, Job, JobSpec
from loraburst._cost.estimate import estimate
from loraburst._progress import ProgressView
from loraburst.remote.evaluate import task_table, verdict
from loraburst.remote.protocol import EvaluationSpec, State

from tests.conftest import SAMPLE_DATA


def test_evaluation_without_held_out_rows_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="eval_dataset or train.eval_fraction"):
        Job("m", SAMPLE_DATA, evaluation={"enabled": True})
    with pytest.raises(ConfigError, match="did you mean 'min_loss_drop'"):
        Job("m", SAMPLE_DATA, evaluation={"min_los_drop": 0.1})
    with pytest.raises(ConfigError, match="lm-eval task ids"):
        Job("m", SAMPLE_DATA, evaluation={"tasks": ["arc easy; rm -rf"]})
    ok = Job("m", SAMPLE_DATA, train={"eval_fraction": 0.1}, evaluation={"enabled": True})
    assert ok.spec.evaluation.samples == 4


def test_the_verdict_marks_a_result_that_does_not_beat_the_base() -> None:
    ok, why = verdict(EvaluationSpec(), 2.0, 1.5)  # no threshold: measured, not judged
    assert ok is None and "no threshold" in why
    ok, why = verdict(EvaluationSpec(min_loss_drop=0.4), 2.0, 1.5)
    assert ok is True and "passed" in why
    ok, why = verdict(EvaluationSpec(min_loss_drop=0.6), 2.0, 1.5)
    assert ok is False and "NOT PASSING" in why and "2.0000 -> 1.5000" in why


def test_lm_eval_results_become_a_base_tuned_table() -> None:
    base = {"arc_easy": {"acc,none": 0.40, "acc_stderr,none": 0.02, "alias": "arc_easy"}}
    tuned = {"arc_easy": {"acc,none": 0.45, "acc_stderr,none": 0.02, "alias": "arc_easy"}}
    assert task_table(base, tuned) == {"arc_easy": {"acc": {"base": 0.40, "tuned": 0.45}}}


def test_the_estimate_includes_the_evaluation() -> None:
    def row(**spec: object) -> tuple[float, list[str]]:
        js = JobSpec(model="meta-llama/Llama-3.1-8B", dataset="d.jsonl",
                     train={"max_steps": 100, "eval_fraction": 0.1}, **spec)  # type: ignore[arg-type]  # fmt: skip
        est = estimate(js, tokens=1_000_000, rows=2000, tokens_exact=True,
                       gpus=["H100 SXM"], providers=["runpod"])  # fmt: skip
        return est.rows[0].total_s, est.notes

    off, off_notes = row(evaluation={"enabled": False})
    on, notes = row()
    tasks, _ = row(evaluation={"tasks": ["arc_easy"], "limit": 100})
    assert off < on < tasks
    assert any("evaluation before teardown" in n for n in notes)
    assert not any("evaluation" in n for n in off_notes)


def test_progress_line_shows_gpu_and_burn_rate(capsys: pytest.CaptureFixture[str]) -> None:
    view = ProgressView("job")
    view.rate(2.49)
    view.update(State(phase="training", step=3, total_steps=10, gpu_util=12.0), 0.0412)
    err = capsys.readouterr().err
    assert "GPU 12% (idle?)" in err and "$0.0412" in err and "$2.49/h" in err
