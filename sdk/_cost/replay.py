"""The trainer's own choices, replayed on the client: batches, memory plan and step time.

Before anything is rented the client knows every row's token count. It cuts them into
micro-batches exactly as the trainer will (``remote.batching.plan_batches``: packing, length
grouping), predicts the memory probe the trainer will measure (``remote.planning.predict_probe``)
and runs the trainer's own planning (``remote.planning.choose`` / ``plan_memory``), so the
micro-batch, recompute plan and peak it reports are the ones the trainer will pick. Step time
comes from a model fitted to the trainer's real path on the H200
(``benchmarks/fit_real_path.py``, coefficients in ``data/calibration.json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from loraburst.remote.batching import BatchPlan, choose_packing, plan_batches
from loraburst.remote.memory import Shape, flops_per_token, lora_params, param_counts
from loraburst.remote.planning import (
    UNVERIFIED_MARGIN,
    VERIFIED_ARCHITECTURES,
    base_bytes,
    choose,
    plan_memory,
    predict_probe,
)
from loraburst.remote.sharding import DDP_EFFICIENCY, STRATEGIES, Layout, layout

from .._api.spec import JobSpec

__all__ = ["Replay", "RealPathCoeffs", "Workload", "workload"]

# train.gradient_checkpointing -> the planner's recompute policy (as the trainer maps it).
_POLICY: dict[Any, str] = {"auto": "auto", True: "all", False: "none", "offload": "offload"}
# Above this many rows the replay packs a systematic sample and scales up: the plan's sizes are
# averages and maxima, which a 200k-row sample already pins down.
_SAMPLE_ROWS = 200_000


@dataclasses.dataclass(frozen=True)
class RealPathCoeffs:
    """The real path's time model, fitted on the H200 (see ``benchmarks/fit_real_path.py``).

    A micro-batch of ``T`` tokens takes ``T x FLOPs/token / (TFLOP/s x utilisation)`` plus
    ``dequant_bytes`` per weight of every uncached layer per pass over the bandwidth, plus
    ``layer_s`` per decoder layer and ``step_s`` per micro-batch of fixed host and launch work.
    Offloaded checkpoints cost ``offload_s_per_gb`` per GB copied each way that the compute
    does not hide. Before the first step: ``load_s`` plus the checkpoint at ``load_gbs`` (read,
    quantise, tokenise, probe); the first step takes ``first_step_s`` more than the others.
    """

    utilisation: float = 0.45
    dequant_bytes: float = 4.5
    layer_s: float = 0.0005
    step_s: float = 0.01
    offload_s_per_gb: float = 0.0
    load_s: float = 20.0
    load_gbs: float = 1.0
    first_step_s: float = 1.5
    # Step time of an architecture relative to the Llama/Mistral fit, where measured (Phi-3's
    # head size of 96 and fused projections run slower per FLOP).
    arch_time: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RealPathCoeffs:
        known = {f.name for f in dataclasses.fields(cls)} - {"arch_time"}
        values: dict[str, Any] = {k: float(v) for k, v in data.items() if k in known}
        out = cls(**values)
        arch = {str(k): float(v) for k, v in dict(data.get("arch_time", {})).items()}
        return dataclasses.replace(out, arch_time=arch)


@dataclasses.dataclass(frozen=True)
class Workload:
    """The job's rows as the trainer will batch them (lengths truncated to ``max_seq_len``)."""

    lengths: tuple[int, ...]
    scale: float  # rows represented by each length (1 unless sampled)
    packing: bool
    padded: bool
    known: bool  # lengths counted (exactly or estimated), not assumed
    seq_len: int  # a unit's longest: max_seq_len, twice it for a preference pair

    @property
    def rows(self) -> float:
        return len(self.lengths) * self.scale

    @property
    def tokens(self) -> float:
        return sum(self.lengths) * self.scale


def workload(
    spec: JobSpec, lengths: Sequence[int] | None, rows: int, tokens: int, padded: bool
) -> Workload:
    """The training split's row lengths: counted where the client has them, else assumed.

    Without per-row counts, rows are taken as the dataset's mean (or half of ``max_seq_len``
    when nothing is known). The eval split's share is dropped as the trainer drops it.
    """
    t = spec.train
    # A preference row is a pair: its two sequences are one unit of up to twice max_seq_len,
    # never packed with others (as the preference recipe cuts them).
    pairs = spec.objective.preference
    cap = t.max_seq_len * (2 if pairs else 1)
    keep = 1.0 - t.eval_fraction
    if lengths:
        total = max(1, round(len(lengths) * keep))
        stride = max(1, math.ceil(total / _SAMPLE_ROWS))
        sample = tuple(max(1, min(int(n), cap)) for n in lengths[:total:stride])
    else:
        total = max(1, round(max(rows, 1) * keep))
        mean = tokens / rows if tokens > 0 and rows > 0 else cap / 2
        sample = (max(1, min(cap, round(mean))),) * min(total, _SAMPLE_ROWS)
    scale = total / len(sample)
    known = bool(lengths) or tokens > 0
    packing = False if pairs else choose_packing(t.packing, sample, cap)
    return Workload(sample, scale, packing, padded, known, cap)


