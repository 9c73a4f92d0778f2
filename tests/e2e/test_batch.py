"""``Batch``: several jobs under one dollar budget on the RunPod emulator (billing clock on),
the sweep grid, batch files, and the example program."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from loraburst import Batch, ConfigError, Job
from loraburst._cost.placement import plan

from tests.conftest import ROOT, SAMPLE_DATA

TRAIN = {
    "max_steps": 6,
    "micro_batch_size": 4,
    "learning_rate": 3e-3,
    "save_every_steps": 3,
    "max_seq_len": 96,
}


def _job(model: Path, out: Path, name: str, **train: Any) -> Job:
    return Job(str(model), SAMPLE_DATA, output_dir=out, name=name, train={**TRAIN, **train})


def _broken_copy(model: Path, dest: Path) -> Path:
    """The tiny model with its weights file truncated: it estimates fine and fails to load."""
    shutil.copytree(model, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return dest


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


def test_batch_runs_what_fits_and_isolates_failures(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    out = tmp_path / "out"
    grid = Batch.sweep(_job(tiny_model, out, "sweep"), lora={"r": [4, 8]}, budget=1.0).jobs
    broken = _job(_broken_copy(tiny_model, tmp_path / "broken"), out, "broken")
    huge = _job(tiny_model, out, "huge", max_steps=3000)
    bound = plan(grid[0], runpod_provider)[0].cost_high
    huge_bound = plan(huge, runpod_provider)[0].cost_high
    # Room for two small jobs at a time (not three), and never for the huge one.
    budget = round(2.5 * bound, 4)
    assert huge_bound > budget
    batch = Batch(
        [grid[0], broken, grid[1], huge],
        budget=budget,
        max_concurrent=3,
        provider=runpod_provider,
    )
    result = batch.run()

    rows = {r.name: r for r in result.rows}
    assert [r.name for r in result.rows] == ["sweep-0", "broken", "sweep-1", "huge"]
    assert rows["sweep-0"].status == rows["sweep-1"].status == "succeeded"
    assert rows["broken"].status == "failed" and rows["broken"].error
    assert rows["huge"].status == "skipped (budget)" and rows["huge"].cost_usd == 0
    for name in ("sweep-0", "sweep-1"):
        assert Path(str(rows[name].adapter_path), "adapter_config.json").is_file()
        assert rows[name].reserved_usd == pytest.approx(bound)
    # The emulator: one pod per job that ran, none for the huge one, none left running.
    pods = list(runpod_fake.pods.values())
    assert sorted(p.name.split("-")[1] for p in pods) == ["broken", "sweep", "sweep"]
    assert runpod_fake.running() == []
    # Reservations held: never three pods at once, though max_concurrent allowed it; and the
    # jobs did run side by side.
    assert _max_overlap([(p.created, p.ended) for p in pods]) == 2
    billed = sum(runpod_fake.cost(p.id) for p in pods)
    assert 0 < billed <= budget
    assert result.spent_usd == pytest.approx(billed, abs=0.002)
    assert "spent $" in str(result.table().title)


def test_sweep_builds_the_grid(tiny_model: Path, tmp_path: Path) -> None:
    base = _job(tiny_model, tmp_path, "base")
    batch = Batch.sweep(
        base, lora={"r": [8, 16, 32]}, train={"learning_rate": [1e-4, 2e-4]}, budget=5
    )
    specs = [j.spec for j in batch.jobs]
    assert len({s.name for s in specs}) == 6 == len(batch.names)
    assert sorted((s.lora.r, s.train.learning_rate) for s in specs) == sorted(
        (r, lr) for r in (8, 16, 32) for lr in (1e-4, 2e-4)
    )
    # Everything else is the base job's.
    assert {s.train.max_steps for s in specs} == {6} and {s.model for s in specs} == {
        base.spec.model
    }
    assert base.spec.lora.r != 32 or base.spec.train.learning_rate == 3e-3  # base untouched
    with pytest.raises(ConfigError, match="unique"):
        Batch([base, _job(tiny_model, tmp_path, "base")], budget=1)
    with pytest.raises(ConfigError, match="rank"):
        Batch.sweep(base, lora={"rank": [8]}, budget=1)


def test_batch_file_of_the_example_loads() -> None:
    batch = Batch.from_yaml(ROOT / "examples" / "batch.yaml")
    assert len(batch.jobs) == 3 and batch.budget > 0 and batch.provider == "local"
    assert sorted(j.spec.lora.r for j in batch.jobs) == [8, 16, 32]


def test_batch_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "b.yaml"
    bad.write_text("budget: 1\nbudgte: 2\njobs: []\n")
    with pytest.raises(ConfigError, match=r"b.yaml: unknown keys \['budgte'\]"):
        Batch.from_yaml(bad)
    bad.write_text("budget: 1\nsweep: {lora: {r: [8]}}\n")
    with pytest.raises(ConfigError, match="sweep: needs job:"):
        Batch.from_yaml(bad)
