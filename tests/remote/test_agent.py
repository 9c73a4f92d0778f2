"""The agent as a real process on a hand-built WORKDIR: tiny real Llama, bitsandbytes NF4 on CPU."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loraburst.remote.protocol import (
    MANIFEST_FILE,
    METRICS_FILE,
    TRAINER_REQUIREMENTS,
    verify_manifest,
)

from tests.remote._workdir import (
    EVAL_DATA,
    FAST,
    SAMPLE_DATA,
    events,
    log,
    make_workdir,
    run_agent,
    start_agent,
    state,
    wait_for,
)


def test_qlora_nf4_trains_and_writes_a_verified_adapter(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from loraburst.remote.trainer import load_model
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    workdir = make_workdir(
        tmp_path,
        tiny_model,
        eval_data=EVAL_DATA,
        train={**FAST, "max_steps": 8, "save_every_steps": 4},
    )
    # Steps 3 and 4 of the real run traced, as a user asks for a profile.
    assert run_agent(workdir, {"LORABURST_PROFILE_STEPS": "3:4"}) == 0, log(workdir)

    st = state(workdir)
    assert (st.phase, st.step, st.total_steps, st.error) == ("done", 8, 8, None)
    kinds = [e["kind"] for e in events(workdir)]
    assert kinds[0] == "agent_started" and kinds[-1] == "done"
    assert kinds.count("step") == 8 and kinds.count("checkpoint") == 2
    steps = [e for e in events(workdir) if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(e["tokens_per_s"] > 0 for e in steps)
    # Where the seconds before the first step went; the rows were tokenised while the model
    # loaded, so the data event comes after the model is in memory.
    settings = next(e for e in events(workdir) if e["kind"] == "settings")
    setup_s = settings["setup_s"]
    assert {"imports", "tokenizer", "model", "encode", "encode_wait", "plan"} <= set(setup_s)
    assert all(v >= 0 for v in setup_s.values())
    assert setup_s["total"] >= setup_s["model"] + setup_s["plan"]
    assert kinds.index("loading") < kinds.index("data") < kinds.index("settings")
    # The profile: written once, after step 4, covering two steps of real training.
    (prof_event,) = [e for e in events(workdir) if e["kind"] == "profile"]
    assert prof_event["window"] == [3, 4]
    assert kinds.index("profile") > [i for i, k in enumerate(kinds) if k == "step"][2]
    profile = json.loads((workdir / "profile.json").read_text())
    assert profile["steps"] == 2 and profile["wall_s_per_step"] > 0
    ops = {row["name"] for row in profile["top_host_ops"]}
    assert any("mm" in op for op in ops), ops  # the matmuls of the LoRA forward and backward

    metrics = json.loads((workdir / METRICS_FILE).read_text())
    losses = metrics["losses"]
    assert metrics["steps"] == 8 and len(losses) == 8
    assert all(math.isfinite(x) for x in losses)
    assert metrics["final_loss"] < metrics["first_loss"] == losses[0]
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_tokens"] > 0
    assert metrics["quantized_bits"] == 4 and metrics["data"]["rows"] == 180
    # Evaluation before teardown (an eval split: on by default): base against tuned.
    ev = metrics["evaluation"]
    assert ev["tuned_eval_loss"] == metrics["eval_loss"]
    assert math.isfinite(ev["base_eval_loss"]) and ev["base_eval_loss"] > ev["tuned_eval_loss"]
    assert ev["passed"] is None and len(ev["samples"]) == 4
    assert all(s["prompt"] and s["reference"] for s in ev["samples"])
    assert all(0 < s["tuned_tokens"] <= 64 for s in ev["samples"])
    assert "evaluating" in kinds and "evaluated" in kinds
    # The timeline for the report rides in the verified metrics.
    assert [row[1] for row in metrics["timeline"]["steps"]] == list(range(1, 9))
    assert {"loading", "training", "evaluating", "sealed"} <= set(metrics["timeline"]["phases"])
    assert metrics["telemetry"]["off"]  # no NVML on this CPU machine, and it says so

    manifest = json.loads((workdir / MANIFEST_FILE).read_text())
    assert {"adapter/adapter_model.safetensors", "metrics.json"} <= set(manifest["files"])
    assert verify_manifest(workdir, manifest) == []

    # Every LoRA tensor moved away from its initial value (same seed -> same init).
    from loraburst.remote.protocol import BundleSpec

    spec = BundleSpec.read(workdir / "bundle" / "spec.json").spec
    init_model, _ = load_model(spec, str(workdir / "bundle" / "model"))
    initial = get_peft_model_state_dict(init_model)
    trained = load_file(workdir / "adapter" / "adapter_model.safetensors")
    lora = [k for k in trained if "lora_" in k]
    assert lora and set(lora) <= set(initial)
    assert all(not torch.equal(trained[k], initial[k].to(trained[k].dtype)) for k in lora)

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, workdir / "adapter")
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], trained[k]) for k in lora)


@pytest.mark.parametrize(("method", "bits"), [("dora", 4), ("lora", 16)])
def test_dora_and_plain_lora_run(tiny_model: Path, tmp_path: Path, method: str, bits: int) -> None:
    from safetensors.torch import load_file

    workdir = make_workdir(
        tmp_path,
        tiny_model,
        method=method,
        quant={"bits": bits},
        train={**FAST, "max_steps": 2, "save_every_steps": None},
    )
    assert run_agent(workdir) == 0, log(workdir)
    assert state(workdir).phase == "done"
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    assert metrics["method"] == method and metrics["steps"] == 2
    assert metrics["quantized_bits"] == (4 if method == "dora" else None)
    config = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    keys = load_file(workdir / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in keys) is (method == "dora")
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").glob("c*"))


def test_killed_run_resumes_from_its_checkpoint_with_exact_steps(
    tiny_model: Path, tmp_path: Path
) -> None:
    workdir = make_workdir(
        tmp_path, tiny_model, train={**FAST, "max_steps": 40, "save_every_steps": 2}
    )
    proc = start_agent(workdir)
    ckpt = workdir / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    wait_for(lambda: ckpt.is_file() or proc.poll() is not None, 180, "checkpoint-2")
    proc.kill()  # preemption: no chance to save anything more
    proc.wait()
    assert state(workdir).phase == "training"
    killed_at = state(workdir).step
    assert 2 <= killed_at < 40
    first_run = len(events(workdir))

    assert run_agent(workdir) == 0, log(workdir)
    st = state(workdir)
    assert (st.phase, st.step, st.total_steps) == ("done", 40, 40)
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    resumed = metrics["resumed_from_step"]
    assert resumed is not None and 2 <= resumed <= killed_at and resumed % 2 == 0
    assert metrics["steps"] == 40
    second = events(workdir)[first_run:]
    assert {"kind": "resuming", "checkpoint": f"checkpoint-{resumed}"}.items() <= next(
        e for e in second if e["kind"] == "resuming"
    ).items()
    assert [e["step"] for e in second if e["kind"] == "step"] == list(range(resumed + 1, 41))
    # The loss history spans both runs, one entry per optimizer step.
    assert metrics["loss_steps"] == list(range(1, 41)) and len(metrics["losses"]) == 40


def test_missing_model_folder_fails_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    workdir = make_workdir(tmp_path, missing, ship_model=False, train={**FAST, "max_steps": 1})
    assert run_agent(workdir, timeout=60) == 1
    st = state(workdir)
    assert st.phase == "failed" and st.error is not None
    assert st.error["type"] == "FileNotFoundError" and str(missing) in st.error["message"]
    assert not (workdir / MANIFEST_FILE).exists()
    assert events(workdir)[-1]["kind"] == "failed"


def test_a_bad_row_found_while_the_model_loads_fails_naming_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Past the client's checks (a hand-built bundle): the row's error, raised on the encoding
    # thread, still ends the run with the file and row named.
    bad = tmp_path / "bad.jsonl"
    rows = SAMPLE_DATA.read_text().splitlines()[:5]
    rows.insert(2, json.dumps({"messages": [{"role": "user"}]}))
    bad.write_text("\n".join(rows) + "\n")
    workdir = make_workdir(tmp_path, tiny_model, data=bad, train={**FAST, "max_steps": 1})
    assert run_agent(workdir, timeout=120) == 1
    st = state(workdir)
    assert st.phase == "failed" and st.error is not None
    assert "data/train.jsonl row 3" in st.error["message"], st.error
    assert not (workdir / MANIFEST_FILE).exists()


def _check(python: list[str], pythonpath: Path | None = None) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [*python, "-m", "loraburst.remote.agent", "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    info: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return info


def test_check_reports_the_stack(tmp_path: Path) -> None:
    info = _check([sys.executable])
    expected = {"python", "torch", "cuda", "gpus", "bitsandbytes", "bnb_smoke", "missing", "errors"}
    assert expected <= set(info)
    assert info["missing"] == [] and info["bitsandbytes"] is True
    assert isinstance(info["torch"], str) and info["cuda"] is False and info["gpus"] == []

    # With the standard library only (no site-packages), it still answers, listing what's missing.
    code = tmp_path / "code" / "loraburst"
    shutil.copytree(Path(__file__).parents[2] / "remote", code / "remote")
    (code / "__init__.py").write_text("")
    bare = _check([sys.executable, "-S"], code.parent)
    assert bare["torch"] is None and "torch" in bare["errors"]  # type: ignore[operator]
    names = [r.split(">=")[0] for r in TRAINER_REQUIREMENTS]
    assert bare["missing"] == names
