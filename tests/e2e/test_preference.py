"""DPO and ORPO end to end on the local provider and over SSH on the RunPod emulator: a tiny
real Llama, NF4 base on CPU, pairs checked, trained, and the adapter back and loadable."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from loraburst import Job, JobResult
from loraburst._state.home import runs_dir
from loraburst.remote.protocol import State, read_events

from tests.conftest import ROOT

PAIRS = ROOT / "examples" / "data" / "preference.jsonl"


def _pairs(tmp_path: Path, n: int = 6) -> Path:
    """The first ``n`` shipped pairs: every step sees all of them, so the margin's trend is
    the model's, not the sampling's."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:n]))
    return path


def _job(
    model: Path, data: Path, out: Path, objective: Any, exports: Any = None, **train: Any
) -> Job:
    settings = {
        "max_steps": 10,
        "micro_batch_size": 6,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "max_seq_len": 40,
        "save_every_steps": 5,
        **train,
    }
    return Job(str(model), data, objective=objective, train=settings, output_dir=out,
               exports=exports)  # fmt: skip


def _rises(values: list[float]) -> bool:
    return statistics.fmean(values[-3:]) > statistics.fmean(values[:3]) + 0.05


def _lora_b(model_dir: Path, adapter: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.slow
def test_dpo_margin_rises_and_the_adapter_loads(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from loraburst._progress import objective_line

    result = _job(tiny_model, _pairs(tmp_path), tmp_path / "out", "dpo").run(
        provider="local", progress=False
    )
    assert result.status == "succeeded"
    m = result.metrics
    assert m["objective"] == "dpo" and m["reference"] == "live" and m["steps"] == 10
    # At step 1 the policy is the reference (LoRA B starts at zero): margin 0, loss log 2.
    assert m["reward_margin_history"][0] == 0.0 and abs(m["first_loss"] - 0.6931) < 1e-3
    assert _rises(m["reward_margin_history"]), m["reward_margin_history"]
    assert m["final_reward_accuracy"] >= 0.75 and m["final_loss"] < m["first_loss"]
    assert m["data"]["rows"] == 6  # pairs
    assert result.adapter_path is not None
    lora_b = _lora_b(tiny_model, result.adapter_path)
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b.values())
    line = objective_line(m)
    assert line is not None and line.startswith("dpo: reward margin 0.000 -> ")
    # Each step reported its margin and accuracy as it ran (events and state.json).
    run = runs_dir() / result.job_id
    steps = [e for e in read_events((run / "events.jsonl").read_text()) if e["kind"] == "step"]
    assert len(steps) == 10 and all("reward_accuracy" in e for e in steps)
    state = State.from_json((run / "state.json").read_text())
    assert (
        state.metrics is not None and state.metrics["reward_margin"] == steps[-1]["reward_margin"]
    )


@pytest.mark.slow
def test_orpo_log_odds_rise(tiny_model: Path, tmp_path: Path) -> None:
    objective = {"type": "orpo", "beta": 1.0}
    result = _job(tiny_model, _pairs(tmp_path), tmp_path / "out", objective).run(
        provider="local", progress=False
    )
    assert result.status == "succeeded"
    m = result.metrics
    assert m["objective"] == "orpo" and "reference" not in m
    assert _rises(m["log_odds_ratio_history"]), m["log_odds_ratio_history"]
    assert m["final_nll_loss"] < m["first_nll_loss"]  # its SFT term learns the chosen answers
    assert m["final_reward_accuracy"] >= 0.75
    assert result.adapter_path is not None and _lora_b(tiny_model, result.adapter_path)


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_changes_that_adapter(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftConfig

    from tests.conftest import SAMPLE_DATA

    sft = Job(
        str(tiny_model),
        SAMPLE_DATA,
        lora={"r": 4},
        train={"max_steps": 3, "micro_batch_size": 4, "learning_rate": 3e-3, "max_seq_len": 40},
        output_dir=tmp_path / "sft",
    ).run(provider="local", progress=False)
    assert isinstance(sft, JobResult) and sft.adapter_path is not None
    dpo = _job(tiny_model, _pairs(tmp_path), tmp_path / "dpo", "dpo", max_steps=3,
               eval_fraction=0.34)  # fmt: skip
    dpo = Job.from_spec(dpo.spec.model_copy(update={"init_adapter": str(sft.adapter_path)}))
    # The JobResult itself stands for its adapter.
    assert Job(str(tiny_model), PAIRS, objective="dpo", init_adapter=sft).spec.init_adapter == str(
        sft.adapter_path
    )
    result = dpo.run(provider="local", progress=False)
    assert result.status == "succeeded" and result.adapter_path is not None
    m = result.metrics
    # The reference is the SFT adapter itself (precomputed once): no margin before training.
    assert m["reference"] == "precompute" and m["reward_margin_history"][0] == 0.0
    assert m["data"]["rows"] == 4 and m["data"]["eval_rows"] == 2  # pairs held out whole
    assert m["eval_loss"] == m["eval_loss"]  # evaluated, finite
    assert PeftConfig.from_pretrained(result.adapter_path).r == 4  # the SFT adapter's shape
    before = _lora_b(tiny_model, sft.adapter_path)
    after = _lora_b(tiny_model, result.adapter_path)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_dpo_on_the_runpod_emulator(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    job = _job(tiny_model, _pairs(tmp_path, 4), tmp_path / "out", "dpo", max_steps=2,
               micro_batch_size=2, save_every_steps=1, exports=["adapter", "merged"])  # fmt: skip
    result = job.run(provider=runpod_provider, progress=False)
    # The merged weights were made and checked on the pod, prompted from the first pair.
    merged = result.export("merged")
    checks = {c["name"]: c for c in merged.checks}
    assert checks["logits_match"]["ok"], checks
    assert merged.details["prompt_source"] == "train.jsonl row 1 (preference)"
    assert result.status == "succeeded" and result.provider == "runpod"
    assert (
        result.metrics["objective"] == "dpo" and len(result.metrics["reward_margin_history"]) == 2
    )
    assert result.adapter_path is not None
    manifest = json.loads((result.adapter_path.parent / "manifest.json").read_text())
    assert any(k.startswith("adapter/") for k in manifest["files"])
    assert runpod_fake.running() == []


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_the_estimate_prices_the_pairs(objective: str) -> None:
    """Same text, as SFT rows and as pairs: a pair trains two sequences, and DPO's live
    reference adds a forward, so each costs more than the last."""
    text = "The capital of France is Paris. " * 30
    sft_rows = [{"prompt": "Capital? " * 10, "completion": text}] * 64
    pairs = [{"prompt": "Capital? " * 10, "chosen": text, "rejected": text + "No."}] * 64
    train = {"packing": False, "learning_rate": 1e-5}

    def seconds(job: Job) -> float:
        row = job.estimate(gpus=["H200"], live=False).cheapest()
        assert row is not None
        return row.train_s

    sft = seconds(Job("meta-llama/Llama-3.1-8B", sft_rows, train=train))
    pref = seconds(Job("meta-llama/Llama-3.1-8B", pairs, objective=objective, train=train))
    orpo = seconds(Job("meta-llama/Llama-3.1-8B", pairs, objective="orpo", train=train))
    assert pref > sft
    if objective == "dpo":
        assert pref > orpo  # the reference's forward
