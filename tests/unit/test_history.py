"""Estimates that learn: the ledger's finished jobs move the next estimate toward what they
measured, bounded, without compounding, and the estimate says so."""

from __future__ import annotations

import json

import pytest
from loraburst import JobSpec
from loraburst._cost import history
from loraburst._cost.estimate import Estimate, EstimateRow, estimate
from loraburst._state.ledger import Ledger

MODEL = "meta-llama/Llama-3.1-8B"


def _estimate(*, learn: bool) -> Estimate:
    spec = JobSpec(model=MODEL, dataset="d.jsonl", train={"max_steps": 200})
    return estimate(spec, tokens=2_000_000, rows=4000, tokens_exact=True,
                    gpus=["H100 SXM", "A100 80GB"], providers=["runpod"], history=learn)  # fmt: skip


def _row(est: Estimate, gpu: str) -> EstimateRow:
    return next(r for r in est.rows if r.gpu == gpu)


def _finish_job(ledger: Ledger, n: int, row: EstimateRow, *, speed: float, overhead: float) -> None:
    """A job that ran on ``row``'s offer and measured ``speed`` x the raw model's tokens/s and
    ``overhead`` x its setup and export time (recorded exactly as the run chain records it)."""
    job_id = f"j{n}"
    ledger.create_job(job_id, name=None, cache_key=None, bundle_sha256=None,
                      spec_json=json.dumps({"model": MODEL}))  # fmt: skip
    history.record_planned(ledger, job_id, row.provider, row)
    plan = ledger.job(job_id).estimate  # type: ignore[union-attr]
    train = row.train_s  # how long it trained does not matter here: speed is tokens/s
    metrics = {"tokens_per_s": plan["raw_tokens_per_s"] * speed, "train_runtime_s": train}
    total = train + plan["raw_overhead_s"] * overhead
    history.record_measured(ledger, job_id, metrics, {"total": total}, cost_usd=1.0)
    ledger.update_job(job_id, status="succeeded")


def test_finished_jobs_move_the_estimate_and_it_says_so() -> None:
    raw = _estimate(learn=False)
    h100 = _row(raw, "H100 SXM")
    ledger = Ledger()
    for n in range(3):
        _finish_job(ledger, n, h100, speed=0.6, overhead=1.5)
    learned = _estimate(learn=True)
    got = _row(learned, "H100 SXM")
    # Toward the measured figures, not all the way with three jobs: 0.6 ** (3 / 5).
    assert got.tokens_per_s == pytest.approx(h100.tokens_per_s * 0.6**0.6, rel=1e-3)
    assert h100.tokens_per_s * 0.6 < got.tokens_per_s < h100.tokens_per_s
    assert got.train_s > h100.train_s and got.setup_s > h100.setup_s
    assert got.cost_usd > h100.cost_usd and got.total_s > h100.total_s
    assert got.cost_low_usd <= got.cost_usd <= got.cost_high_usd
    assert "history x" in got.note
    (note,) = [n for n in learned.notes if "learned from your jobs" in n]
    assert "runpod H100 SXM (llama 4-15B)" in note and "from 3 finished jobs" in note
    assert "--no-history" in note
    # Another GPU (no jobs there) and the raw model (--no-history) are untouched.
    assert _row(learned, "A100 80GB") == _row(raw, "A100 80GB")
    assert _row(_estimate(learn=False), "H100 SXM") == h100


def test_the_correction_is_bounded_and_does_not_compound() -> None:
    raw = _row(_estimate(learn=False), "H100 SXM")
    ledger = Ledger()
    for n in range(6):
        _finish_job(ledger, n, raw, speed=0.01, overhead=50.0)  # an absurd machine
    (c,) = history.corrections(ledger).values()
    assert (c.speed, c.overhead, c.jobs) == (history.BOUNDS[0], history.BOUNDS[1], 6)

    other = Ledger(ledger.path.with_name("other.sqlite3"))
    _finish_job(other, 0, raw, speed=0.8, overhead=1.0)
    corrected = _row(history.apply(_estimate(learn=False), _shape(), other), "H100 SXM")
    # The next job runs on the corrected estimate and measures the same: the ratio is still
    # taken against the raw model, so two jobs give 0.8 ** (2 / 4), not 0.8 * 0.8 ** ...
    _finish_job(other, 1, corrected, speed=0.8, overhead=1.0)
    (c2,) = history.corrections(other).values()
    assert c2.speed == pytest.approx(0.8**0.5, rel=1e-6) and c2.jobs == 2


def test_unfinished_and_unestimated_jobs_teach_nothing() -> None:
    raw = _row(_estimate(learn=False), "H100 SXM")
    ledger = Ledger()
    _finish_job(ledger, 0, raw, speed=0.5, overhead=1.0)
    ledger.update_job("j0", status="failed")
    ledger.create_job("cpu", name=None, cache_key=None, bundle_sha256=None, spec_json="{}")
    history.record_planned(ledger, "cpu", "local", None)  # the local CPU: no estimate row
    assert ledger.job("cpu").estimate == {}  # type: ignore[union-attr]
    assert history.corrections(ledger) == {}
    assert _estimate(learn=True) == _estimate(learn=False)


def _shape():  # type: ignore[no-untyped-def]
    from loraburst._cost.shapes import model_shape

    return model_shape(MODEL)


def test_a_pin_holds_the_corrections_while_jobs_finish() -> None:
    """A batch reserves a job's bound, then the job places itself again: in between another
    job may finish. Inside ``pinned`` (and in worker threads started from a copy of its
    context) the estimate stays the one the reservation was made on."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    raw = _row(_estimate(learn=False), "H100 SXM")
    ledger = Ledger()
    with history.pinned():
        _finish_job(ledger, 0, raw, speed=0.5, overhead=2.0)
        assert _row(_estimate(learn=True), "H100 SXM") == raw
        with ThreadPoolExecutor(1) as pool:
            ctx = contextvars.copy_context()
            in_worker = pool.submit(ctx.run, _estimate, learn=True).result()
        assert _row(in_worker, "H100 SXM") == raw
    # Outside the pin the finished job counts again.
    assert _row(_estimate(learn=True), "H100 SXM").cost_high_usd > raw.cost_high_usd
