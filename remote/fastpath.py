"""Speed patches for a loaded, quantised, LoRA-wrapped Hugging Face causal LM on CUDA.

:func:`optimize` rewires a peft model in place; it computes the same function (same loss, same
gradients up to bf16 rounding) and only changes what is stored and how often it is computed:

- **Fused LoRA linear** (``fused_lora``): one autograd function per projection computes
  ``x W^T + s (x A^T) B^T`` and a hand-written backward that stores only ``x`` (shared by q/k/v
  and gate/up) and the rank-r ``x A^T``. peft keeps an fp32 copy of ``x`` per adapter and clones
  the base output; this path keeps neither.
- **Frozen-base dequant cache** (``dequant_cache``): the NF4 base weights never change, so the
  bf16 weights bitsandbytes dequantises on every pass are kept once per layer (``True`` = all
  layers, ``n`` = the first ``n``). Costs 2 bytes per weight; off in the lean mode.
- **Chunked linear cross-entropy** (``chunked_loss``): the loss and its gradient w.r.t. the final
  hidden states are computed chunk by chunk in the forward pass, so the ``[tokens, vocab]`` logits
  never exist as a whole (128K vocab x 8K tokens would be 4 GiB in fp32).
- **Recompute policy** (``gradient_checkpointing``): ``False`` none, ``True`` every decoder layer,
  ``k`` every k-th layer; ``offload_checkpoints`` keeps the checkpointed layer inputs in pinned
  host memory (lean mode).
- **Fused elementwise** (``fuse_elementwise``): RMSNorm and SiLU-gate through ``torch.compile``
  so that each is one kernel each way and saves only its bf16 inputs (Hugging Face's RMSNorm
  keeps fp32 copies); ``compile_layers`` compiles whole decoder layers instead.

Standard library only at import time; torch is imported inside functions. On a model that is
not on CUDA, :func:`optimize` changes nothing and says so in the returned report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["FastpathReport", "linear_cross_entropy", "lora_linear", "optimize", "plan"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per chunk, the fp32 logits take chunk x vocab x 4 bytes; 2^28 elements = 1 GiB.
_CE_CHUNK_ELEMENTS = 1 << 28


class FastpathReport(dict[str, Any]):
    """What :func:`optimize` applied (a dict, so it serialises into the job's events as is)."""


# --------------------------------------------------------------------------- fused LoRA linear


def _dequantize(base: Any) -> Any:
    """The bf16 weight that bitsandbytes computes with (or a plain linear's weight)."""
    cached = getattr(base, "_fastpath_weight", None)
    if cached is not None:
        return cached
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)


def _make_lora_function() -> Any:
    import torch

    class _LoraLinear(torch.autograd.Function):
        """``y = x W^T + b + s (x A^T) B^T`` with W frozen (dequantised on demand) and A, B trained."""

        @staticmethod
        def forward(ctx: Any, x: Any, base: Any, lora_a: Any, lora_b: Any, scaling: float) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            weight = _dequantize(base)
            dt = weight.dtype
            x2 = x2.to(dt)
            a_w, b_w = lora_a.to(dt), lora_b.to(dt)
            xa = x2 @ a_w.t()
            out = torch.addmm(
                x2 @ weight.t()
                if base.bias is None
                else torch.addmm(base.bias.to(dt), x2, weight.t()),
                xa,
                b_w.t(),
                alpha=scaling,
            )
            ctx.save_for_backward(x2, xa, lora_a, lora_b)
            ctx.base, ctx.scaling, ctx.in_dtype = base, scaling, x.dtype
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            x2, xa, lora_a, lora_b = ctx.saved_tensors
            s = ctx.scaling
            dt = x2.dtype
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            a_w, b_w = lora_a.to(dt), lora_b.to(dt)
            gb = g2 @ b_w  # [T, r]
            grad_x = None
            if ctx.needs_input_grad[0]:
                weight = _dequantize(ctx.base)
                grad_x = torch.addmm(g2 @ weight, gb, a_w, alpha=s)
                grad_x = grad_x.view(*grad_out.shape[:-1], x2.shape[-1]).to(ctx.in_dtype)
            grad_a = (gb.t() @ x2).mul_(s).to(lora_a.dtype) if ctx.needs_input_grad[2] else None
            grad_b = (g2.t() @ xa).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[3] else None
            return grad_x, None, grad_a, grad_b, None

    return _LoraLinear


@functools.cache
def _lora_function() -> Any:
    return _make_lora_function()


