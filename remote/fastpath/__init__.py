"""Speed patches for a loaded, quantised, LoRA-wrapped Hugging Face causal LM on CUDA.

:func:`optimize` rewires a peft model in place; it computes the same function (same loss, same
gradients up to bf16 rounding) and only changes what is stored and how often it is computed:

- **Fused LoRA linear** (``fused_lora``): one autograd function computes
  ``x W^T + s (x A^T) B^T`` with a hand-written backward that stores only ``x`` and the rank-r
  ``x A^T``. peft keeps an fp32 copy of ``x`` per adapter and clones the base output; this path
  keeps neither.
- **Grouped projections** (``group_projections``, Llama/Mistral/Qwen2 layers): q/k/v and gate/up
  are one wide GEMM each (stacked W, stacked A, block-diagonal scaled B), RoPE is one compiled
  kernel, and the MLP's ``silu(gate) * up`` is recomputed in the down projection's backward
  instead of stored. On the H200 this removed half the small-kernel time of a step.
- **NF4 dequantisation** in one Triton launch (:mod:`.kernels`), straight into the group's
  buffer; bitsandbytes' own path where Triton is missing.
- **Frozen-base dequant cache** (``dequant_cache``): the NF4 base weights never change, so the
  bf16 weights are kept once per layer (``True`` = all layers, ``n`` = the first ``n``). Costs
  2 bytes per weight; off in the lean mode.
- **Chunked linear cross-entropy** (``chunked_loss``): the loss and its gradient w.r.t. the final
  hidden states are computed chunk by chunk in the forward pass, so the ``[tokens, vocab]`` logits
  never exist as a whole (128K vocab x 8K tokens would be 4 GiB in fp32).
- **Recompute policy** (``gradient_checkpointing``, ``recompute_layers``): none, every layer,
  every k-th, or an exact number spread evenly; ``offload_checkpoints`` keeps the checkpointed
  layer inputs in pinned host memory, copied on a side stream and prefetched (lean mode).
  :func:`plan` picks the fewest recomputed layers that fit a memory budget.
- **Fused elementwise** (``fuse_elementwise``): RMSNorm, RoPE and SiLU-gate as one kernel each
  way that saves only its bf16 inputs (Hugging Face's RMSNorm keeps fp32 copies): hand-written
  Triton kernels (:mod:`.triton_ops`), or ``torch.compile`` of the same functions where Triton
  does not run (``LORABURST_ELEMENTWISE=compile`` forces it); ``compile_layers`` compiles whole
  decoder layers instead. The fused linears that read a norm's output keep the norm's input
  (which the norm keeps anyway) and rerun the norm in their backward: 2 x hidden values a token
  a layer less to keep.
- **Lean MLP** (the offloaded setting): the whole MLP as one function over token chunks that
  saves only its input (:mod:`.mlp`).

Standard library only at import time; torch is imported inside functions. On a model that is
not on CUDA, :func:`optimize` changes nothing and says so in the returned report.
"""

from __future__ import annotations

from ._common import GIB, FastpathReport
from .lora import lora_linear
from .loss import linear_cross_entropy
from .patch import apply_plan, optimize
from .planner import UNVERIFIED_MARGIN, VERIFIED_ARCHITECTURES, plan, probe_memory

__all__ = [
    "GIB",
    "UNVERIFIED_MARGIN",
    "VERIFIED_ARCHITECTURES",
    "FastpathReport",
    "apply_plan",
    "linear_cross_entropy",
    "lora_linear",
    "optimize",
    "plan",
    "probe_memory",
]