@dataclasses.dataclass(frozen=True)
class Replay:
    """What the trainer would do on one GPU (or on each of ``gpus``): its plan and the steady
    step time of one micro-batch on one GPU."""

    micro_batch: int
    fits: bool
    peak_gib: float  # peak allocated, as torch.cuda.max_memory_allocated reports it
    recompute_layers: int
    dequant_cache: int
    offload: bool
    mean_tokens: float  # real tokens per micro-batch, on average
    batches_per_epoch: float
    step_s: float  # seconds per micro-batch on one GPU, steady state (comm and sync included)
    verified: bool
    gpus: int = 1
    strategy: str = "1 GPU"  # or remote/sharding.py's "ddp", "fsdp", "fsdp+offload"
    host_ram_gib: float = 0.0  # host memory the job needs (all ranks, offloaded state)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the whole instance (every GPU trains its own micro-batches)."""
        return self.gpus * self.mean_tokens / self.step_s if self.step_s > 0 else 0.0


class Planner:
    """Replays the trainer for one job on any number of GPUs (batches cut once per size)."""

    def __init__(self, spec: JobSpec, shape: Shape, config: Mapping[str, Any], wl: Workload):
        self.spec, self.shape, self.wl = spec, shape, wl
        self.model_type = str(config.get("model_type", "llama"))
        self.lora = lora_params(shape, spec.lora.r, spec.lora.target_modules)
        bits = spec.quant.bits if spec.quantized else 16
        self.bits = bits
        self.base = base_bytes(
            shape, bits=bits, double_quant=spec.quant.double_quant, trainable=self.lora
        )
        self.probe = predict_probe(shape, self.model_type)
        self.verified = self.model_type in VERIFIED_ARCHITECTURES
        self._plans: dict[int, BatchPlan] = {}
        lens = wl.lengths
        # Attention's cost per token grows with the row it belongs to: E[len^2] / E[len].
        self.attn_len = sum(n * n for n in lens) / max(1, sum(lens))

    def batches(self, mb: int) -> BatchPlan:
        if mb not in self._plans:
            t = self.spec.train
            epochs = max(1, math.ceil(t.epochs)) if not t.max_steps else 1
            self._plans[mb] = plan_batches(
                self.wl.lengths, max_seq_len=self.wl.seq_len, micro_batch=mb,
                packing=self.wl.packing, seed=t.seed, epochs=min(epochs, 2),
                padded=self.wl.padded,
            )  # fmt: skip
        return self._plans[mb]

    def replay(
        self,
        vram_gib: float,
        *,
        tflops: float,
        bandwidth_gbs: float,
        gemm_efficiency: float,
        coeffs: RealPathCoeffs,
        context_gib: float = 0.55,
        gpus: int = 1,
    ) -> Replay:
        """The trainer's choice on ``gpus`` cards of ``vram_gib`` and its steady step time.

        On more than one GPU the strategies of :mod:`loraburst.remote.sharding` are tried in
        order (DDP, FSDP, FSDP with offload) and the first whose per-GPU plan fits is the
        trainer's; when none fits, the leanest is returned (``fits`` false).
        """
        kw = dict(tflops=tflops, bandwidth_gbs=bandwidth_gbs, gemm_efficiency=gemm_efficiency,
                  coeffs=coeffs, context_gib=context_gib)  # fmt: skip
        if gpus <= 1:
            return self._replay(vram_gib, None, **kw)  # type: ignore[arg-type]
        found: Replay | None = None
        asked = self.spec.train.distributed
        for strategy in STRATEGIES if asked == "auto" else (asked,):
            lay = layout(self.shape, strategy=strategy, gpus=gpus, bits=self.bits,
                         double_quant=self.spec.quant.double_quant, trainable=self.lora)  # fmt: skip
            found = self._replay(vram_gib, lay, **kw)  # type: ignore[arg-type]
            if found.fits:
                break
        assert found is not None
        return found

    def _replay(
        self,
        vram_gib: float,
        lay: Layout | None,
        *,
        tflops: float,
        bandwidth_gbs: float,
        gemm_efficiency: float,
        coeffs: RealPathCoeffs,
        context_gib: float,
    ) -> Replay:
        """One GPU (``lay`` None), or each GPU of ``lay``'s strategy."""
        t = self.spec.train
        budget = vram_gib - context_gib
        if t.max_gpu_memory_gib:
            budget = min(budget, float(t.max_gpu_memory_gib))
        if not self.verified:
            budget /= UNVERIFIED_MARGIN
        policy = _POLICY[t.gradient_checkpointing]
        seq = self.wl.seq_len
        s = self.shape
        layout_ = "padded" if self.wl.padded else "flat"
        probe, base, trainable = self.probe, self.base, self.lora
        if lay is not None:
            base, trainable = lay.base_bytes, lay.trainable
            if not lay.fast_path:
                # Under FSDP the fast path is off (remote/training/distributed.py): stock
                # PEFT's activations, no dequant cache, and Trainer's all-or-nothing
                # checkpointing instead of the per-layer plan.
                probe = {**predict_probe(s, "stock"), "cache_bytes": 0}
                policy = "none" if policy == "none" else "all"

        def memory_for(tokens: int, mb: int) -> dict[str, Any]:
            return plan_memory(
                probe=probe, base_bytes=base, trainable=trainable, n_layers=s.layers,
                hidden=s.hidden, vocab=s.vocab, budget_gib=budget, tokens=tokens, seq_len=seq,
                layout=layout_, policy=policy, softcap=s.logit_softcap,
            )  # fmt: skip

        mbs = t.micro_batch_size
        if mbs == "auto" and lay is not None and not lay.fast_path:
            candidates: tuple[int, ...] = (1,)  # the trainer's FSDP choice (training/settings.py)
        elif mbs == "auto":
            candidates = (1, 2, 4, 8) if self.wl.packing else (1, 2, 4, 8, 16, 32)
        else:
            candidates = (int(mbs),)
        pick = choose(candidates, self.batches, memory_for, layers=s.layers,
                      padded=self.wl.padded)  # fmt: skip
        mem = pick.memory
        plan = pick.batches
        if self.wl.padded:
            # Padded micro-batches compute their padding too.
            work = plan.mean_tokens * (plan.max_padded_tokens / max(1, plan.max_tokens))
        else:
            work = plan.mean_tokens
        step = self.step_seconds(
            work, mem["recompute_layers"], mem["dequant_cache"], bool(mem["offload"]),
            tflops=tflops, bandwidth_gbs=bandwidth_gbs, gemm_efficiency=gemm_efficiency,
            coeffs=coeffs,
        )  # fmt: skip
        extra: dict[str, Any] = {}
        if lay is not None:
            # Weights moved per pass over the layers (forward, backward, and the recomputed
            # forward), then the throughput kept per added GPU (sharding.DDP_EFFICIENCY).
            passes = 2 + mem["recompute_layers"] / max(1, s.layers)
            step = (step + lay.comm_seconds(passes)) / DDP_EFFICIENCY
            extra = {"gpus": lay.gpus, "strategy": lay.strategy,
                     "host_ram_gib": round(lay.host_ram_bytes / 1024**3, 1)}  # fmt: skip
        return Replay(
            micro_batch=pick.micro_batch,
            fits=bool(mem["fits"]),
            peak_gib=float(mem["predicted_peak_gib"]),
            recompute_layers=int(mem["recompute_layers"]),
            dequant_cache=int(mem["dequant_cache"]),
            offload=bool(mem["offload"]),
            mean_tokens=plan.mean_tokens,
            batches_per_epoch=plan.batches_per_epoch * self.wl.scale,
            step_s=step,
            verified=self.verified,
            **extra,
        )

    def step_seconds(
        self,
        tokens: float,
        recompute: int,
        cached: int,
        offload: bool,
        *,
        tflops: float,
        bandwidth_gbs: float,
        gemm_efficiency: float,
        coeffs: RealPathCoeffs,
    ) -> float:
        """Seconds for one micro-batch of ``tokens`` (see :class:`RealPathCoeffs`)."""
        s = self.shape
        flops = flops_per_token(s, round(self.attn_len), self.lora, gradient_checkpointing=True)
        share = recompute / max(1, s.layers)
        per_token = flops["total"] - flops["recompute"] * (1 - share)
        util = coeffs.utilisation * gemm_efficiency / 0.80  # fitted on the H200 (0.80)
        compute = tokens * per_token / (tflops * 1e12 * util)
        per_layer = param_counts(s)["linear"] / s.layers
        passes = 2 + share
        dq = coeffs.dequant_bytes if self.bits in (4, 8) else 0.0
        dequant = (s.layers - cached) * passes * per_layer * dq / (bandwidth_gbs * 1e9)
        copies = 2 * s.layers * tokens * s.hidden * 2 / 1e9 if offload else 0.0
        host = s.layers * coeffs.layer_s + coeffs.step_s + copies * coeffs.offload_s_per_gb
        return (compute + dequant + host) * coeffs.arch_time.get(self.model_type, 1.0)
