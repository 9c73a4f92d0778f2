"""The memory plan and the micro-batch choice: one model, for the trainer and for the estimate.

The trainer measures its loaded model (``fastpath.probe_memory``: what a forward keeps and what
a step peaks at, per token) and plans against the card's memory; the client, with no GPU,
predicts those same measurements from the model's shape (:func:`predict_probe`, its
coefficients fitted to the trainer's probes on the H200) and runs the very same planning
(:func:`plan_memory`, :func:`choose`). So the estimate and the trainer pick the same micro-batch
and recompute plan, and a job the estimate says fits is planned to fit.

Standard library only: it runs on the client and on the instance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .batching import BatchPlan
from .memory import Shape, micro_batch_score, param_counts
from .sharding import bytes_per_linear_param

__all__ = [
    "CE_CHUNK_ELEMENTS",
    "LEAN_MLP_CHUNK",
    "LEAN_LOSS_CHUNK",
    "LOSS_BYTES_PER_ELEMENT",
    "SOFTCAP_LOSS_BYTES_PER_ELEMENT",
    "UNVERIFIED_MARGIN",
    "VERIFIED_ARCHITECTURES",
    "Choice",
    "choose",
    "default_loss_chunk",
    "plan_memory",
    "predict_probe",
]

GIB = 1024**3
# Logits elements per chunk of the chunked cross-entropy (its default chunk is this many
# elements' worth of tokens, at most).
CE_CHUNK_ELEMENTS = 1 << 28


def default_loss_chunk(vocab: int) -> int:
    """Tokens per chunk of the chunked cross-entropy by default: CE_CHUNK_ELEMENTS' worth."""
    return max(128, CE_CHUNK_ELEMENTS // int(vocab))


# Bytes per logits element alive at the loss's peak (fastpath/loss.py): the chunk's fp32 logits
# and logsumexp's fp32 temporary; with Gemma-2's final soft-cap, the kept tanh as well. It was
# 14 while a chunk's fp32 buffers lived on beside the next chunk's (the fp32 chunk and its bf16
# gradient, 6, plus the next chunk's fp32 softmax and bf16 logits, 8): then Llama-3-8B,
# Llama-3.2-3B and Mistral-7B packed runs peaked 1.9-2.0 GiB (2^28 x 8 bytes) above a plan made
# with 6, and Llama-3.2-3B under a 16 GiB cap ran out of memory by one chunk
# (benchmarks/results/real_path_calibration.json). Each chunk's buffers are freed before the
# next is made since; measured again in benchmarks/results/loss_memory.json.
LOSS_BYTES_PER_ELEMENT = 8
SOFTCAP_LOSS_BYTES_PER_ELEMENT = 12
# The smallest loss chunk the planner uses (tokens), for the leanest settings: at Llama-3's
# 128K vocabulary 1,024 tokens hold ~1.7 GiB of logits and their gradient, more than a layer's
# recomputed activations; 512 halves that at a few percent of the lm_head's speed.
LEAN_LOSS_CHUNK = 512
# In the leanest (offloaded) setting the MLP runs over this many tokens at a time
# (fastpath/mlp.py: one function that saves only its input and walks the chunks in its
# backward): the step's peak was one layer's MLP backward over the whole micro-batch. Measured on
# the H200 (8B, 8,192 tokens a step): whole, 8.06 GiB at 10.2K tok/s; each chunk under
# torch.utils.checkpoint, 7.23 GiB at 6.7K (the down projection recomputed too, the weights
# dequantised per chunk); as one function, 7.53 GiB at 8.5K (call s8c2).
LEAN_MLP_CHUNK = 2048

# Model types whose predicted peak was within 10% of the measured one on the H200
# (benchmarks/results/planner_accuracy.json: six decoder layers of the real widths, packed
# micro-batch 4 x 2048, through Job.run; calls s10c1-s10c2): Llama-3-8B -0.3%, Mistral-7B
# -0.3%, Qwen2.5-7B -0.2%, Gemma-2-9B +3.6% (eager attention), Phi-3-mini +5.1%; and the
# whole Llama-3-8B runs of benchmarks/real_path.py (-0.6% under 24 GiB, -0.2% uncapped).
# Every type not listed is planned against the budget / UNVERIFIED_MARGIN.
VERIFIED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "gemma2", "phi3"})
UNVERIFIED_MARGIN = 1.8


