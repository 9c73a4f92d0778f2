"""More than one GPU of one instance: which strategy, what each GPU holds, what the host holds.

Shared by the trainer (which launches itself under ``torchrun`` and picks DDP or FSDP with this
module) and the client's estimate (which sizes rows of 2, 4 and 8 GPUs with it). Standard
library only: it runs on both sides.

The strategies, tried in this order (the first whose per-GPU plan fits is used):

``ddp``           every GPU holds the whole quantised model and its adapters and trains its own
                  micro-batches; the adapters' gradients are averaged (all-reduce) each step.
                  Per GPU: the one-GPU plan plus DDP's gradient buckets (a copy of the
                  trainable gradients).
``fsdp``          FSDP-QLoRA: the NF4 weights are stored in the compute dtype
                  (``bnb_4bit_quant_storage``) so FSDP can flatten and shard them; each decoder
                  layer is one FSDP unit. Per GPU: 1/N of the quantised linears, the adapters'
                  fp32 weights, gradients and AdamW moments / N, the layer being computed and
                  the one prefetched (all-gathered, unsharded), the root unit (embeddings, head,
                  final norm: unsharded for the whole step), and the activations of every layer
                  recomputed (activation checkpointing).
``fsdp+offload``  as ``fsdp``, with the sharded parameters (and so their gradients and the
                  optimizer step) kept in host memory: a GPU holds only the unsharded units in
                  flight and the activations. The host needs the whole quantised model plus the
                  adapters' training state in RAM while training.

Under either FSDP strategy every rank quantises the whole model in host memory while loading
(then FSDP moves its shard to its GPU), so the host needs N quantised copies at that moment:
:attr:`Layout.host_ram_bytes` is the larger of the two peaks.
"""

from __future__ import annotations

import dataclasses
import math

from .memory import Shape, param_counts

__all__ = [
    "DDP_EFFICIENCY",
    "FSDP_LINK_GBS",
    "HOST_LINK_GBS",
    "HOST_PROCESS_BYTES",
    "STRATEGIES",
    "Layout",
    "bytes_per_linear_param",
    "layout",
    "rank_grad_accum",
]

GIB = 1024**3
STRATEGIES = ("ddp", "fsdp", "fsdp+offload")

# Throughput kept per added GPU, beyond the communication this module counts explicitly. Not
# measured here (the 2-GPU run is its own issue): data-parallel LoRA all-reduces only the
# adapters' gradients (tens of MB, overlapped with the backward), so what is lost is the step's
# slowest rank (micro-batches differ in length) and the launch and sync per step; published
# DDP runs of LoRA fine-tuning on one host keep 85-95% per GPU. 0.90 is the middle.
DDP_EFFICIENCY = 0.90
# GB/s an all-gather of FSDP's weights moves between GPUs of one host: PCIe 4.0 x16 (the RTX
# 3090/4090 rows: no NVLink on most rented consumer boxes) runs ~25 GB/s each way at best and
# about 20 GB/s in NCCL's ring on two cards. Conservative for NVLink hosts (A100/H100 SXM).
FSDP_LINK_GBS = 20.0
# GB/s of pinned host-to-device copies over PCIe 4.0 x16 (the offloaded shards brought in for
# each pass), as typically measured (about half of the 32 GB/s line rate).
HOST_LINK_GBS = 12.0
# Host RAM of one training process besides the model: Python, torch, CUDA context, tokenised
# rows and the data loader.
HOST_PROCESS_BYTES = 3.0 * GIB
# Bytes of the checkpoint a rank reads at once while loading (one safetensors shard of the
# hub's usual 5 GB).
LOAD_SHARD_BYTES = 5.0e9


def bytes_per_linear_param(bits: int, double_quant: bool) -> float:
    """Bytes of one quantised linear weight: NF4/FP4 half a byte plus its absmax constants
    (blocks of 64, themselves quantised in blocks of 256 with double quantisation), int8 one
    byte plus a row scale, else bf16."""
    if bits == 4:
        return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    if bits == 8:
        return 1.0 + 4 / 4096
    return 2.0


