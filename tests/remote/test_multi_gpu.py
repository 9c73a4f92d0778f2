"""The trainer on several "GPUs": two ranks under torchrun with gloo on CPU, the real agent on a
hand-built WORKDIR (tiny real Llama, bitsandbytes NF4 on CPU), DDP through Trainer.

FSDP on two CPU ranks runs in test_fsdp_cpu.py; these tests also check what FSDP is given
(arguments, the NF4 storage dtype).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    verify_manifest,
)

from tests.remote._workdir import (
    FAST,
    events,
    log,
    make_workdir,
    run_agent,
    start_agent,
    state,
)

# A constant learning rate: a run resumed with more steps follows the same schedule.
TRAIN = {**FAST, "lr_scheduler": "constant", "save_every_steps": 2}


def _losses(workdir: Path) -> list[float]:
    return [float(x) for x in json.loads((workdir / METRICS_FILE).read_text())["losses"]]


def _lora(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _run(root: Path, model: Path, gpus: int, **train: Any) -> Path:
    workdir = make_workdir(root, model, train={**TRAIN, **train})
    assert run_agent(workdir, {"LORABURST_GPUS": str(gpus)}, timeout=400) == 0, log(workdir)
    return workdir


def test_ddp_on_two_ranks_matches_one_process_on_the_same_global_batch(
    tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = _run(tmp_path / "two", tiny_model, 2, max_steps=4, grad_accum=2)
    one = _run(tmp_path / "one", tiny_model, 1, max_steps=4, grad_accum=2)
    # Rank 0 alone reported: one launch, one distributed plan, one event per step, one end.
    kinds = [e["kind"] for e in events(two)]
    assert kinds.count("step") == 4 and kinds.count("done") == 1 and "failed" not in kinds
    (launch,) = [e for e in events(two) if e["kind"] == "launching"]
    assert launch["processes"] == 2 and launch["launcher"] == "torchrun"
    (plan,) = [e for e in events(two) if e["kind"] == "distributed"]
    assert plan["strategy"] == "ddp" and plan["gpus"] == 2
    # grad_accum 2 split over 2 ranks: the global batch is the one process's.
    assert (
        plan["grad_accum_per_rank"] == 1 and plan["global_batch"] == 2 * TRAIN["micro_batch_size"]
    )
    assert "launching" not in [e["kind"] for e in events(one)]
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 4 and all(math.isfinite(x) for x in a)
    assert a == pytest.approx(b, rel=1e-4)
    assert a[-1] < a[0]  # it learns
    # The same tokens counted, and the same adapter trained.
    ma, mb = (json.loads((w / METRICS_FILE).read_text()) for w in (two, one))
    assert ma["train_tokens"] == mb["train_tokens"] > 0
    la, lb = _lora(two / ADAPTER_DIR), _lora(one / ADAPTER_DIR)
    assert la.keys() == lb.keys() and la
    for key in la:
        torch.testing.assert_close(la[key], lb[key], rtol=1e-3, atol=1e-5)
    # One adapter, sealed by rank 0, verified, and loadable with PeftModel.
    manifest = json.loads((two / MANIFEST_FILE).read_text())
    assert verify_manifest(two, manifest) == []
    assert not (two / ADAPTER_DIR / "training_args.bin").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tuned = PeftModel.from_pretrained(base, str(two / ADAPTER_DIR))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(tuned(input_ids=ids).logits).all()
    assert state(two).phase == "done" and state(two).step == 4


def _rank_pids(workdir: Path) -> dict[int, int]:
    """{rank: pid} of the trainer ranks running in ``workdir``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"loraburst.remote.rank" not in cmd or str(workdir).encode() not in cmd:
                continue
            env = dict(
                kv.split(b"=", 1)
                for kv in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
            found[int(env[b"RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def _kill_one_rank_and_see_every_rank_end(workdir: Path) -> None:
    """Start the job on two ranks, SIGKILL rank 1 after the first step: the job fails, torchrun
    ends rank 0 too, nothing is left running and no adapter is sealed."""
    proc = start_agent(workdir, {"LORABURST_GPUS": "2"})
    try:
        _wait_for_steps(workdir, proc, 1)
        ranks = _rank_pids(workdir)
        assert set(ranks) == {0, 1}
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.wait(timeout=120) == 1, log(workdir)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = state(workdir)
    assert st.phase == "failed" and st.error is not None
    assert _rank_pids(workdir) == {}
    assert not (workdir / MANIFEST_FILE).exists()


def test_killing_one_rank_ends_the_job_and_every_rank(tiny_model: Path, tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path, tiny_model, train={**TRAIN, "max_steps": 100000})
    _kill_one_rank_and_see_every_rank_end(workdir)


def test_resume_from_a_checkpoint_on_a_different_number_of_gpus(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Two ranks train 4 steps (checkpoints at 2 and 4); the job then goes on to 6 steps as one
    # process with the same global batch, from checkpoint-4.
    workdir = _run(tmp_path / "resumed", tiny_model, 2, max_steps=4, grad_accum=2)
    first = _losses(workdir)
    spec_path = workdir / "bundle" / "spec.json"
    doc = json.loads(spec_path.read_text())
    doc["spec"]["train"]["max_steps"] = 6
    spec_path.write_text(json.dumps(doc))
    assert run_agent(workdir, {"LORABURST_GPUS": "1"}, timeout=400) == 0, log(workdir)
    (resumed,) = [e for e in events(workdir) if e["kind"] == "resuming"]
    assert resumed["checkpoint"] == "checkpoint-4"
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 4
    # The same six steps without the interruption, on one process: the resumed steps 5 and 6
    # saw the same batches (a step means the same data at any number of GPUs).
    straight = _losses(_run(tmp_path / "straight", tiny_model, 1, max_steps=6, grad_accum=2))
    assert first == pytest.approx(straight[:4], rel=1e-4)
    assert metrics["losses"][4:] == pytest.approx(straight[4:], rel=1e-3)


def _wait_for_steps(workdir: Path, proc: Any, n: int = 1) -> None:
    deadline = time.monotonic() + 300
    while not (workdir / "events.jsonl").is_file() or (
        sum(e["kind"] == "step" for e in events(workdir)) < n
    ):
        assert proc.poll() is None and time.monotonic() < deadline, log(workdir)
        time.sleep(0.3)


def test_a_stop_reaches_every_rank_at_one_step(tiny_model: Path, tmp_path: Path) -> None:
    """SIGTERM to the agent (a cancelled job): both ranks stop at the same step, rank 0 saves
    a checkpoint and the partial adapter, and nothing is left running."""
    workdir = make_workdir(tmp_path, tiny_model, train={**TRAIN, "max_steps": 100000})
    proc = start_agent(workdir, {"LORABURST_GPUS": "2"})
    try:
        _wait_for_steps(workdir, proc, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, log(workdir)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = state(workdir)
    assert st.phase == "stopped" and st.stop_reason == "signal"
    kinds = [e["kind"] for e in events(workdir)]
    assert kinds.count("stopping") == 1 and kinds[-1] == "stopped"
    (stop,) = [e for e in events(workdir) if e["kind"] == "stopping"]
    assert (workdir / "checkpoints" / f"checkpoint-{stop['step']}").is_dir()
    assert verify_manifest(workdir, json.loads((workdir / MANIFEST_FILE).read_text())) == []
    assert _rank_pids(workdir) == {}


def test_ranks_stop_when_the_agent_is_gone(tiny_model: Path, tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path, tiny_model, train={**TRAIN, "max_steps": 100000})
    proc = start_agent(workdir, {"LORABURST_GPUS": "2"})
    try:
        _wait_for_steps(workdir, proc, 1)
        assert set(_rank_pids(workdir)) == {0, 1}
        proc.kill()  # no handler runs: the ranks notice the agent is gone
        proc.wait(timeout=30)
        deadline = time.monotonic() + 120
        while _rank_pids(workdir) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _rank_pids(workdir) == {}
    assert state(workdir).stop_reason == "agent gone"