def plan_memory(
    *,
    probe: Mapping[str, Any],
    base_bytes: float,
    trainable: int,
    n_layers: int,
    hidden: int,
    vocab: int,
    budget_gib: float,
    tokens: int,
    seq_len: int,
    layout: str = "flat",
    policy: str = "auto",
    headroom_gib: float | None = None,
    softcap: bool = False,
) -> dict[str, Any]:
    """Pick the recompute policy, dequant cache and loss chunk that fit ``budget_gib``.

    ``probe`` is a measurement (``fastpath.probe_memory``) or a prediction
    (:func:`predict_probe`); ``base_bytes`` is what is allocated before training (weights,
    adapters); ``trainable`` the trainable parameters (fp32 weights, gradients and AdamW
    moments: 12 bytes each beyond the weights counted in ``base_bytes``). Headroom (default
    1.5 GiB plus 6% of the budget) is left for the allocator: on the H200 a plan 0.9 GiB under
    a 24 GiB cap ran with the allocator at the cap, 25% slower than one with a little more
    recompute. ``softcap``: the model soft-caps its final logits (Gemma-2), which makes the
    loss keep one more fp32 copy of its chunk.

    Least recompute first (policy ``"auto"``): as few recomputed layers as fit; the memory left
    goes to the dequant cache, one decoder layer at a time. ``"all"`` recomputes every layer,
    ``"none"`` none, ``"offload"`` every layer with its input kept in host memory. Where the
    probe could not run (``ok`` false), the plan is the leanest: offload, small loss chunks.

    Returns:
        ``recompute_layers``, ``dequant_cache``, ``offload``, ``loss_chunk`` (None for the
        default), ``gradient_checkpointing``, ``predicted_peak_gib`` and ``fits``.
    """
    if headroom_gib is None:
        headroom_gib = 1.5 + 0.06 * budget_gib
    rows = max(1, -(-tokens // max(seq_len, 1))) if layout == "padded" else 1
    row_len = min(seq_len, tokens) if layout == "padded" else tokens
    ok = bool(probe.get("ok"))
    if not ok:
        policy = "offload"
    kept0, kept1, kept2 = probe.get("kept_fit", (0.0, 0.0, 0.0))
    peak0, peak1, peak2 = probe.get("peak_fit", (0.0, 0.0, 0.0))
    # Per token outside the decoder layers: embeddings out, final hidden states and their
    # gradient from the loss. The rest of the slope (and the square) is the layers'.
    outside = 3 * hidden * 2
    sq = rows * row_len**2
    act_layer = max(0.0, (kept1 - outside) * tokens + kept2 * sq) / n_layers if ok else 0.0
    outside_bytes = outside * tokens + max(0.0, kept0)
    # What the backward adds at its peak, above everything the forward kept.
    transient = max(0.0, (peak0 - kept0) + (peak1 - kept1) * tokens + (peak2 - kept2) * sq)
    chunked = bool(probe.get("chunked_loss"))
    ckpt_layer = tokens * hidden * 2
    cache_layer = float(probe.get("cache_bytes", 0)) if ok else 0.0
    best: dict[str, Any] | None = None
    # The loss's logits chunk: ~1 GiB of fp32 by default; 1,024 tokens when memory is short,
    # LEAN_LOSS_CHUNK when it is shorter still (and always in the leanest, offloaded setting).
    chunks = (None, 1024, LEAN_LOSS_CHUNK) if policy != "offload" else (LEAN_LOSS_CHUNK,)
    per_element = SOFTCAP_LOSS_BYTES_PER_ELEMENT if softcap else LOSS_BYTES_PER_ELEMENT
    for loss_chunk in chunks:
        chunk = min(tokens, loss_chunk or default_loss_chunk(vocab))
        loss_mem = chunk * vocab * per_element if chunked else 0
        fixed = base_bytes + trainable * 12 + outside_bytes + max(transient, loss_mem)
        fixed += headroom_gib * GIB
        option = _plan_layers(
            budget_gib * GIB - fixed, fixed - headroom_gib * GIB, n_layers, act_layer,
            ckpt_layer, cache_layer, policy,
        )  # fmt: skip
        option["loss_chunk"] = loss_chunk
        if best is None or _plan_rank(option) > _plan_rank(best):
            best = option
    assert best is not None
    return best


def _plan_rank(option: dict[str, Any]) -> tuple[bool, int, float]:
    """Fits first, then fewest recomputed layers; among misfits, the smallest peak."""
    peak = 0.0 if option["fits"] else -option["predicted_peak_gib"]
    return option["fits"], -option["recompute_layers"], peak


def _plan_layers(
    free: float,
    fixed: float,
    n_layers: int,
    act_layer: float,
    ckpt_layer: float,
    cache: float,
    policy: str,
) -> dict[str, Any]:
    """Fewest recomputed layers whose activations fit ``free`` bytes; the rest to the cache."""

    def option(n_ckpt: int, offload: bool) -> dict[str, Any]:
        kept = 0.0 if offload else ckpt_layer
        acts = (n_layers - n_ckpt) * act_layer + n_ckpt * kept + (act_layer if n_ckpt else 0)
        if offload:
            acts += 2 * ckpt_layer  # a layer input in flight each way
        room = free - acts
        cached = max(0, min(n_layers, int(room // cache))) if cache > 0 and room > 0 else 0
        if offload:
            cached = 0  # the leanest setting: memory is what it is for
        return {
            "recompute_layers": n_ckpt, "gradient_checkpointing": n_ckpt > 0, "offload": offload,
            "dequant_cache": cached, "fits": room >= 0,
            "predicted_peak_gib": round((fixed + acts + cached * cache) / GIB, 2),
        }  # fmt: skip

    if policy == "none":
        return option(0, False)
    if policy == "all":
        return option(n_layers, False)
    if policy == "offload":
        return option(n_layers, True)
    for n_ckpt in range(n_layers + 1):
        found = option(n_ckpt, False)
        if found["fits"]:
            return found
    return option(n_layers, True)  # nothing fits on the card: the leanest there is


@dataclasses.dataclass(frozen=True)
class Choice:
    """The micro-batch the trainer (or the estimate) settles on, and what it implies."""

    micro_batch: int
    batches: BatchPlan
    tokens: int  # tokens of the largest micro-batch as the model sees it
    memory: dict[str, Any]  # plan_memory's answer for it


def choose(
    candidates: Sequence[int],
    batches_for: Callable[[int], BatchPlan],
    memory_for: Callable[[int, int], dict[str, Any]],
    *,
    layers: int,
    padded: bool,
) -> Choice:
    """Rank micro-batches as the trainer does: fitting first, then throughput.

    ``batches_for(mb)`` cuts the rows (``batching.plan_batches``); ``memory_for(tokens, mb)``
    plans memory for a micro-batch of that many tokens. A candidate larger than the first
    stops the search once the data fills fewer than two micro-batches of it.
    """
    best: tuple[tuple[bool, float], Choice] | None = None
    for mb in candidates:
        plan = batches_for(mb)
        if mb > candidates[0] and plan.batches_per_epoch < 2:
            break  # a bigger micro-batch than the data fills
        tokens = plan.max_padded_tokens if padded else plan.max_tokens
        option = memory_for(tokens, mb)
        score = micro_batch_score(
            plan.mean_tokens, option["recompute_layers"], layers, bool(option["fits"]), tokens
        )
        if best is None or score > best[0]:
            best = (score, Choice(mb, plan, tokens, option))
    assert best is not None
    return best[1]


# Bytes each decoder layer's forward keeps per token, as a multiple of the bf16 activation
# count of memory._act_per_token_layer, fitted per architecture to the trainer's own probes on
# the H200 (benchmarks/results/planner_accuracy.json, calls s10c1-s10c2: the fast path's fused
# projections, recomputed MLP product and recomputed norm outputs keep less than stock PEFT;
# Phi-3's fused qkv/gate_up keep more). Architectures not listed use the largest.
PROBE_ACT_MULT: dict[str, float] = {
    "llama": 0.60, "mistral": 0.60, "qwen2": 0.58, "gemma2": 0.86, "phi3": 1.14,
}  # fmt: skip
PROBE_ACT_MULT_UNKNOWN = 1.16
# Eager attention (Gemma-2's soft-capped scores) keeps per head and token pair: the scores'
# tanh, the fp32 softmax and its bf16 copy (measured 10.6 bytes: same planner calls).
EAGER_KEPT_PER_HEAD = 10.6
# The probe's step peak above what the forward keeps: a constant (the backward's workspaces)
# and a per-token part proportional to the width.
PROBE_TRANSIENT_BYTES = 0.23e9
PROBE_TRANSIENT_PER_HIDDEN = 12.0


def _act_bytes(shape: Shape) -> float:
    return 2.0 * (4 * shape.hidden + 3 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate)


def predict_probe(shape: Shape, model_type: str, *, chunked_loss: bool = True) -> dict[str, Any]:
    """What ``fastpath.probe_memory`` would measure for this shape (flat layout, fast path on).

    Returns a probe dict (``ok``, ``kept_fit``, ``peak_fit``, ``cache_bytes``,
    ``chunked_loss``) that :func:`plan_memory` takes as it takes a measured one.
    """
    mult = PROBE_ACT_MULT.get(model_type, PROBE_ACT_MULT_UNKNOWN)
    slope = 6.0 * shape.hidden + shape.layers * mult * _act_bytes(shape)
    linear_per_layer = sum(a * b for a, b in shape.linear_shapes().values())
    kept = (0.0, slope, 0.0)
    peak = (PROBE_TRANSIENT_BYTES, slope + PROBE_TRANSIENT_PER_HIDDEN * shape.hidden, 0.0)
    if shape.eager_attention:  # scores kept per head (EAGER_KEPT_PER_HEAD)
        kept = (0.0, slope, EAGER_KEPT_PER_HEAD * shape.heads * shape.layers)
        peak = (PROBE_TRANSIENT_BYTES, peak[1], 12.0 * shape.heads * shape.layers)
    return {
        "ok": True,
        "kept_fit": kept,
        "peak_fit": peak,
        "cache_bytes": 2 * linear_per_layer,
        "chunked_loss": chunked_loss,
        "predicted": True,
    }


def base_bytes(shape: Shape, *, bits: int, double_quant: bool, trainable: int) -> float:
    """Bytes allocated before the first step: quantised linears, bf16 embeddings and head,
    fp32 adapters (Llama-3-8B NF4: predicted 5.47 GiB, measured 5.53)."""
    counts = param_counts(shape)
    per = bytes_per_linear_param(bits, double_quant)
    rest = counts["embed"] + counts["lm_head"] + counts["other"]
    return counts["linear"] * per + rest * 2.0 + trainable * 4.0 + 0.03 * GIB
