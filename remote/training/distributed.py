"""The trainer on more than one GPU: one process per GPU under ``torchrun``, DDP or FSDP-QLoRA
through Hugging Face's ``Trainer`` (accelerate), with our own bookkeeping kept consistent.

The agent starts ``torch.distributed.run --standalone --nproc_per_node N`` with
:mod:`loraburst.remote.rank` as the program; every rank runs the recipe. What differs from one
GPU is decided here, once:

- the strategy (:func:`choose_strategy`): the spec's ``train.distributed``, or on "auto" the first
  of :mod:`..sharding`'s strategies whose per-GPU plan fits the card (DDP when the quantised
  model fits one card, else FSDP, else FSDP with the sharded parameters in host memory); a
  checkpoint being resumed binds it: one written under FSDP resumes under FSDP at any world
  size, one rank included (the agent starts torchrun for it), one written without it under DDP;
- what ``TrainingArguments`` gets (:func:`training_kwargs`): FSDP's full sharding by decoder
  layer, ``use_orig_params``, RAM-efficient loading, activation checkpointing, a full state dict
  for the adapter at the end;
- the fast path's parts that cannot run under it (:func:`turned_off`), said in an event;
- each optimizer step's loss, tokens and stop flag summed over the ranks
  (:func:`reduce_step`), so every rank stops at the same step and rank 0 reports the loss of the
  whole global batch; a loss of 0 or NaN in the first steps is refused on every rank
  (:class:`DistributedTrainingError`), the known silent failure of mismatched storage dtypes.

Rank 0 alone writes state, events, checkpoint announcements, the adapter, metrics and the
manifest (:func:`is_main`, used in :mod:`.outputs` and :mod:`.progress`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from .. import planning, sharding
from ..memory import shape_from_config
from ..protocol import JobSpecData

__all__ = [
    "CHECKED_STEPS",
    "Context",
    "DistributedTrainingError",
    "check_engine",
    "check_quant_storage",
    "check_sharded",
    "choose_strategy",
    "current",
    "is_main",
    "reduce_step",
    "training_kwargs",
    "turned_off",
]

# Steps whose loss is checked for 0 and NaN: a model training on garbage weights (an NF4
# storage dtype FSDP flattened wrongly) shows it from the first step.
CHECKED_STEPS = 3


class DistributedTrainingError(RuntimeError):
    """Multi-GPU training cannot go on (a storage dtype mismatch, a loss of 0 or NaN)."""


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place among the ranks (torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (its environment is set)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def engaged(self, spec: JobSpecData, *, fsdp_checkpoint: bool = False) -> bool:
        """Whether the multi-GPU path runs: more than one rank, or one rank under torchrun with
        a strategy named (a rehearsal of FSDP or DDP on one GPU: benchmarks/multi_gpu_h200.py)
        or resuming a checkpoint written under FSDP (the agent starts torchrun for it)."""
        return self.world > 1 or (
            self.launched and (spec.train.distributed != "auto" or fsdp_checkpoint)
        )


def current() -> Context:
    """The ranks as torchrun set them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process
    when they are absent."""
    env = os.environ
    try:
        return Context(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                       int(env.get("LOCAL_RANK", 0)), "WORLD_SIZE" in env)  # fmt: skip
    except ValueError:
        return Context()


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return current().main


def choose_strategy(
    spec: JobSpecData, model_path: str, world: int, *, cuda: bool, checkpoint: str | None = None
) -> dict[str, Any]:
    """DDP, FSDP or FSDP with offload for ``world`` GPUs, and the per-GPU plan behind it.

    ``train.distributed`` other than "auto" is taken as given. On "auto" the model's
    ``config.json`` is planned as the client's estimate plans it (:mod:`..sharding`,
    :func:`..planning.plan_memory` with the predicted probe) against this card's memory; the
    first strategy that fits wins, else the leanest. Without CUDA (tests on CPU) "auto" is DDP;
    FSDP runs on CPU over gloo when asked for, FSDP with offload does not.

    The checkpoint the job resumes from binds the engine (``checkpoint``: "fsdp" when written
    under FSDP, "plain" when by one GPU or DDP, None without one): Trainer loads FSDP's model and
    optimizer state only under FSDP, and under FSDP only those (accelerate reads FSDP's
    ``optimizer.bin``, not ``optimizer.pt``). An FSDP checkpoint resumes under FSDP at any
    world size: "auto" picks among the FSDP strategies and "ddp" is refused. A plain one resumes
    under DDP: "auto" picks DDP and "fsdp" is refused (before the model loads, not at the
    first step).

    Returns:
        ``strategy``, ``gpus``, ``per_gpu_gib`` (predicted, when planned), ``host_ram_gib``;
        ``resumes_fsdp_checkpoint`` for an FSDP checkpoint.

    Raises:
        DistributedTrainingError: fsdp+offload without CUDA; a strategy that cannot resume the
            checkpoint.
    """
    chosen = _choose(spec, model_path, world, cuda=cuda, checkpoint=checkpoint)
    return {**chosen, "resumes_fsdp_checkpoint": True} if checkpoint == "fsdp" else chosen


def _choose(
    spec: JobSpecData, model_path: str, world: int, *, cuda: bool, checkpoint: str | None
) -> dict[str, Any]:
    asked = spec.train.distributed
    fsdp = checkpoint == "fsdp"
    if asked != "auto" and checkpoint is not None and asked.startswith("fsdp") != fsdp:
        raise DistributedTrainingError(
            f"train.distributed: {asked}, but the checkpoint to resume was written "
            + ("under FSDP, whose state Trainer resumes only under FSDP: use "
               "train.distributed: fsdp or auto" if fsdp else "without FSDP (one GPU or DDP), "
               "whose state Trainer resumes only without FSDP: use train.distributed: ddp or auto")
            + " (or start over without the checkpoint)"
        )  # fmt: skip
    if asked == "fsdp+offload" and not cuda:
        # Offload moves the sharded parameters from the GPU to host memory: without a GPU they
        # are in host memory already. FSDP itself runs on CPU (gloo; hf.py turns it on).
        raise DistributedTrainingError(
            f"train.distributed: {asked} needs CUDA GPUs (it offloads GPU shards to host memory); "
            "on CPU use train.distributed: fsdp, ddp or auto"
        )
    if asked != "auto" or not cuda:
        strategy = asked if asked != "auto" else ("fsdp" if fsdp else "ddp")
        return {"strategy": strategy, "gpus": world, "planned": False}
    import torch

    config = json.loads((Path(model_path) / "config.json").read_text()) if Path(
        model_path, "config.json").is_file() else _hub_config(spec, model_path)  # fmt: skip
    shape = shape_from_config(config)
    from ..memory import lora_params

    lora = lora_params(shape, spec.lora.r, spec.lora.target_modules)
    bits = spec.quant.bits if spec.quantized else 16
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    budget = min(total, float(spec.train.max_gpu_memory_gib or total)) - 0.55
    tokens = spec.train.max_seq_len * (1 if spec.train.micro_batch_size == "auto"
                                       else int(spec.train.micro_batch_size))  # fmt: skip
    chosen: dict[str, Any] = {}
    for strategy in sharding.STRATEGIES:
        if checkpoint is not None and strategy.startswith("fsdp") != fsdp:
            continue  # an engine that cannot resume the checkpoint
        lay = sharding.layout(shape, strategy=strategy, gpus=world, bits=bits,
                              double_quant=spec.quant.double_quant, trainable=lora)  # fmt: skip
        probe = planning.predict_probe(shape, str(config.get("model_type", "llama")))
        if not lay.fast_path:
            probe = {**planning.predict_probe(shape, "stock"), "cache_bytes": 0}
        plan = planning.plan_memory(
            probe=probe, base_bytes=lay.base_bytes, trainable=lay.trainable,
            n_layers=shape.layers, hidden=shape.hidden, vocab=shape.vocab, budget_gib=budget,
            tokens=tokens, seq_len=spec.train.max_seq_len,
            policy="auto" if lay.fast_path else "all", softcap=shape.logit_softcap,
        )  # fmt: skip
        chosen = {"strategy": strategy, "gpus": world, "planned": True,
                  "per_gpu_gib": plan["predicted_peak_gib"],
                  "host_ram_gib": round(lay.host_ram_bytes / 1024**3, 1)}  # fmt: skip
        if plan["fits"]:
            break
    return chosen


def _hub_config(spec: JobSpecData, model: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config: dict[str, Any] = AutoConfig.from_pretrained(
        model, revision=spec.model_revision
    ).to_dict()
    return config


def turned_off(strategy: str) -> list[str]:
    """The fast path's parts that do not run under ``strategy``, each with why."""
    if strategy == "ddp":
        return []  # each rank holds the whole model: the fast path patches it as on one GPU
    return [
        "the fast path (fused projections, dequant cache, per-layer recompute plan, chunked "
        "loss): FSDP flattens and reshards the NF4 weights it patches around; FSDP's activation "
        "checkpointing and stock PEFT layers run instead",
    ]


