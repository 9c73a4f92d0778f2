"""FSDP on several "GPUs": two ranks under torchrun with gloo on CPU, the real agent on a
hand-built WORKDIR (tiny real Llama, bitsandbytes NF4 stored in float32), FSDP2 through Trainer.

accelerate sets FSDP up only for GPU process groups; the trainer turns it on for a CPU group
(``training/hf.py``) and checks at the first step that every parameter, the 4-bit weights too,
is really sharded over the ranks (each rank says what it holds in agent.log). What is checked
here: the losses match one process on the same global batch, the adapter is one full state dict
that PeftModel loads, a two-rank run resumes from its FSDP checkpoint on two ranks and on one
(the agent starts one FSDP rank under torchrun for it) and the one rank's checkpoint on two again,
each following the uninterrupted run, and killing one rank ends the job and every rank.

Tolerances: both runs compute in float32 on the same weights and the same batches; they differ
only in where the two micro-batches' gradients are added (FSDP's reduce-scatter averages the
ranks' gradients, one process accumulates them), a rounding difference of ~1e-7 per value that
AdamW carries over six steps. rel=1e-4 on the loss and rtol=1e-3/atol=1e-5 on the adapter (as for
DDP) are far above that and far below what a wrong shard, a dropped rank or a skipped step moves.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from loraburst import JobSpec
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    BundleSpec,
    JobSpecData,
    verify_manifest,
)
from loraburst.remote.training import distributed

from tests.remote._workdir import events, log, make_workdir, run_agent, state
from tests.remote.test_multi_gpu import (
    TRAIN,
    _kill_one_rank_and_see_every_rank_end,
    _lora,
    _losses,
)

SHARDS = re.compile(
    r"\[rank (\d)/2\] FSDP shards (\d+) of (\d+) parameters \((\d+) of (\d+) 4-bit weights\): "
    r"this rank holds (\d+) of (\d+) elements"
)


def _spec(model: Path, **kw: object) -> JobSpecData:
    dumped = JobSpec(model=str(model), dataset="d.jsonl", **kw).model_dump(mode="json")  # type: ignore[arg-type]
    doc = {"protocol_version": 1, "job_id": "t", "data_format": "messages", "spec": dumped}
    return BundleSpec.from_dict(doc).spec


def _log(workdir: Path) -> str:
    """The whole agent.log (every rank's output)."""
    return (workdir / "agent.log").read_text(errors="replace")


def _run(workdir: Path, gpus: int) -> None:
    assert run_agent(workdir, {"LORABURST_GPUS": str(gpus)}, timeout=400) == 0, log(workdir)


def _go_on(source: Path, workdir: Path, steps: int, **train: object) -> Path:
    """A copy of ``source``'s run whose job now has ``steps`` steps (and ``train``'s fields),
    its events cleared: what the next attempt of the job finds."""
    shutil.copytree(source, workdir)
    spec_path = workdir / "bundle" / "spec.json"
    doc = json.loads(spec_path.read_text())
    doc["spec"]["train"].update(max_steps=steps, **train)
    spec_path.write_text(json.dumps(doc))
    (workdir / "events.jsonl").unlink()
    return workdir


def _adapter_at(one_process: Path, step: int) -> dict[str, object]:
    """The uninterrupted run's adapter after ``step`` steps (its last step: adapter/)."""
    last = json.loads((one_process / METRICS_FILE).read_text())["steps"]
    return _lora(one_process / (ADAPTER_DIR if step == last else f"checkpoints/checkpoint-{step}"))


def _follows_the_uninterrupted_run(
    workdir: Path, one_process: Path, checkpoint: int, steps: int
) -> None:
    """``workdir`` resumed from ``checkpoint-<checkpoint>`` and ran to ``steps``; its later steps
    are the uninterrupted run's: the weights, AdamW's moments and step count, and the data
    position all came back (fresh moments would move the adapter otherwise)."""
    import torch

    (resumed,) = [e for e in events(workdir) if e["kind"] == "resuming"]
    assert resumed["checkpoint"] == f"checkpoint-{checkpoint}"
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == checkpoint
    straight = _losses(one_process)
    assert metrics["losses"][checkpoint:] == pytest.approx(straight[checkpoint:steps], rel=1e-4)
    la, lb = _lora(workdir / ADAPTER_DIR), _adapter_at(one_process, steps)
    assert la.keys() == lb.keys() and la
    for key in la:
        torch.testing.assert_close(la[key], lb[key], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def fsdp_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two FSDP ranks, 4 steps of a global batch of 2 micro-batches (checkpoints at 2 and 4)."""
    train = {**TRAIN, "max_steps": 4, "grad_accum": 2, "distributed": "fsdp"}
    workdir = make_workdir(tmp_path_factory.mktemp("fsdp"), tiny_model, train=train)
    _run(workdir, 2)
    return workdir


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job, 8 steps, as one process (no torchrun): the uninterrupted run (its
    checkpoint-6 holds the adapter at step 6)."""
    train = {**TRAIN, "max_steps": 8, "grad_accum": 2}
    workdir = make_workdir(tmp_path_factory.mktemp("one"), tiny_model, train=train)
    _run(workdir, 1)
    return workdir


@pytest.mark.slow
def test_fsdp_on_two_ranks_shards_the_nf4_model_and_matches_one_process(
    fsdp_run: Path, one_process: Path, tiny_model: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = fsdp_run
    (plan,) = [e for e in events(two) if e["kind"] == "distributed"]
    assert plan["strategy"] == "fsdp" and plan["gpus"] == 2 and plan["grad_accum_per_rank"] == 1
    assert plan["turned_off"]  # the fast path does not run under FSDP
    # Really FSDP: on each rank every parameter is a shard, the NF4 weights (14 projections of
    # 2 layers) included, and each rank holds half of the model's elements.
    found = {int(m[1]): [int(x) for x in m.groups()[1:]] for m in SHARDS.finditer(_log(two))}
    assert set(found) == {0, 1}, log(two)
    for sharded, params, nf4_sharded, nf4, local, total in found.values():
        assert sharded == params > 0 and nf4_sharded == nf4 == 14
        assert local * 2 == total
    # The same losses and tokens as one process over the same global batches.
    a, b = _losses(two), _losses(one_process)[:4]
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4) and a[-1] < a[0]
    ma, mb = (json.loads((w / METRICS_FILE).read_text()) for w in (two, one_process))
    assert ma["steps"] == 4 and ma["train_tokens"] > 0
    # One full adapter (not rank 0's shard): every LoRA tensor has its whole shape, and
    # PeftModel loads it onto the base model.
    adapter = _lora(two / ADAPTER_DIR)
    reference = _lora(one_process / ADAPTER_DIR)
    assert adapter.keys() == reference.keys() and adapter
    for key, tensor in adapter.items():
        assert tensor.shape == reference[key].shape, key
    assert verify_manifest(two, json.loads((two / MANIFEST_FILE).read_text())) == []
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tuned = PeftModel.from_pretrained(base, str(two / ADAPTER_DIR))
    loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapter)
    assert torch.isfinite(tuned(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    assert state(two).phase == "done" and state(two).step == 4


@pytest.mark.slow
def test_two_fsdp_ranks_resume_from_their_checkpoint(
    fsdp_run: Path, one_process: Path, tmp_path: Path
) -> None:
    # The 4-step FSDP run goes on to 6 steps on two ranks again, from its FSDP checkpoint
    # (a full state dict of the model and the optimizer).
    workdir = _go_on(fsdp_run, tmp_path / "run", 6)
    assert (workdir / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()
    _run(workdir, 2)
    _follows_the_uninterrupted_run(workdir, one_process, 4, 6)


@pytest.fixture(scope="module")
def on_one_rank(fsdp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-GPU box is gone; the retry lands on one GPU (the spec on "auto": FSDP is not
    named). The 4-step FSDP run goes on to 6 steps from its checkpoint-4."""
    workdir = _go_on(fsdp_run, tmp_path_factory.mktemp("on_one") / "run", 6, distributed="auto")
    _run(workdir, 1)
    return workdir


@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(
    on_one_rank: Path, one_process: Path
) -> None:
    # The agent sees the FSDP checkpoint and starts one FSDP rank under torchrun, which loads
    # the full model and optimizer state the two ranks wrote.
    workdir = on_one_rank
    (launch,) = [e for e in events(workdir) if e["kind"] == "launching"]
    assert launch["processes"] == 1 and "checkpoint-4 was written under FSDP" in launch["why"]
    (plan,) = [e for e in events(workdir) if e["kind"] == "distributed"]
    assert plan["strategy"] == "fsdp" and plan["gpus"] == 1 and plan["resumes_fsdp_checkpoint"]
    assert plan["grad_accum_per_rank"] == 2  # the same global batch as the two ranks'
    assert re.search(r"\[rank 0/1\] FSDP shards (\d+) of \1 parameters", _log(workdir))
    assert [e["step"] for e in events(workdir) if e["kind"] == "step"] == [5, 6]
    _follows_the_uninterrupted_run(workdir, one_process, 4, 6)
    assert verify_manifest(workdir, json.loads((workdir / MANIFEST_FILE).read_text())) == []


@pytest.mark.slow
def test_a_one_rank_fsdp_checkpoint_resumes_on_two_ranks(
    on_one_rank: Path, one_process: Path, tmp_path: Path
) -> None:
    # The other way: the one rank's checkpoint-6 (written under FSDP at world size 1) goes on
    # to 8 steps on two ranks, whose shards come from its full state dicts.
    workdir = _go_on(on_one_rank, tmp_path / "run", 8)
    assert (workdir / "checkpoints" / "checkpoint-6" / "pytorch_model_fsdp.bin").is_file()
    _run(workdir, 2)
    (launch,) = [e for e in events(workdir) if e["kind"] == "launching"]
    assert launch["processes"] == 2 and "why" not in launch
    (plan,) = [e for e in events(workdir) if e["kind"] == "distributed"]
    assert plan["strategy"] == "fsdp" and plan["gpus"] == 2 and plan["grad_accum_per_rank"] == 1
    _follows_the_uninterrupted_run(workdir, one_process, 6, 8)


def test_an_fsdp_checkpoint_asks_for_fsdp_again(tiny_model: Path, tmp_path: Path) -> None:
    from loraburst.remote.training import checkpoints

    plain, fsdp = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for folder, name in ((plain, "optimizer.pt"), (fsdp, "pytorch_model_fsdp.bin")):
        folder.mkdir()
        (folder / name).write_bytes(b"")
    assert not checkpoints.written_under_fsdp(plain) and checkpoints.written_under_fsdp(fsdp)
    auto = _spec(tiny_model)
    one = distributed.Context(launched=True)
    assert not one.engaged(auto) and one.engaged(auto, fsdp_checkpoint=True)
    assert not distributed.Context().engaged(auto, fsdp_checkpoint=True)  # not under torchrun
    for world in (1, 4):
        chosen = distributed.choose_strategy(auto, str(tiny_model), world, cuda=False,
                                             checkpoint="fsdp")  # fmt: skip
        assert chosen["strategy"] == "fsdp" and chosen["resumes_fsdp_checkpoint"]
    ddp = _spec(tiny_model, train={"distributed": "ddp"})
    with pytest.raises(distributed.DistributedTrainingError, match="written under FSDP"):
        distributed.choose_strategy(ddp, str(tiny_model), 1, cuda=False, checkpoint="fsdp")
    # The other way: a checkpoint of one GPU or DDP (optimizer.pt) resumes under DDP; FSDP
    # would look for its optimizer.bin at the first step (accelerate's load_fsdp_optimizer).
    chosen = distributed.choose_strategy(auto, str(tiny_model), 2, cuda=False, checkpoint="plain")
    assert chosen["strategy"] == "ddp" and "resumes_fsdp_checkpoint" not in chosen
    fsdp_spec = _spec(tiny_model, train={"distributed": "fsdp"})
    with pytest.raises(distributed.DistributedTrainingError, match="written without FSDP"):
        distributed.choose_strategy(fsdp_spec, str(tiny_model), 2, cuda=False, checkpoint="plain")


def test_fsdp_runs_on_cpu_but_offload_is_refused(tiny_model: Path) -> None:
    fsdp = _spec(tiny_model, train={"distributed": "fsdp"})
    assert distributed.choose_strategy(fsdp, str(tiny_model), 2, cuda=False)["strategy"] == "fsdp"
    offload = _spec(tiny_model, train={"distributed": "fsdp+offload"})
    with pytest.raises(distributed.DistributedTrainingError, match="needs CUDA GPUs"):
        distributed.choose_strategy(offload, str(tiny_model), 2, cuda=False)


def test_a_model_fsdp_did_not_shard_is_refused(tiny_model: Path) -> None:
    from loraburst.remote.training import loading

    spec = _spec(tiny_model, quant={"compute_dtype": "float32"})
    model, _ = loading.load_model(spec, str(tiny_model), sharded=True)
    kw = distributed.training_kwargs("fsdp", model, checkpointing=False, cuda=False)
    assert kw["ddp_backend"] == "gloo" and not kw["fsdp_config"]["cpu_ram_efficient_loading"]
    # Whole parameters on a rank of two (what DDP would run): refused, naming one.
    with pytest.raises(distributed.DistributedTrainingError, match="whole on this rank"):
        distributed.check_sharded(model, 2)


@pytest.mark.slow
def test_killing_one_fsdp_rank_ends_the_job_and_every_rank(
    tiny_model: Path, tmp_path: Path
) -> None:
    # The survivor waits in one of FSDP's collectives (an all-gather, a reduce-scatter) for a
    # peer that is gone: torchrun ends it, the job fails, nothing is left running.
    train = {**TRAIN, "max_steps": 100000, "distributed": "fsdp"}
    _kill_one_rank_and_see_every_rank_end(make_workdir(tmp_path, tiny_model, train=train))
