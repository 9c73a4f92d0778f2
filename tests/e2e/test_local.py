"""The spine end to end on the local provider: spec -> checked data -> bundle -> agent +
QLoRA trainer (bitsandbytes NF4 on CPU) -> adapter back, verified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loraburst import Job
from loraburst._state.ledger import Ledger
from loraburst.remote.protocol import verify_manifest

from tests.conftest import SAMPLE_DATA, sample_job


def _job(model: Path, out: Path, **train: Any) -> Job:
    return sample_job(
        model, out, "e2e", **{"max_steps": 12, "save_every_steps": 6, "max_seq_len": 128, **train}
    )


def test_qlora_job_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _job(tiny_model, tmp_path / "out").run(provider="local", progress=False)

    assert result.status == "succeeded" and result.provider == "local"
    adapter = result.adapter_path
    assert adapter is not None and (adapter / "adapter_config.json").is_file()
    # Every file verifies against the agent's manifest, after the copy to output_dir.
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    assert verify_manifest(adapter.parent, manifest) == []
    # The loss is finite and fell.
    m = result.metrics
    assert m["steps"] == 12
    assert m["final_loss"] == m["final_loss"] and m["final_loss"] < m["first_loss"]
    # The adapter loads on the base, and training moved every LoRA B matrix off its zero init.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, adapter)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b.values())
    # The ledger remembers the job, its cost ($0 locally) and where the adapter is.
    row = Ledger().job(result.job_id)
    assert row is not None and row.status == "succeeded" and row.adapter_path == str(adapter)


def test_cache_hit_reuses_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    first = _job(tiny_model, tmp_path / "a", max_steps=2).run(provider="local", progress=False)
    again = _job(tiny_model, tmp_path / "b", max_steps=2).run(provider="local", progress=False)
    assert again.status == "cached" and again.adapter_path == first.adapter_path
    assert again.cost_usd == 0.0
    fresh = _job(tiny_model, tmp_path / "c", max_steps=2).run(
        provider="local", progress=False, cache=False
    )
    assert fresh.status == "succeeded" and fresh.job_id != first.job_id


def test_bad_dataset_fails_before_anything_runs(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    job = Job(str(tiny_model), bad, output_dir=tmp_path / "out")
    with pytest.raises(Exception) as e:
        job.run(provider="local", progress=False)
    assert f"{bad}:1:" in str(e.value) and f"{bad}:2:" in str(e.value)
    assert Ledger().jobs() == []  # nothing was started


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraburst._cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_validate(tmp_path: Path) -> None:
    good = tmp_path / "job.yaml"
    good.write_text(f"model: org/model\ndataset: {SAMPLE_DATA}\n")
    ok = _cli("validate", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "rows" in ok.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: org/model\ndataset: {data}\n")
    res = _cli("validate", str(bad))
    assert res.returncode == 2
    assert f"{data}:1:" in res.stderr and "robot" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_run_and_ls(tiny_model: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {tiny_model}\ndataset: {SAMPLE_DATA}\noutput_dir: {tmp_path / 'out'}\n"
        "train:\n  max_steps: 2\n  micro_batch_size: 2\n  max_seq_len: 64\n"
    )
    res = _cli("run", str(job), "--provider", "local", "--no-cache")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "succeeded" in res.stdout
    ls = _cli("ls")
    assert "succeeded" in ls.stdout and "local" in ls.stdout


def test_local_model_folder_is_used_in_place(tiny_model: Path, tmp_path: Path) -> None:
    """No copy of the weights: not in the bundle, not in the run folder; the agent reads them
    from the user's folder."""
    import tarfile

    from loraburst._state.home import home, runs_dir

    result = _job(tiny_model, tmp_path / "out", max_steps=2).run(provider="local", progress=False)
    assert result.status == "succeeded"
    bundles = list((home() / "bundles").glob("*.tar"))
    assert bundles
    for bundle in bundles:
        with tarfile.open(bundle) as tar:
            names = tar.getnames()
        assert "spec.json" in names and not any(n.startswith("model/") for n in names)
    run = runs_dir() / result.job_id
    assert not list(run.rglob("*.safetensors")) or all(
        "adapter" in p.parts or "checkpoints" in p.parts for p in run.rglob("*.safetensors")
    )
    loading = [
        json.loads(line)
        for line in (run / "events.jsonl").read_text().splitlines()
        if '"settings"' in line
    ]
    assert loading and loading[0]["packing"] in (True, False)


def test_local_dependencies_are_checked_before_the_agent_starts(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local provider runs this interpreter: its packages are checked here, by metadata,
    and a missing one is named before any agent starts."""
    from loraburst import AgentError
    from loraburst._state.home import runs_dir
    from loraburst.remote import protocol

    assert protocol.missing_requirements() == []
    monkeypatch.setattr(protocol, "TRAINER_REQUIREMENTS", ("peft>=999", "no-such-pkg>=1"))
    assert protocol.missing_requirements() == ["peft", "no-such-pkg"]
    with pytest.raises(AgentError, match="peft, no-such-pkg"):
        _job(tiny_model, tmp_path / "out", max_steps=1).run(provider="local", progress=False)
    assert not list(runs_dir().glob("*/events.jsonl"))  # no agent ever ran
