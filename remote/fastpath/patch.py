"""Applying the fast path to a loaded model (:func:`optimize`) and a memory plan to it
(:func:`apply_plan`)."""

from __future__ import annotations

import functools
from typing import Any

from ..planning import LEAN_MLP_CHUNK
from ._common import PROJECTIONS, FastpathReport, decoder_layers
from .layers import _fuse_elementwise, _group_layer, elementwise_backend
from .lora import _dequantize, _fusable, _fused_forward, _Group
from .loss import patched_causal_forward
from .recompute import _set_checkpointing


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
    group_projections: bool = True,
    recompute_layers: int | None = None,
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
        group_projections: with ``fused_lora``, compute q/k/v and gate/up as one wide GEMM each
            and replace the attention and MLP forwards of Llama, Mistral and Qwen2 layers.
        recompute_layers: recompute exactly this many decoder layers, spread evenly (what
            :func:`plan` returns); overrides ``gradient_checkpointing``'s interval.

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
        group_projections=group_projections, recompute_layers=recompute_layers,
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
    group_projections: bool = True,
    recompute_layers: int | None = None,
) -> Any:
    """The patches themselves, on any device (the CPU tests call this directly)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    if hasattr(base, "gradient_checkpointing_disable"):
        base.gradient_checkpointing_disable()
    if recompute_layers is not None and not 0 <= recompute_layers <= len(layers):
        raise ValueError(f"recompute_layers={recompute_layers}: use 0..{len(layers)}")
    report["checkpointed_layers"] = _set_checkpointing(
        layers, every, offload_checkpoints, recompute_layers
    )
    cache_layers = len(layers) if dequant_cache is True else int(dequant_cache)
    cached = fused = grouped = 0
    for i, layer in enumerate(layers):
        cache_on = i < cache_layers
        done: set[int] = set()
        if fused_lora and group_projections:
            for group in _group_layer(layer, fuse_elementwise):
                if cache_on:
                    with torch.no_grad():
                        group.cached = torch.cat([_dequantize(b) for b in group.bases]).detach()
                    cached += len(group.bases)
                done.update(id(m) for m in group.lora)
                fused += len(group.lora)
                grouped += len(group.lora) > 1
        for name, module in layer.named_modules():
            if not hasattr(module, "base_layer") or name.rsplit(".", 1)[-1] not in PROJECTIONS:
                continue
            if id(module) in done:
                continue
            if cache_on and getattr(module.base_layer, "_fastpath_weight", None) is None:
                with torch.no_grad():
                    module.base_layer._fastpath_weight = _dequantize(module.base_layer).detach()
                cached += 1
            if (
                fused_lora
                and _fusable(module)
                and not hasattr(module, "_fastpath_original_forward")
            ):
                module._fastpath_group = _Group([module])
                module._fastpath_original_forward = module.forward
                module.forward = functools.partial(_fused_forward, module)
                fused += 1
    report["grouped_projections"] = grouped
    report.update(cached_linears=cached, fused_lora_linears=fused)
    report["fused_elementwise"] = _fuse_elementwise(base) if fuse_elementwise else 0
    if fuse_elementwise:
        report["elementwise_kernels"] = elementwise_backend()
    if compile_layers:
        for layer in layers:
            layer.compile(dynamic=None)
    report["compiled_layers"] = len(layers) if compile_layers else 0
    if chunked_loss and hasattr(base, "lm_head") and hasattr(base, "model"):
        base.forward = patched_causal_forward(base, loss_chunk)
        report["chunked_loss"] = True
    else:
        report["chunked_loss"] = False
    report["applied"] = True
    return _done(model, report)


def apply_plan(model: Any, chosen: dict[str, Any]) -> FastpathReport:
    """Apply a :func:`plan` to a model :func:`optimize` patched (with no recompute or cache).

    Sets which decoder layers recompute (their inputs in host memory with ``offload``), fills
    the dequant cache of the first ``dequant_cache`` layers, and sets the loss chunk.

    Returns:
        The model's report, updated with what was applied.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    report: FastpathReport = model.fastpath_report
    report["checkpointed_layers"] = _set_checkpointing(
        layers, 0, bool(chosen.get("offload")), int(chosen["recompute_layers"])
    )
    report["offloaded_checkpoints"] = bool(chosen.get("offload"))
    # Leanest setting: each MLP in token chunks (layers.py's _chunked_mlp), else whole.
    mlp_chunk = LEAN_MLP_CHUNK if chosen.get("offload") else None
    chunked_mlps = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "_fastpath_gu"):
            mlp._fastpath_mlp_chunk = mlp_chunk
            chunked_mlps += mlp_chunk is not None
    report["chunked_mlps"] = chunked_mlps
    cached = 0
    with torch.no_grad():
        for layer in layers[: int(chosen.get("dequant_cache") or 0)]:
            seen: set[int] = set()
            for module in layer.modules():
                for attr in ("_fastpath_qkv", "_fastpath_gu", "_fastpath_down", "_fastpath_group"):
                    group = getattr(module, attr, None)
                    if isinstance(group, _Group) and id(group) not in seen:
                        seen.add(id(group))
                        seen.update(id(b) for b in group.bases)
                        group.cached = torch.cat([_dequantize(b) for b in group.bases]).detach()
                        cached += len(group.bases)
            for module in layer.modules():
                base_layer = getattr(module, "base_layer", None)
                weight = getattr(base_layer, "weight", None)
                if (
                    base_layer is None
                    or id(base_layer) in seen
                    or getattr(weight, "quant_state", None) is None
                    or getattr(base_layer, "_fastpath_weight", None) is not None
                ):
                    continue
                base_layer._fastpath_weight = _dequantize(base_layer).detach()
                cached += 1
    report["cached_linears"] = cached
    if report.get("chunked_loss"):
        base._fastpath_loss_chunk = chosen.get("loss_chunk")
    return report


def _done(model: Any, report: FastpathReport) -> Any:
    model.fastpath_report = report
    return model