def decoder_layer_classes(model: Any) -> list[str]:
    """Class names of the decoder layers (FSDP's unit of sharding): the modules of the layer
    list that transformers declares unsplittable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise DistributedTrainingError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules): FSDP "
            "cannot wrap it by layer; use train.distributed: ddp"
        )
    return names


def training_kwargs(
    strategy: str, model: Any, *, checkpointing: bool, cuda: bool
) -> dict[str, Any]:
    """``TrainingArguments`` keywords for ``strategy`` (DDP: none beyond torchrun's)."""
    if strategy == "ddp":
        # Every LoRA weight gets a gradient each step: no search for unused parameters.
        return {"ddp_find_unused_parameters": False, "ddp_backend": "nccl" if cuda else "gloo"}
    fsdp = "full_shard auto_wrap" + (" offload" if strategy == "fsdp+offload" else "")
    return {
        **({} if cuda else {"ddp_backend": "gloo"}),
        "fsdp": fsdp,
        "fsdp_config": {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
            "reshard_after_forward": True,
            # Rank 0 reads the checkpoint; the others build the model on the meta device. (On
            # CPU, accelerate's plugin would look for a GPU to build it on: every rank loads.)
            "cpu_ram_efficient_loading": cuda,
            # The adapter at the end (and in checkpoints) as one full, unsharded state dict:
            # loadable by PeftModel anywhere. Full state dicts are the same at any world size:
            # a checkpoint resumes under FSDP on any number of ranks, one included (Trainer
            # loads it only under FSDP: the agent starts one rank under torchrun for it).
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": checkpointing,
        },
    }


def check_engine(trainer: Any, strategy: str) -> None:
    """Refuse a Trainer whose engine is not the strategy asked for (FSDP asked, DDP built).

    Raises:
        DistributedTrainingError: naming what was asked and what accelerate set up.
    """
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    if strategy.startswith("fsdp") != fsdp:
        raise DistributedTrainingError(
            f"asked for {strategy}, but accelerate set up "
            f"{trainer.accelerator.distributed_type} (FSDP {'on' if fsdp else 'off'})"
        )


def check_quant_storage(model: Any, dtype: Any) -> None:
    """Refuse FSDP over NF4 weights whose storage dtype is not the compute dtype.

    FSDP flattens every parameter of a unit to one dtype: 4-bit weights stored as ``uint8``
    next to bf16 ones are either skipped or, with a mismatched float storage, cast, and the model
    then trains on garbage weights without an error. ``bnb_4bit_quant_storage`` = the compute
    dtype (:func:`.loading.load_model` sets it) is what makes them shardable.

    Raises:
        DistributedTrainingError: naming a parameter, its storage dtype and the compute dtype.
    """
    for name, param in model.named_parameters():
        if type(param).__name__ != "Params4bit":
            continue
        if param.dtype != dtype:
            raise DistributedTrainingError(
                f"FSDP needs the 4-bit weights stored in the compute dtype ({dtype}), but {name} "
                f"is stored as {param.dtype}: set bnb_4bit_quant_storage to {dtype} (the trainer "
                "does for train.distributed fsdp), or train with DDP"
            )


def check_sharded(model: Any, world: int) -> dict[str, int]:
    """Refuse a model FSDP did not shard: what runs under an FSDP request must hold only its
    shard of each parameter (FSDP2's ``DTensor`` split over the ``world`` ranks), 4-bit weights
    included. Called on the wrapped model at the first step, on every rank.

    Returns:
        ``params``, ``sharded`` (parameters split over ``world`` ranks), ``nf4`` and
        ``nf4_sharded`` (the 4-bit weights, of which sharded), ``elements`` (the whole model's)
        and ``local_elements`` (this rank's).

    Raises:
        DistributedTrainingError: naming a parameter that is whole on this rank.
    """
    from torch.distributed.tensor import DTensor, Shard

    counts = dict.fromkeys(("params", "sharded", "nf4", "nf4_sharded", "elements",
                            "local_elements"), 0)  # fmt: skip
    whole: list[str] = []
    four_bit = {f"{name}.weight" for name, module in model.named_modules()
                if type(module).__name__ == "Linear4bit"
                and type(module).__module__.startswith("bitsandbytes")}  # fmt: skip
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        split = isinstance(param, DTensor) and param.device_mesh.size() == world and any(
            isinstance(p, Shard) for p in param.placements)  # fmt: skip
        nf4 = name in four_bit
        counts["params"] += 1
        counts["sharded"] += split
        counts["nf4"] += nf4
        counts["nf4_sharded"] += nf4 and split
        counts["elements"] += param.numel()
        counts["local_elements"] += local.numel()
        if not split:
            whole.append(name)
    if whole:
        raise DistributedTrainingError(
            f"asked for FSDP, but {len(whole)} of {counts['params']} parameters are whole on this "
            f"rank, not sharded over {world} ranks (e.g. {whole[0]}); use train.distributed: ddp"
        )
    return counts


def reduce_step(trainer: Any, stop: bool) -> tuple[float | None, int, bool]:
    """Sum this optimizer step's loss, tokens and stop flag over the ranks (a collective:
    every rank calls it once per step). Returns the global batch's loss, its tokens and
    whether any rank must stop.

    Raises:
        DistributedTrainingError: the loss is 0 or NaN in one of the first
            :data:`CHECKED_STEPS` steps (every rank raises: they all see the same sum).
    """
    import torch
    import torch.distributed as dist

    loss = trainer.step_loss
    device = loss.device if loss is not None else trainer.args.device
    values = torch.stack([
        loss.float() if loss is not None else torch.zeros((), device=device),
        torch.tensor(float(trainer.step_tokens), device=device),
        torch.tensor(1.0 if stop else 0.0, device=device),
    ])  # fmt: skip
    dist.all_reduce(values)  # SUM: the one op gloo and NCCL both have
    total, tokens, flags = values.tolist()
    world = dist.get_world_size()
    # Each rank's loss is its share of the global batch's token mean times the world size
    # (Trainer scales it so DDP's gradient average is the global mean): the mean is the sum / N.
    value = total / world if loss is not None else None
    step = trainer.state.global_step
    if value is not None and step <= CHECKED_STEPS and (math.isnan(value) or value == 0.0):
        raise DistributedTrainingError(
            f"loss {value} at step {step} on {world} ranks: the model is not learning from real "
            "weights (a 4-bit storage dtype FSDP cannot shard, or a broken checkpoint); "
            "refusing to train on. Try train.distributed: ddp, or one GPU, to compare"
        )
    return value, int(tokens), flags > 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