def lora_linear(x: Any, base: Any, lora_a: Any, lora_b: Any, scaling: float) -> Any:
    """``base(x) + scaling * x @ lora_a.T @ lora_b.T`` storing only ``x`` and ``x @ lora_a.T``.

    Args:
        x: input activations ``[..., in_features]``.
        base: the frozen base layer (a bitsandbytes ``Linear4bit`` or a plain ``nn.Linear``).
        lora_a: ``[r, in_features]`` parameter.
        lora_b: ``[out_features, r]`` parameter.
        scaling: LoRA's ``alpha / r``.
    """
    return _lora_function().apply(x, base, lora_a, lora_b, scaling)


def _fused_forward(module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Replacement ``forward`` for a peft LoRA layer with one plain adapter active."""
    if module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None:
        return module._fastpath_original_forward(x, *args, **kwargs)
    name = module.active_adapters[0]
    return lora_linear(
        x, module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight,
        module.scaling[name],
    )  # fmt: skip


def _fusable(module: Any) -> bool:
    import torch

    adapters = list(getattr(module, "active_adapters", []))
    if len(adapters) != 1 or adapters[0] not in getattr(module, "lora_A", {}):
        return False
    name = adapters[0]
    dropout = module.lora_dropout[name]
    no_dropout = isinstance(dropout, torch.nn.Identity) or getattr(dropout, "p", 1.0) == 0.0
    plain = name not in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False)
    return bool(no_dropout and plain and hasattr(module.base_layer, "weight"))


# ------------------------------------------------------------------- chunked cross-entropy


def _make_ce_function() -> Any:
    import torch

    class _LinearCrossEntropy(torch.autograd.Function):
        """Summed CE of ``hidden @ weight^T`` against ``labels``; gradients made in forward."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, labels: Any, chunk: int) -> Any:
            n = hidden.shape[0]
            acc = torch.promote_types(hidden.dtype, torch.float32)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk]
                y = labels[start : start + chunk]
                logits = h @ weight.t()
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                valid = y != -100
                target = torch.where(valid, y, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d(sum CE)/d logits = softmax - onehot, zero on ignored rows; reuse the buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
                probs.mul_(valid[:, None])
                g = probs.to(hidden.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = g @ weight.to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ h).to(acc)
            ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
            ctx.has = (grad_h is not None, grad_w is not None)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            saved = list(ctx.saved_tensors)
            grad_h = grad_w = None
            if ctx.has[0]:
                stored = saved.pop(0)
                grad_h = stored * grad_total.to(stored.dtype)
            if ctx.has[1]:
                grad_w = (saved.pop(0) * grad_total).to(ctx.weight_dtype)
            return grad_h, grad_w, None, None

    return _LinearCrossEntropy


@functools.cache
def _ce_function() -> Any:
    return _make_ce_function()


def linear_cross_entropy(
    hidden: Any, weight: Any, labels: Any, *, num_items: Any = None, chunk: int | None = None
) -> Any:
    """Cross-entropy of ``hidden @ weight.T`` against next-token ``labels``, chunk by chunk.

    Same function as Hugging Face's causal-LM loss: labels are shifted left by one inside,
    ``-100`` is ignored, the result is the mean over counted tokens, or the sum over
    ``num_items`` when given (gradient accumulation).

    Args:
        hidden: final hidden states ``[batch, seq, hidden]``.
        weight: the output embedding ``[vocab, hidden]``.
        labels: ``[batch, seq]`` token ids (unshifted).
        num_items: token count to divide by instead of this batch's count.
        chunk: tokens per chunk; default keeps one chunk's fp32 logits near 1 GiB.
    """
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = shifted.reshape(-1).to(flat_h.device)
    if chunk is None:
        chunk = max(128, _CE_CHUNK_ELEMENTS // weight.shape[0])
    fn = _ce_function()
    total = fn.apply(flat_h, weight, flat_y, chunk)
    if num_items is None:
        num_items = (flat_y != -100).sum()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


def _patched_causal_forward(model: Any, chunk: int | None) -> Any:
    """A ``forward`` for a ``*ForCausalLM`` that never builds the full logits when training."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if labels is None or not model.training or args or kwargs.get("return_dict") is False:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        out = model.model(**kwargs)
        loss = linear_cross_entropy(
            out.last_hidden_state, model.lm_head.weight, labels, num_items=num_items, chunk=chunk
        )
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states)

    return forward


# ---------------------------------------------------------------------------- the patcher


def _decoder_layers(base: Any) -> list[Any]:
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def _set_checkpointing(layers: list[Any], every: int, offload: bool) -> int:
    import torch.utils.checkpoint as tuc

    ckpt_fn = (
        _offloaded_checkpoint if offload else functools.partial(tuc.checkpoint, use_reentrant=False)
    )
    count = 0
    for i, layer in enumerate(layers):
        on = every > 0 and (i % every == every - 1 or every == 1)
        layer.gradient_checkpointing = on
        if on:
            layer._gradient_checkpointing_func = ckpt_fn
            count += 1
    return count


def _offloaded_checkpoint(fn: Any, hidden: Any, *args: Any) -> Any:
    """Checkpoint one layer, keeping its input in pinned host memory until the backward pass."""
    if args:
        raise ValueError("offloaded checkpointing takes the hidden states as the only positional")
    if not hidden.requires_grad:  # the first layer's input: its LoRA still needs a backward
        hidden = hidden.detach().requires_grad_(True)
    return _offload_function().apply(fn, hidden)


@functools.cache
def _offload_function() -> Any:
    import torch

    class _OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, fn: Any, hidden: Any) -> Any:
            ctx.fn, ctx.device = fn, hidden.device
            ctx.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
            ctx.host.copy_(hidden, non_blocking=True)
            with torch.no_grad():
                return fn(hidden)

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
            with torch.enable_grad():
                out = ctx.fn(hidden)
            torch.autograd.backward(out, grad_out)
            return None, hidden.grad

    return _OffloadedCheckpoint


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _silu_mul(gate: Any, up: Any) -> Any:
    import torch

    return torch.nn.functional.silu(gate) * up


@functools.cache
def _compiled(name: str) -> Any:
    import torch

    fns: dict[str, Callable[..., Any]] = {"rms_norm": _rms_norm, "silu_mul": _silu_mul}
    return torch.compile(fns[name], dynamic=None)


def _fuse_elementwise(base: Any) -> int:
    count = 0
    for module in base.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and "Gemma" not in cls:
            norm = _compiled("rms_norm")
            module.forward = functools.partial(_norm_forward, module, norm)
            count += 1
        elif cls.endswith("MLP") and all(
            hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            act = getattr(module, "act_fn", None)
            if type(act).__name__ in ("SiLU", "SiLUActivation"):
                module.forward = functools.partial(_mlp_forward, module, _compiled("silu_mul"))
                count += 1
    return count


def _norm_forward(module: Any, norm: Any, x: Any) -> Any:
    return norm(x, module.weight, module.variance_epsilon)


def _mlp_forward(module: Any, silu_mul: Any, x: Any) -> Any:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def optimize(
    model: Any,
    *,
    seq_len: int,
    micro_batch_size: int,
    gradient_checkpointing: bool | int,
    dequant_cache: bool | int = False,
    chunked_loss: bool = True,
    fused_lora: bool = True,
    fuse_elementwise: bool = True,
    compile_layers: bool = False,
    offload_checkpoints: bool = False,
    loss_chunk: int | None = None,
) -> Any:
    """Apply the speed patches in place to a peft-wrapped causal LM on CUDA.

    Call after ``get_peft_model`` and before building the optimizer; do not also enable
    Hugging Face's own gradient checkpointing (``TrainingArguments(gradient_checkpointing=False)``):
    the recompute policy here replaces it.

    Args:
        model: a ``PeftModel`` (or plain ``*ForCausalLM``) whose parameters are on CUDA.
        seq_len: training sequence length (reported; sizes nothing yet).
        micro_batch_size: sequences per forward pass (reported).
        gradient_checkpointing: ``False`` recompute nothing, ``True`` every decoder layer, an int
            ``k`` every k-th layer (``1`` = all, ``0`` = none).
        dequant_cache: keep bf16 copies of the frozen NF4 weights: ``True`` all layers, an int
            ``n`` the first ``n`` layers, ``False`` none.
        chunked_loss: compute the training loss without materialising the logits.
        fused_lora: one autograd function per LoRA projection (see the module docstring).
        fuse_elementwise: compiled RMSNorm and SiLU-gate.
        compile_layers: ``torch.compile`` each decoder layer (longer start, fewer kernels).
        offload_checkpoints: keep checkpointed layer inputs in pinned host memory.
        loss_chunk: tokens per loss chunk (default: about 1 GiB of fp32 logits).

    Returns:
        The same model, patched; ``model.fastpath_report`` (a :class:`FastpathReport`) says what
        was applied (``applied=False`` and a ``reason`` off CUDA).

    Raises:
        ValueError: an argument is out of range; the message names it.
    """
    every = (
        int(gradient_checkpointing)
        if not isinstance(gradient_checkpointing, bool)
        else (1 if gradient_checkpointing else 0)
    )
    if every < 0:
        raise ValueError(f"gradient_checkpointing={gradient_checkpointing!r}: use a bool or k >= 0")
    report = FastpathReport(seq_len=seq_len, micro_batch_size=micro_batch_size, applied=False)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("optimize(model): the model has no parameters") from None
    if device.type != "cuda":
        report["reason"] = f"model is on {device.type}; the fast path is CUDA-only"
        return _done(model, report)
    return _apply(
        model, report, every=every, dequant_cache=dequant_cache, chunked_loss=chunked_loss,
        fused_lora=fused_lora, fuse_elementwise=fuse_elementwise, compile_layers=compile_layers,
        offload_checkpoints=offload_checkpoints, loss_chunk=loss_chunk,
    )  # fmt: skip


def _apply(
    model: Any,
    report: FastpathReport,
    *,
    every: int,
    dequant_cache: bool | int,
    chunked_loss: bool,
    fused_lora: bool,
    fuse_elementwise: bool,
    compile_layers: bool,
    offload_checkpoints: bool,
    loss_chunk: int | None,
) -> Any:
    """The patches themselves, on any device (the CPU tests call this directly)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _decoder_layers(base)
    if hasattr(base, "gradient_checkpointing_disable"):
        base.gradient_checkpointing_disable()
    report["checkpointed_layers"] = _set_checkpointing(layers, every, offload_checkpoints)
    cache_layers = len(layers) if dequant_cache is True else int(dequant_cache)
    cached = fused = 0
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not hasattr(module, "base_layer") or name.rsplit(".", 1)[-1] not in _PROJECTIONS:
                continue
            if i < cache_layers and getattr(module.base_layer, "_fastpath_weight", None) is None:
                with torch.no_grad():
                    module.base_layer._fastpath_weight = _dequantize(module.base_layer).detach()
                cached += 1
            if (
                fused_lora
                and _fusable(module)
                and not hasattr(module, "_fastpath_original_forward")
            ):
                module._fastpath_original_forward = module.forward
                module.forward = functools.partial(_fused_forward, module)
                fused += 1
    report.update(cached_linears=cached, fused_lora_linears=fused)
    report["fused_elementwise"] = _fuse_elementwise(base) if fuse_elementwise else 0
    if compile_layers:
        for layer in layers:
            layer.compile(dynamic=None)
    report["compiled_layers"] = len(layers) if compile_layers else 0
    config = getattr(base, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if chunked_loss and hasattr(base, "lm_head") and hasattr(base, "model") and not softcap:
        base.forward = _patched_causal_forward(base, loss_chunk)
        report["chunked_loss"] = True
    else:
        report["chunked_loss"] = False
    report["applied"] = True
    return _done(model, report)


def _done(model: Any, report: FastpathReport) -> Any:
    model.fastpath_report = report
    return model


def plan(
    model: Any, *, seq_len: int, micro_batch_size: int, budget_gib: float, headroom_gib: float = 1.5
) -> dict[str, Any]:
    """Pick the recompute policy and dequant cache that fit ``budget_gib`` on this card.

    Least recompute first (none, every 4th, 3rd, 2nd layer, every layer); the memory left then
    goes to the dequant cache, one decoder layer at a time. Call on the loaded peft model, before
    :func:`optimize`, with nothing else on the card.

    Returns:
        ``gradient_checkpointing`` (an int k for :func:`optimize`), ``dequant_cache`` (layers),
        ``predicted_peak_gib`` and ``fits``.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    h, n_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    q, kv = heads * head_dim, int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    inter, vocab = int(cfg.intermediate_size), int(cfg.vocab_size)
    tokens = seq_len * micro_batch_size
    # Tensors one layer keeps for backward on the fused path (bf16): both norm inputs and outputs,
    # q, k, v, attention out (twice: sdpa's and o_proj's input), gate, up and their product.
    act_layer = 1.15 * tokens * 2 * (4 * h + 3 * q + 2 * kv + 3 * inter)
    ckpt_layer = tokens * h * 2
    cache_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chunk = min(tokens, max(128, _CE_CHUNK_ELEMENTS // vocab))
    fixed = (
        torch.cuda.memory_allocated()
        + trainable * 12  # fp32 grads + AdamW moments
        + chunk * vocab * 4 * 2  # fp32 logits chunk and its softmax
        + tokens * h * 2 * 2  # hidden-state gradient from the loss, and the final hidden states
        + act_layer  # backward through one layer at a time
        + headroom_gib * GIB
    )
    free = budget_gib * GIB - fixed
    for every in (0, 4, 3, 2, 1):
        n_ckpt = 0 if every == 0 else n_layers // every
        acts = (n_layers - n_ckpt) * act_layer + n_ckpt * ckpt_layer + (act_layer if n_ckpt else 0)
        if acts <= free:
            cache = max(0, min(n_layers, int((free - acts) // cache_layer)))
            peak = fixed + acts + cache * cache_layer - headroom_gib * GIB
            return {
                "gradient_checkpointing": every, "dequant_cache": cache,
                "predicted_peak_gib": round(peak / GIB, 2), "fits": True,
            }  # fmt: skip
    acts = n_layers * ckpt_layer + act_layer
    return {
        "gradient_checkpointing": 1, "dequant_cache": 0,
        "predicted_peak_gib": round((fixed + acts - headroom_gib * GIB) / GIB, 2), "fits": False,
    }  # fmt: skip


GIB = 1024**3
