"""Padding-free attention: packed rows attend only within themselves, without a mask.

The trainer's collator (:mod:`.collate`) hands the model one flat row of several training rows
and their boundaries (``cu_seq_lens_q``/``max_length_q``, the names Hugging Face uses for
FlashAttention's variable-length kwargs, which every decoder forwards down to its attention
function). :func:`varlen_attention`, registered with transformers' ``AttentionInterface`` under
:data:`NAME`, turns those into one variable-length attention call: on CUDA PyTorch's own
``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels, causal, GQA, sliding window),
elsewhere one causal ``scaled_dot_product_attention`` per row (the CPU tests' reference).

Why not the stock path: given packed ``position_ids`` and no mask, transformers builds a dense
``[tokens, tokens]`` block-diagonal mask, which sends SDPA to a masked kernel that computes every
block of an 8K x 8K product (about 0.4 s a step on an 8B model on an H200) after a host sync to
detect the packing. Registered as an attention function with no mask function of its own,
transformers skips mask creation altogether for it.

Without the boundaries (an ordinary padded batch with an attention mask) the function defers to
SDPA, so generation and evaluation keep working.

Standard library at import; torch inside the functions.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = [
    "NAME",
    "register",
    "stock_implementation",
    "supports",
    "train_implementation",
    "varlen_attention",
]

NAME = "loraburst_varlen"


def supports(config: Any) -> tuple[bool, str]:
    """Whether a model with this config can train with :func:`varlen_attention`.

    Returns:
        ``(ok, reason)``; the reason says what stops it (attention logit soft-capping, which
        the FlashAttention kernels do not compute; an encoder-decoder; a non-causal model).
    """
    if getattr(config, "attn_logit_softcapping", None):
        return False, "attention logit soft-capping (Gemma-2) is not in the varlen kernels"
    if getattr(config, "is_encoder_decoder", False):
        return False, "encoder-decoder models are not trained here"
    if not getattr(config, "is_causal", True):
        return False, "the model is not causal"
    return True, ""


def stock_implementation(config: Any) -> str:
    """The stock attention that computes this model's own function: ``"eager"`` where the
    attention logits are soft-capped (Gemma-2), else ``"sdpa"``.

    transformers loads Gemma-2 with SDPA, whose kernels have no soft-capping: the cap (50 on
    every Gemma-2) is dropped without a word, and the model trained is not the model served.
    Eager attention computes it (and keeps each layer's scores, which the memory plan counts).
    """
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def train_implementation(config: Any, layout: str) -> str | None:
    """The attention implementation to train with for ``layout`` (``data.layout``'s): the
    padding-free one (registered here) for ``"flat"``, eager for soft-capped attention, else
    None (the one the model loaded with)."""
    if layout == "flat":
        return register()
    return "eager" if stock_implementation(config) == "eager" else None


def register() -> str:
    """Register :func:`varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


@functools.cache
def _varlen_kernel() -> Any:
    """PyTorch's varlen attention and how this version spells causal and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def _repeat_heads(t: Any, groups: int) -> Any:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: Any = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """An attention function for transformers' ``AttentionInterface``.

    ``query``/``key``/``value`` are ``[batch, heads, tokens, head_dim]``; returns
    ``([batch, tokens, heads, head_dim], None)`` like transformers' own functions.

    Raises:
        ValueError: soft-capped attention (use the model's own implementation), or a batch of
            several rows with boundaries (the collator always sends one flat row).
    """
    import torch

    if softcap:
        raise ValueError(
            "varlen attention cannot soft-cap attention logits; keep this model's attention"
        )
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out: tuple[Any, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    if query.shape[0] != 1:
        raise ValueError("varlen attention takes one flat row; got a batch of several")
    if dropout and module.training:
        raise ValueError("attention dropout is not supported with padding-free batches")
    groups = query.shape[1] // key.shape[1]
    # [1, H, T, D] -> [T, H, D]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    max_len = int(max_length_q) if max_length_q is not None else q.shape[0]
    window = sliding_window if sliding_window and sliding_window < max_len else None
    kernel = _varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        varlen_attn, has_window, has_gqa = kernel
        if not has_gqa:
            k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
        extra: dict[str, Any] = {"scale": scaling}
        if has_gqa and groups > 1:
            extra["enable_gqa"] = True
        if has_window:
            extra["window_size"] = (window - 1, 0) if window else (-1, 0)
        elif window:
            raise ValueError(f"this torch's varlen attention has no sliding window ({window})")
        else:
            extra["is_causal"] = True
        cu = cu_seq_lens_q.to(torch.int32)
        out_t = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
    else:
        out_t = _per_row(q, k, v, cu_seq_lens_q, groups, scaling, window)
    return out_t.unsqueeze(0), None


def _per_row(q: Any, k: Any, v: Any, cu: Any, groups: int, scale: Any, window: int | None) -> Any:
    """Reference path: one causal SDPA per row (CPU, or a torch without varlen attention)."""
    import torch
    import torch.nn.functional as F

    bounds = [int(b) for b in cu.tolist()]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        ks, vs = _repeat_heads(k[start:end], groups), _repeat_heads(v[start:end], groups)
        qs, ks, vs = (t.transpose(0, 1) for t in (q[start:end], ks, vs))  # [H, n, D]
        n = end - start
        if window:
            i = torch.arange(n, device=q.device)
            allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)