def rank_grad_accum(grad_accum: int, gpus: int) -> int:
    """Micro-batches each of ``gpus`` ranks accumulates per optimizer step.

    The job's global batch (``micro_batch x grad_accum``) is kept: ``grad_accum`` is split over
    the ranks, so a step covers the same micro-batches on any number of GPUs and a checkpoint's
    step means the same data at any world size. Where ``gpus`` does not divide it, it is rounded
    up (the global batch grows to the next multiple of ``gpus``; the trainer says so).
    """
    return max(1, math.ceil(grad_accum / max(1, gpus)))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one GPU (and the host) holds before the first step under one strategy.

    Attributes:
        strategy: ``"1 GPU"``, ``"ddp"``, ``"fsdp"`` or ``"fsdp+offload"``.
        gpus: GPUs of the instance that train.
        base_bytes: bytes each GPU holds before training (weights, adapters, units in flight);
            what :func:`..planning.plan_memory` takes as its ``base_bytes``.
        trainable: trainable parameters whose fp32 gradient and AdamW moments live on each GPU
            (:func:`..planning.plan_memory`'s ``trainable``; 0 when offloaded to the host).
        host_ram_bytes: host memory the job needs at its peak, every rank together: under FSDP
            each rank quantises the whole model into host memory before FSDP moves its shard
            to its GPU (training/loading.py), so N quantised copies while loading; under
            offload, while training, the sharded weights and the adapters' training state.
        comm_bytes_per_pass: bytes each GPU moves per pass over the layers (FSDP's all-gathers
            and, under offload, the host-to-device copies), for the step time.
        fast_path: whether the CUDA fast path (remote/fastpath/) can run under it.
    """

    strategy: str
    gpus: int
    base_bytes: float
    trainable: int
    host_ram_bytes: float
    comm_bytes_per_pass: float
    link_gbs: float
    fast_path: bool

    def comm_seconds(self, passes: float) -> float:
        """Seconds one micro-batch spends moving weights (not overlapped: an upper bound)."""
        if self.comm_bytes_per_pass <= 0:
            return 0.0
        return passes * self.comm_bytes_per_pass / (self.link_gbs * 1e9)


def layout(
    shape: Shape,
    *,
    strategy: str,
    gpus: int,
    bits: int,
    double_quant: bool,
    trainable: int,
) -> Layout:
    """The per-GPU and host memory of ``strategy`` on ``gpus`` GPUs (see the module doc).

    Raises:
        ValueError: an unknown strategy, or fewer than one GPU.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, not {gpus}")
    counts = param_counts(shape)
    linear = counts["linear"] * bytes_per_linear_param(bits, double_quant)
    root = (counts["embed"] + counts["lm_head"] + counts["other"]) * 2.0  # bf16, unsharded
    per_layer = linear / max(1, shape.layers)
    adapters = trainable * 4.0  # fp32 LoRA weights
    small = 0.03 * GIB  # buffers, rotary tables
    model_bytes = linear + root  # what rank 0 reads and quantises while loading
    processes = gpus * HOST_PROCESS_BYTES
    loading = min(model_bytes, LOAD_SHARD_BYTES)
    if strategy in ("1 GPU", "ddp"):
        buckets = adapters if strategy == "ddp" else 0.0  # DDP's gradient buckets
        return Layout(strategy, gpus, linear + root + adapters + small + buckets, trainable,
                      processes + loading, 0.0, FSDP_LINK_GBS, True)  # fmt: skip
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    shard = 1.0 / gpus
    in_flight = 2 * per_layer  # the layer computed and the one prefetched, all-gathered
    gathered = linear * (gpus - 1) * shard  # bytes each GPU receives per pass over the layers
    # Each rank quantises the whole model in host memory, reading one checkpoint shard at a time.
    sharded_loading = gpus * (model_bytes + loading)
    if strategy == "fsdp":
        base = linear * shard + in_flight + root + adapters * shard + small
        return Layout(strategy, gpus, base, math.ceil(trainable * shard),
                      processes + sharded_loading, gathered, FSDP_LINK_GBS, False)  # fmt: skip
    # fsdp+offload: the shards, their gradients and the optimizer's state live in host memory;
    # each pass copies every rank's shard in (at the host link's rate) before the all-gather.
    host_state = linear + root + trainable * 16.0  # fp32 weights, gradients, two moments
    base = in_flight + root + small
    # The copy in over PCIe and the all-gather between the GPUs, as one equivalent rate.
    moved = gathered + linear * shard
    rate = moved / (gathered / FSDP_LINK_GBS + linear * shard / HOST_LINK_GBS)
    host = processes + max(sharded_loading, host_state)
    return Layout(strategy, gpus, base, 0, host, moved, rate, False)  # fmt: skip
