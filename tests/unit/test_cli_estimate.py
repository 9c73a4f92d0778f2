"""`loraburst estimate` on the seed models' job files: rows as JSON, and clear bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraburst._cli import main

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "examples" / "jobs").glob("*.yaml"))
KEYS = {
    "provider",
    "gpu",
    "gpu_count",
    "fits",
    "peak_vram_gb",
    "tokens_per_s",
    "train_s",
    "setup_s",
    "total_s",
    "price_per_hour",
    "cost_usd",
    "cost_low_usd",
    "cost_high_usd",
    "micro_batch_size",
    "gradient_checkpointing",
}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_estimate_json_for_seed_models(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(job), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and set(rows[0]) >= KEYS
    fitting = [r for r in rows if r["fits"]]
    assert fitting, "some GPU must fit every seed model"
    for r in fitting:
        assert r["cost_low_usd"] <= r["cost_usd"] <= r["cost_high_usd"]
        assert r["total_s"] >= r["train_s"] > 0


def test_estimate_filters_by_gpu_and_provider(capsys: pytest.CaptureFixture[str]) -> None:
    job = ROOT / "examples" / "jobs" / "mistral-7b.yaml"
    assert main(["estimate", str(job), "--json", "--gpu", "RTX 4090", "--provider", "runpod"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["provider"], r["gpu"]) for r in rows} == {("runpod", "RTX 4090")}


def test_seed_70b_row_on_two_rtx_3090s_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--gpu "2x RTX 3090"``: only two-GPU offers, and the 70B job fits them (FSDP with its
    weights offloaded to host RAM, which the row states)."""
    job = ROOT / "examples" / "jobs" / "llama-3-70b.yaml"
    assert main(["estimate", str(job), "--json", "--gpu", "2x RTX 3090", "--no-history"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["gpu"], row["gpu_count"], row["fits"]) == ("RTX 3090", 2, True)
    assert row["strategy"] == "fsdp+offload" and row["host_ram_gb"] > 35
    assert row["peak_vram_gb"] <= 24


def test_unknown_gpu_lists_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    job = ROOT / "examples" / "jobs" / "mistral-7b.yaml"
    assert main(["estimate", str(job), "--gpu", "RTX 4900"]) == 2
    err = capsys.readouterr().err
    assert "RTX 4900" in err and "RTX 4090" in err
    assert "Traceback" not in err


def test_unknown_model_says_how_to_give_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: someone/unheard-of-model\ndataset: {ROOT}/examples/data/chat.jsonl\n")
    assert main(["estimate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "unheard-of-model" in err and "config.json" in err
