"""What the trainer hands FSDP and how many ranks the agent starts: the NF4 storage dtype check
on real bitsandbytes weights, Trainer's FSDP arguments, the ranks' count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraburst import JobSpec
from loraburst.remote.agent import trainer_processes
from loraburst.remote.protocol import ENV_GPUS, JobSpecData
from loraburst.remote.training import distributed, loading


def _spec(model: Path, **kw: object) -> JobSpecData:
    dumped = JobSpec(model=str(model), dataset="d.jsonl", **kw).model_dump(mode="json")  # type: ignore[arg-type]
    from loraburst.remote.protocol import BundleSpec

    return BundleSpec.from_dict({"protocol_version": 1, "job_id": "t", "data_format": "messages",
                                 "spec": dumped}).spec  # fmt: skip


def test_nf4_weights_must_be_stored_in_the_compute_dtype_for_fsdp(tiny_model: Path) -> None:
    import torch

    spec = _spec(tiny_model, quant={"compute_dtype": "float32"})
    plain, _ = loading.load_model(spec, str(tiny_model))
    with pytest.raises(distributed.DistributedTrainingError, match="bnb_4bit_quant_storage"):
        distributed.check_quant_storage(plain, torch.float32)
    sharded, _ = loading.load_model(spec, str(tiny_model), sharded=True)
    kinds = {type(p).__name__ for p in sharded.parameters()}
    assert "Params4bit" in kinds  # still NF4, now in a dtype FSDP can flatten with the rest
    distributed.check_quant_storage(sharded, torch.float32)
    with pytest.raises(distributed.DistributedTrainingError, match="stored as torch.float32"):
        distributed.check_quant_storage(sharded, torch.bfloat16)


def test_fsdp_arguments_shard_by_decoder_layer_with_a_full_adapter_state_dict(
    tiny_model: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model, quant={"compute_dtype": "float32"})
    model, _ = loading.load_model(spec, str(tiny_model))
    kw = distributed.training_kwargs("fsdp+offload", model, checkpointing=True, cuda=True)
    assert kw["fsdp"] == "full_shard auto_wrap offload"
    config = kw["fsdp_config"]
    assert config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert config["state_dict_type"] == "FULL_STATE_DICT"
    assert config["cpu_ram_efficient_loading"] and config["activation_checkpointing"]
    assert distributed.training_kwargs("fsdp", model, checkpointing=False, cuda=True)[
        "fsdp"] == "full_shard auto_wrap"  # fmt: skip
    ddp = distributed.training_kwargs("ddp", model, checkpointing=True, cuda=False)
    assert ddp == {"ddp_find_unused_parameters": False, "ddp_backend": "gloo"}
    assert distributed.turned_off("ddp") == [] and "FSDP" in distributed.turned_off("fsdp")[0]


def test_fsdp_auto_and_explicit_strategies(tiny_model: Path) -> None:
    assert distributed.choose_strategy(_spec(tiny_model), str(tiny_model), 2, cuda=False)[
        "strategy"] == "ddp"  # fmt: skip
    spec = _spec(tiny_model, train={"distributed": "fsdp+offload"})
    with pytest.raises(distributed.DistributedTrainingError, match="needs CUDA GPUs"):
        distributed.choose_strategy(spec, str(tiny_model), 2, cuda=False)


def test_ranks_started_per_gpu_but_one_for_preference_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = bundle / "spec.json"
    spec.write_text(json.dumps({"spec": {"objective": {"type": "sft"}, "train": {}}}))
    monkeypatch.setenv(ENV_GPUS, "4")
    assert trainer_processes(tmp_path) == 4
    monkeypatch.setenv(ENV_GPUS, "1")
    assert trainer_processes(tmp_path) == 1
    spec.write_text(json.dumps({"spec": {"objective": {"type": "dpo"}, "train": {}}}))
    monkeypatch.setenv(ENV_GPUS, "2")
    assert trainer_processes(tmp_path) == 1  # DPO/ORPO train on one GPU
    monkeypatch.delenv(ENV_GPUS)
    spec.write_text(json.dumps({"spec": {"objective": {"type": "sft"}, "train": {}}}))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: one process
    assert trainer_processes(tmp_path) == 1


def test_a_rank_leaves_with_its_code_its_output_flushed_and_no_teardown(tmp_path: Path) -> None:
    """A finished rank skips the interpreter's teardown (where gloo's C++ destructors can abort
    it and torchrun then fails the job), yet nothing it printed is lost: stdout to a pipe is
    block-buffered, so an unflushed ``os._exit`` would drop the rank's last lines."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe is
    marker = tmp_path / "teardown-ran"
    code = (
        "import atexit, pathlib, sys\n"
        "from loraburst.remote.rank import leave\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).touch)\n"
        "sys.stdout.write('last line, no newline')\n"
        "sys.stderr.write('to stderr')\n"
        "leave(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert done.returncode == 3
    assert done.stdout == "last line, no newline"
    assert done.stderr == "to stderr"
    assert not marker.exists()  # the teardown (here an atexit hook) never ran

    usage = subprocess.run([sys.executable, "-m", "loraburst.remote.rank"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert usage.returncode == 2 and "usage: torchrun" in usage.stderr
