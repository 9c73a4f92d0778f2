"""FLOPs, peak VRAM and step time of one QLoRA training step, from a model's ``config.json``.

Standard library only: the client's estimator and the on-instance trainer (which calls
:func:`choose_settings` on CUDA to pick micro-batch and checkpointing) share this file.

FLOPs per token (N = frozen linear + lm_head weights, P = LoRA parameters, ``s`` = sequence
length, ``L`` = layers, ``d`` = heads x head_dim)::

    forward through frozen weights         2 N
    backward through frozen weights        2 N   (activation grads only: no weight grads)
    LoRA (A and B, fwd + both grads)       6 P
    attention scores, causal               fwd 2 L s d (QK^T + AV = 4 L s d, halved by the mask)
                                           x3 for fwd + bwd
    recompute (gradient checkpointing)     + one more forward of the decoder layers

That is the "4N convention" (frozen weights do 2/3 of a full 6N training step) made explicit.

Step time of one micro-batch of ``T`` tokens on a GPU with dense bf16 peak ``F`` and memory
bandwidth ``B`` (``passes`` = 2, or 3 with recompute)::

    gpu = flops(T) / (F * utilisation)                 compute-bound matmuls
        + passes * N_q * dequant_bytes / B             NF4 -> bf16 dequantisation, once per pass
        + passes * L * T * heads * s * score_traffic / B   attention scores, where materialised
    cpu = passes * L * layer_overhead_s                Python and kernel launches per layer pass
    t   = (gpu^p + cpu^p)^(1/p)

The host launches kernels asynchronously, so CPU overhead hides behind GPU work once there is
enough of it: the p-norm blends a sum (p = 1) and a max (p = inf). ``utilisation``,
``layer_overhead_s`` and ``overlap_p`` are fitted on the H200 by
``benchmarks/calibrate_estimator.py``; ``dequant_bytes`` is the physical 4.5 (read 0.5 B of NF4,
write and re-read 2 B of bf16). Another GPU uses its own F (times its GEMM efficiency relative
to the H200's) and B, so long sequences scale with TFLOP/s and short ones stay overhead-bound;
the CPU overhead is taken as GPU-independent.

Peak VRAM (bytes torch allocates; nvidia-smi shows reserved + the CUDA context)::

    weights   N_q x (0.5 NF4 + 1/64 int8 absmax + 4/16384 fp32 second-level constants)
              + embeddings / lm_head / norms x embed_bytes (2 = bf16, 4 once upcast to fp32)
    LoRA      P x 16 (fp32 weights, grads, AdamW m and v)
    no ckpt   L x [act_mult x T x (4 h + 3 q_dim + 3 kv_dim + 4 i) x 2 bytes
                   + T x heads x s x score_bytes]   (scores only where attention keeps them)
    ckpt      T x L x h x ckpt_bytes  +  one layer recomputed as above
    logits    T x vocab x logits_bytes  (bf16 logits, fp32 upcast, log-softmax and its grad)
    reserved  allocated x reserved_ratio;  context: cuda_context_gib
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Coefficients",
    "DEFAULT_COEFFS",
    "GIB",
    "H200_BANDWIDTH_GBS",
    "H200_TFLOPS",
    "ObjectiveCost",
    "Shape",
    "choose_settings",
    "flops_per_token",
    "lora_params",
    "objective_cost",
    "param_counts",
    "peak_vram",
    "shape_from_config",
    "solve_least_squares",
    "step_time",
]

GIB = 1024**3
H200_TFLOPS = 989.0  # dense bf16 spec
H200_BANDWIDTH_GBS = 4800.0
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that memory and FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    model_type: str = "llama"
    attention_bias: bool = False
    # The config soft-caps the attention logits (``attn_logit_softcapping``, Gemma 2): the
    # trainer runs eager attention, which keeps each layer's scores, on padded batches
    # (remote/attention.py reads the same key).
    eager_attention: bool = False
    # The config soft-caps the final logits (``final_logit_softcapping``, Gemma 2): the chunked
    # loss then keeps one more fp32 copy of its chunk. Read from the config, as the loss does.
    logit_softcap: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear layer in one decoder block."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def shape_from_config(config: Mapping[str, Any]) -> Shape:
    """Read a Hugging Face ``config.json`` dict (multimodal ones through ``text_config``).

    Raises:
        ValueError: a required key is missing; the message names it.
    """
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    missing = [k for k in (*_REQUIRED, "vocab_size") if config.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)} (needed for the estimate)")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim") or hidden // heads
    model_type = str(config.get("model_type", "llama"))
    return Shape(
        hidden=hidden,
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
        model_type=model_type,
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        eager_attention=bool(config.get("attn_logit_softcapping")),
        logit_softcap=bool(config.get("final_logit_softcapping")),
    )


def param_counts(shape: Shape) -> dict[str, int]:
    """Parameters by kind: ``linear`` (quantised), ``embed``, ``lm_head``, ``other``, ``total``."""
    per_layer = sum(a * b for a, b in shape.linear_shapes().values())
    linear = shape.layers * per_layer
    embed = shape.vocab * shape.hidden
    lm_head = 0 if shape.tied else embed
    norms_per_layer = 4 if shape.model_type == "gemma2" else 2
    other = shape.layers * norms_per_layer * shape.hidden + shape.hidden
    if shape.attention_bias:
        other += shape.layers * (shape.q_dim + 2 * shape.kv_dim)
    total = linear + embed + lm_head + other
    return {"linear": linear, "embed": embed, "lm_head": lm_head, "other": other, "total": total}


def lora_params(shape: Shape, r: int, target_modules: str | Sequence[str] = "all-linear") -> int:
    """LoRA parameters for rank ``r`` on the targeted linear layers (``all-linear`` = all 7)."""
    if isinstance(target_modules, str):
        names = set(_LINEARS) if target_modules == "all-linear" else {target_modules}
    else:
        names = set(target_modules)
    for fused, parts in _FUSED.items():
        if fused in names:
            names |= set(parts)
    return shape.layers * sum(
        r * (a + b) for name, (a, b) in shape.linear_shapes().items() if name in names
    )


def flops_per_token(
    shape: Shape, seq_len: int, lora: int, *, gradient_checkpointing: bool
) -> dict[str, float]:
    """Training FLOPs per token, by term (see the module docstring); ``total`` sums them."""
    counts = param_counts(shape)
    layers_n = counts["linear"]
    head_n = shape.vocab * shape.hidden
    attn_fwd = 2.0 * shape.layers * seq_len * shape.q_dim
    terms = {
        "forward": 2.0 * (layers_n + head_n),
        "backward": 2.0 * (layers_n + head_n),
        "lora": 6.0 * lora,
        "attention": 3.0 * attn_fwd,
        "recompute": (2.0 * layers_n + 2.0 * lora + attn_fwd) if gradient_checkpointing else 0.0,
    }
    terms["total"] = sum(terms.values())
    return terms


@dataclasses.dataclass(frozen=True)
class ObjectiveCost:
    """What an objective adds to an SFT step, for the estimator and the budget.

    Attributes:
        sequences_per_row: sequences a row trains (2 for a chosen/rejected pair; their tokens
            are already in the row's count, and a pair holds up to twice ``max_seq_len``).
        step_factor: step time relative to SFT on the same tokens: 1 + the reference's
            forward passes x the forward's share of a training step's FLOPs.
        data_passes: forward passes over the whole dataset before training (a precomputed
            reference), in units of one training pass over the same tokens.
    """

    sequences_per_row: int = 1
    step_factor: float = 1.0
    data_passes: float = 0.0


def objective_cost(
    shape: Shape, seq_len: int, lora: int, *, preference: bool, reference: str | None,
    gradient_checkpointing: bool = False,
) -> ObjectiveCost:  # fmt: skip
    """The cost an objective adds (``reference``: ``"live"``, ``"precompute"`` or None)."""
    if not preference:
        return ObjectiveCost()
    flops = flops_per_token(shape, seq_len, lora, gradient_checkpointing=gradient_checkpointing)
    forward_share = (flops["forward"] + 2.0 * lora + flops["attention"] / 3) / flops["total"]
    live = reference == "live"
    return ObjectiveCost(
        sequences_per_row=2,
        step_factor=1.0 + (forward_share if live else 0.0),
        data_passes=forward_share if reference == "precompute" else 0.0,
    )


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Fitted numbers of the time and memory models (``sdk/data/calibration.json``)."""

    utilisation: float = 0.50  # of dense bf16 peak, on the H200
    dequant_bytes: float = 4.5  # bytes moved per quantised weight per pass
    layer_overhead_s: float = 0.003  # host seconds per decoder layer per pass
    overlap_p: float = 3.0  # p-norm of GPU and host time (1: they add up; inf: they overlap)
    embed_bytes: int = 4  # bf16 embeddings/head upcast to fp32 by k-bit preparation
    act_mult: float = 1.0
    ckpt_bytes: float = 4.0  # per token, layer and hidden unit kept at each checkpoint
    logits_bytes: float = 16.0  # per token and vocab entry
    fixed_gib: float = 0.3  # cuBLAS workspaces and other fixed allocations
    attn_score_bytes: float = 0.0  # per attention score kept (a non-flash sdpa path keeps s^2)
    attn_score_traffic: float = 0.0  # bytes moved per attention score per pass
    reserved_ratio: float = 1.10
    cuda_context_gib: float = 0.55
    gemm_efficiency_h200: float = 0.80  # 788 of 989 TFLOP/s measured on the calibration H200

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Coefficients:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Refreshed from sdk/data/calibration.json by benchmarks/calibrate_estimator.py (a unit test
# checks that the two agree, so the trainer on the instance uses the same fit as the client).
DEFAULT_COEFFS = Coefficients(
    utilisation=0.433,
    dequant_bytes=4.5,
    layer_overhead_s=0.00487,
    overlap_p=100.0,
    embed_bytes=2,
    act_mult=0.7763,
    ckpt_bytes=0.543,
    logits_bytes=7.135,
    fixed_gib=0.11,
    attn_score_bytes=0.0,
    attn_score_traffic=0.0,
    reserved_ratio=1.093,
    cuda_context_gib=0.55,
    gemm_efficiency_h200=0.8,
)


def _bytes_per_quantised_param(bits: int, double_quant: bool) -> float:
    if bits == 4:
        absmax = 1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64
        return 0.5 + absmax
    if bits == 8:
        return 1.0 + 4 / 4096
    return 2.0


def _act_per_token_layer(shape: Shape) -> float:
    """Bytes saved for backward per token in one decoder layer (bf16, flash/sdpa attention)."""
    values = 4 * shape.hidden + 3 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate
    return 2.0 * values


def _score_bytes(shape: Shape, coeffs: Coefficients) -> tuple[float, float]:
    """Bytes kept and bytes moved per attention score; eager attention (Gemma 2) keeps the
    fp32 scores and bf16 probabilities whatever the fitted sdpa path does."""
    if shape.eager_attention:
        return max(coeffs.attn_score_bytes, 8.0), max(coeffs.attn_score_traffic, 12.0)
    return coeffs.attn_score_bytes, coeffs.attn_score_traffic


def peak_vram(
    shape: Shape,
    *,
    seq_len: int,
    micro_batch_size: int,
    lora_r: int,
    gradient_checkpointing: bool,
    bits: int = 4,
    double_quant: bool = True,
    target_modules: str | Sequence[str] = "all-linear",
    coeffs: Coefficients = DEFAULT_COEFFS,
) -> dict[str, float]:
    """Peak memory in GiB by term; ``allocated``, ``reserved`` and ``total`` (+ CUDA context)."""
    counts = param_counts(shape)
    tokens = micro_batch_size * seq_len
    lora = lora_params(shape, lora_r, target_modules)
    emb_b = coeffs.embed_bytes if bits in (4, 8) else 2
    scores = tokens * shape.heads * seq_len * _score_bytes(shape, coeffs)[0]
    act_layer = coeffs.act_mult * tokens * _act_per_token_layer(shape) + scores
    if gradient_checkpointing:
        acts = tokens * shape.layers * shape.hidden * coeffs.ckpt_bytes + act_layer
    else:
        acts = shape.layers * act_layer
    terms = {
        "weights": counts["linear"] * _bytes_per_quantised_param(bits, double_quant) / GIB,
        "embeddings": (counts["embed"] + counts["lm_head"] + counts["other"]) * emb_b / GIB,
        "lora": lora * 16.0 / GIB,
        "activations": acts / GIB,
        "logits": tokens * shape.vocab * coeffs.logits_bytes / GIB,
        "fixed": coeffs.fixed_gib,
    }
    allocated = sum(terms.values())
    terms["allocated"] = allocated
    terms["reserved"] = allocated * coeffs.reserved_ratio
    terms["total"] = terms["reserved"] + coeffs.cuda_context_gib
    return terms


def step_time(
    shape: Shape,
    *,
    seq_len: int,
    micro_batch_size: int,
    lora_r: int,
    gradient_checkpointing: bool,
    tflops: float = H200_TFLOPS,
    bandwidth_gbs: float = H200_BANDWIDTH_GBS,
    gemm_efficiency: float | None = None,
    bits: int = 4,
    target_modules: str | Sequence[str] = "all-linear",
    coeffs: Coefficients = DEFAULT_COEFFS,
) -> dict[str, float]:
    """Seconds for one micro-batch (forward + backward) by term, and ``tokens_per_s``."""
    lora = lora_params(shape, lora_r, target_modules)
    tokens = micro_batch_size * seq_len
    flops = flops_per_token(shape, seq_len, lora, gradient_checkpointing=gradient_checkpointing)
    eff = coeffs.gemm_efficiency_h200 if gemm_efficiency is None else gemm_efficiency
    util = coeffs.utilisation * eff / coeffs.gemm_efficiency_h200
    passes = 3 if gradient_checkpointing else 2
    dq_bytes = coeffs.dequant_bytes if bits in (4, 8) else 0.0
    terms = {
        "compute": flops["total"] * tokens / (tflops * 1e12 * util),
        "dequant": passes * param_counts(shape)["linear"] * dq_bytes / (bandwidth_gbs * 1e9),
        "attention_scores": passes
        * shape.layers
        * tokens
        * shape.heads
        * seq_len
        * _score_bytes(shape, coeffs)[1]
        / (bandwidth_gbs * 1e9),
        "host": passes * shape.layers * coeffs.layer_overhead_s,
    }
    gpu = terms["compute"] + terms["dequant"] + terms["attention_scores"]
    p = coeffs.overlap_p
    terms["total"] = (gpu**p + terms["host"] ** p) ** (1 / p) if p < 50 else max(gpu, terms["host"])
    terms["tokens_per_s"] = tokens / terms["total"]
    return terms


def choose_settings(
    config: Mapping[str, Any],
    *,
    vram_gb: float,
    seq_len: int,
    lora_r: int,
    bits: int = 4,
    micro_batch_size: int | str = "auto",
    gradient_checkpointing: bool | str = "auto",
    tokens_per_step: int | None = None,
    tflops: float = H200_TFLOPS,
    bandwidth_gbs: float = H200_BANDWIDTH_GBS,
    gemm_efficiency: float | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    mean_seq_len: int | None = None,
    headroom: float = 0.97,
    coeffs: Coefficients = DEFAULT_COEFFS,
) -> dict[str, Any]:
    """Pick the fastest micro-batch / checkpointing pair whose peak fits ``vram_gb`` (GiB).

    Without recompute where memory allows; among settings within 3% of the fastest, the
    smallest micro-batch (least memory, same speed). ``tokens_per_step`` caps the micro-batch
    at ``tokens_per_step // seq_len``. Memory is sized for full ``seq_len`` batches; speed is
    judged at ``mean_seq_len`` (padded batches of typical rows) when given. When nothing fits,
    returns the smallest setting with ``fits=False`` so the caller can say so.

    Returns:
        ``micro_batch_size``, ``gradient_checkpointing``, ``peak_vram_gb`` (GiB, with the CUDA
        context), ``tokens_per_s`` and ``fits``.
    """
    shape = shape_from_config(config)
    cap = 16 if tokens_per_step is None else max(1, tokens_per_step // max(seq_len, 1))
    if micro_batch_size == "auto":
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= cap] or [1]
    else:
        batches = [int(micro_batch_size)]
    ckpts = [False, True] if gradient_checkpointing == "auto" else [bool(gradient_checkpointing)]
    options: list[dict[str, Any]] = []
    for ckpt in ckpts:
        for mb in batches:
            peak = peak_vram(
                shape,
                seq_len=seq_len,
                micro_batch_size=mb,
                lora_r=lora_r,
                gradient_checkpointing=ckpt,
                bits=bits,
                target_modules=target_modules,
                coeffs=coeffs,
            )
            speed = step_time(
                shape,
                seq_len=mean_seq_len or seq_len,
                micro_batch_size=mb,
                lora_r=lora_r,
                gradient_checkpointing=ckpt,
                tflops=tflops,
                bandwidth_gbs=bandwidth_gbs,
                gemm_efficiency=gemm_efficiency,
                bits=bits,
                target_modules=target_modules,
                coeffs=coeffs,
            )
            options.append(
                {
                    "micro_batch_size": mb,
                    "gradient_checkpointing": ckpt,
                    "peak_vram_gb": round(peak["total"], 3),
                    "tokens_per_s": speed["tokens_per_s"],
                    "fits": peak["total"] <= vram_gb * headroom,
                }
            )
    fitting = [o for o in options if o["fits"]]
    if not fitting:
        return min(options, key=lambda o: o["peak_vram_gb"])
    best = max(o["tokens_per_s"] for o in fitting)
    near = [o for o in fitting if o["tokens_per_s"] >= 0.97 * best]
    return min(near, key=lambda o: (o["micro_batch_size"], o["peak_vram_gb"]))


def solve_least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares by normal equations (few unknowns; standard library only)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, n), key=lambda k: abs(a[k][col]))
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        if math.isclose(a[col][col], 0.0, abs_tol=1e-300):
            raise ValueError("singular system: the points do not separate the coefficients")
        for k in range(n):
            if k != col:
                f = a[k][col] / a[col][col]
                a[k] = [x - f * y for x, y in zip(a[k], a[col], strict=True)]
                b[k] -= f * b[col]
    return [b[i] / a[i][i] for i in range(n)]


# Tokens' worth of fixed work in every optimizer step (the optimizer, kernel launches, the
# dequantisation of uncached layers): it favours bigger micro-batches until steps hold a few
# thousand tokens.
STEP_OVERHEAD_TOKENS = 800
# A recomputed decoder layer runs its forward twice: about a third more of its step time.
RECOMPUTE_COST = 1 / 3


def micro_batch_score(
    mean_tokens: float, recompute_layers: int, layers: int, fits: bool, tokens: int
) -> tuple[bool, float]:
    """How the trainer and the estimate rank a micro-batch: fitting first, then throughput.

    Throughput is ``tokens / (tokens x (1 + recompute share x RECOMPUTE_COST) + overhead)``, so
    fewer recomputed layers beat a larger micro-batch once a step holds a few thousand tokens
    (on the H200 a 24 GiB plan with micro-batch 2 and 2 recomputed layers ran 1.17x the one with
    micro-batch 4 and 20). Among settings that do not fit, the smallest wins.
    """
    if not fits:
        return False, -float(tokens)
    cost = mean_tokens * (1 + recompute_layers * RECOMPUTE_COST / max(1, layers))
    return True, mean_tokens / (cost + STEP_OVERHEAD_TOKENS)
