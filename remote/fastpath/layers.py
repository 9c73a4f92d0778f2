"""Decoder-layer forwards over the fused groups (Llama/Mistral/Qwen2 attention and MLP) and the
compiled elementwise kernels (RMSNorm, RoPE, SiLU-gate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .lora import _act_lora_function, _fusable, _Group, _group_apply
from .mlp import chunked_mlp

# --------------------------------------------------------- attention and MLP over the groups

# Attention classes whose forward is Llama's (q/k/v/o, RoPE, no q/k norm), and the extra
# argument each passes to the attention function.
_ATTENTION_KWARGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "LlamaAttention": lambda m: {},
    "MistralAttention": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
    "Qwen2Attention": lambda m: {"sliding_window": getattr(m, "sliding_window", None)},
}


def _rope(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """Hugging Face's rotary embedding, written so one compiled kernel does each of q and k."""
    import torch

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2

    def rot(t: Any) -> Any:
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _silu_mul_cat(gate_up: Any) -> Any:
    """``silu(gate) * up`` from the stacked ``[gate | up]``; its gradient comes out stacked too."""
    import torch

    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _attention_forward(
    module: Any,
    rope: Any,
    hidden_states: Any,
    position_embeddings: Any = None,
    attention_mask: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Llama-family attention with q/k/v as one group (training only; else the original)."""
    if past_key_values is not None or not module.training or position_embeddings is None:
        original: Any = module._fastpath_original_forward
        result: tuple[Any, Any] = original(
            hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        return result
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    shape = hidden_states.shape[:-1]
    q, k, v = _group_apply(hidden_states, module._fastpath_qkv).split(
        module._fastpath_qkv.sizes, dim=-1
    )
    q = q.view(*shape, -1, module.head_dim).transpose(1, 2)
    k = k.view(*shape, -1, module.head_dim).transpose(1, 2)
    # A copy of v (small with GQA) lets the [q|k|v] buffer go once RoPE has read q and k.
    v = v.contiguous().view(*shape, -1, module.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    out, weights = attend(
        module, q, k, v, attention_mask, dropout=0.0, scaling=module.scaling,
        **_ATTENTION_KWARGS[type(module).__name__](module), **kwargs,
    )  # fmt: skip
    return module.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _silu_mul_cat_backward(gate_up: Any, grad: Any) -> Any:
    """Gradient of :func:`_silu_mul_cat` w.r.t. its stacked input, computed in fp32."""
    import torch

    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat((d_gate, g * gate * sig), dim=-1).to(gate_up.dtype)


def _grouped_mlp_forward(module: Any, silu_mul: Any, silu_mul_bwd: Any, x: Any) -> Any:
    chunk = getattr(module, "_fastpath_mlp_chunk", None)
    if chunk and x.numel() // x.shape[-1] > chunk:  # the leanest setting (see .mlp)
        return chunked_mlp(module, silu_mul, silu_mul_bwd, x, int(chunk))
    return _mlp_core(module, silu_mul, silu_mul_bwd, x)


def _mlp_core(module: Any, silu_mul: Any, silu_mul_bwd: Any, x: Any) -> Any:
    gate_up = _group_apply(x, module._fastpath_gu)
    down = module._fastpath_down
    return _act_lora_function().apply(gate_up, down, silu_mul, silu_mul_bwd, *down.params())


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _silu_mul(gate: Any, up: Any) -> Any:
    import torch

    return torch.nn.functional.silu(gate) * up


# Which kernels run the elementwise functions: "triton" (hand-written, .triton_ops) where
# Triton runs on this machine's GPU, else "compile" (torch.compile of the functions above).
# Setting it to "compile" forces the torch.compile path (for comparison, or a Triton problem);
# "eager" runs the functions above as written (the reference, and what CPU tests exercise).
ENV_ELEMENTWISE = "LORABURST_ELEMENTWISE"


@functools.cache
def elementwise_backend() -> str:
    """``"triton"``, ``"compile"`` or ``"eager"``: what :func:`_compiled` hands out (see
    ENV_ELEMENTWISE).

    On a fresh H200 the memory plan, which first runs these functions, took 12.7-20.9 s with
    ``torch.compile`` (dynamo, AOT autograd, inductor and its worker pool for twelve graphs) and
    4.0 s with the hand-written kernels; and a Triton launch skips dynamo's guards and the AOT
    wrapper, host time that a 4K-token step, short of it, feels (benchmarks/RESULTS.md).
    """
    import os

    forced = os.environ.get(ENV_ELEMENTWISE, "").strip().lower()
    if forced in ("compile", "eager"):
        return forced
    import torch

    from . import triton_ops

    return "triton" if torch.cuda.is_available() and triton_ops._triton_importable() else "compile"


@functools.cache
def _compiled(name: str) -> Any:
    backend = elementwise_backend()
    if backend == "triton":
        from . import triton_ops

        fn: Any = getattr(triton_ops, name)
        return fn
    import torch

    fns: dict[str, Callable[..., Any]] = {
        "rms_norm": _rms_norm, "silu_mul": _silu_mul, "rope": _rope, "silu_mul_cat": _silu_mul_cat,
        "silu_mul_cat_backward": _silu_mul_cat_backward,
    }  # fmt: skip
    if backend == "eager":
        return fns[name]
    # Only the token dimension is symbolic, from the first call: the memory probe's first size
    # would otherwise compile a static graph and its second size recompile it with that
    # dimension symbolic (automatic dynamic shapes), two compiles each way for every kernel
    # before the first step. dynamic=True would make every dimension symbolic: measured 7%
    # slower on the H200 (8B, 8K tokens a step).
    compiled = torch.compile(fns[name], dynamic=None)
    return functools.partial(_tokens_dynamic, compiled)


def _tokens_dynamic(compiled: Any, *args: Any) -> Any:
    """Call ``compiled`` with each tensor's token dimension (second to last) marked dynamic."""
    import torch

    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(a, a.dim() - 2)
    return compiled(*args)


def _fuse_elementwise(base: Any) -> int:
    count = 0
    for module in base.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and "Gemma" not in cls:
            norm = _compiled("rms_norm")
            # Only where a rerun gives the same bits (see _norm_forward).
            rerun = elementwise_backend() in ("triton", "eager")
            module.forward = functools.partial(_norm_forward, module, norm, rerun)
            count += 1
        elif (
            cls.endswith("MLP")
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and not hasattr(module, "_fastpath_gu")  # grouped: its forward is already fused
        ):
            act = getattr(module, "act_fn", None)
            if type(act).__name__ in ("SiLU", "SiLUActivation"):
                module.forward = functools.partial(_mlp_forward, module, _compiled("silu_mul"))
                count += 1
    return count


def _norm_forward(module: Any, norm: Any, rerun: bool, x: Any) -> Any:
    out = norm(x, module.weight, module.variance_epsilon)
    # The projections that read the normed activations (q/k/v, gate/up) would each keep them
    # for their backward: hidden_size values a token, twice a layer, beside the norm's own
    # input, which is kept anyway. Told how to remake them, they keep that input instead and
    # rerun the norm in their backward, one elementwise pass (lora.recompute_source). Only where
    # the rerun gives the same bits: the hand-written kernel and the eager expression (a
    # compiled graph's training and inference versions may round differently).
    if rerun:
        out._fastpath_source = (norm, (x, module.weight), (module.variance_epsilon,))
    return out


def _mlp_forward(module: Any, silu_mul: Any, x: Any) -> Any:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def _group_layer(layer: Any, compiled: bool) -> list[_Group]:
    """Group q/k/v and gate/up of one decoder layer where the forward is one we know."""
    groups: list[_Group] = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj")
    if (
        attn is not None
        and type(attn).__name__ in _ATTENTION_KWARGS
        and not hasattr(attn, "q_norm")
        and not hasattr(attn, "_fastpath_qkv")
        and all(_fusable(getattr(attn, n, None)) for n in names)
    ):
        attn._fastpath_qkv = _Group([getattr(attn, n) for n in names])
        attn._fastpath_original_forward = attn.forward
        rope = _compiled("rope") if compiled else _rope
        attn.forward = functools.partial(_attention_forward, attn, rope)
        groups.append(attn._fastpath_qkv)
    act = type(getattr(mlp, "act_fn", None)).__name__
    if (
        mlp is not None
        and act in ("SiLU", "SiLUActivation")
        and hasattr(mlp, "down_proj")
        and not hasattr(mlp, "_fastpath_gu")
        and all(_fusable(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
    ):
        mlp._fastpath_gu = _Group([mlp.gate_proj, mlp.up_proj])
        mlp._fastpath_down = _Group([mlp.down_proj])
        fns = ("silu_mul_cat", "silu_mul_cat_backward")
        silu_mul, silu_bwd = (
            (_compiled(fns[0]), _compiled(fns[1])) if compiled
            else (_silu_mul_cat, _silu_mul_cat_backward)
        )  # fmt: skip
        mlp.forward = functools.partial(_grouped_mlp_forward, mlp, silu_mul, silu_bwd)
        groups += [mlp._fastpath_gu, mlp._fastpath_down]
    return groups
