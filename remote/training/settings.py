"""The micro-batch and the memory plan for this card: chosen on the loaded model.

On CUDA the fast path's patches are applied first (:func:`..fastpath.optimize`), then the
patched model's memory is measured (:func:`..fastpath.probe_memory`) and each candidate
micro-batch is planned against the card's memory (:func:`..fastpath.plan`); the candidates are
ranked by :func:`..planning.choose`, which the client's estimate runs too.
"""

from __future__ import annotations

from typing import Any

from .. import planning
from ..batching import BatchPlan
from ..protocol import JobSpecData
from .data import batch_plan

__all__ = ["apply_fastpath", "base_config", "budget_gib", "cap_memory", "choose"]

_GIB = 1024**3
_POLICY: dict[Any, str] = {"auto": "auto", True: "all", False: "none", "offload": "offload"}


def base_config(model: Any) -> Any:
    """The transformers config under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def budget_gib(spec: JobSpecData) -> float:
    """GPU memory the plan may use: the card's, or ``train.max_gpu_memory_gib`` when lower."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / _GIB
    cap = spec.train.max_gpu_memory_gib
    return min(total, float(cap)) if cap else total


def cap_memory(spec: JobSpecData) -> None:
    """Hold the process to ``train.max_gpu_memory_gib`` (before anything is allocated)."""
    import torch

    cap = spec.train.max_gpu_memory_gib
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / _GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) / total))


def choose(
    spec: JobSpecData,
    model: Any,
    lengths: list[int],
    packing: bool,
    layout: str,
    *,
    fast: bool | None = None,
) -> tuple[dict[str, Any], BatchPlan]:
    """Micro-batch and the recompute/dequant-cache plan: the spec's, or chosen for this card.

    Without the fast path (CPU, or ``fast`` false: FSDP turns it off) the micro-batch is the
    spec's, or on "auto" 4 on CPU and 1 under FSDP on CUDA (the FSDP-QLoRA recipe: the
    large models it is for have room for one sequence per GPU), with every layer recomputed
    unless ``gradient_checkpointing`` is false.

    Returns:
        The settings (``micro_batch_size``, ``gradient_checkpointing``, ``packing``,
        ``layout`` and, on CUDA, ``tokens_per_micro_batch``, ``memory_budget_gib`` and the
        fast path's ``plan``) and the batch plan they imply.
    """
    import torch

    train = spec.train
    mbs = train.micro_batch_size
    cuda = torch.cuda.is_available()
    if not cuda or fast is False:
        mb = (min(4, max(len(lengths), 1)) if not cuda else 1) if mbs == "auto" else int(mbs)
        ckpt = train.gradient_checkpointing not in ("auto", False)
        if cuda:  # FSDP on CUDA: Trainer's checkpointing of every layer, unless told not to
            ckpt = train.gradient_checkpointing is not False
        return {
            "micro_batch_size": mb,
            "gradient_checkpointing": ckpt,
            "packing": packing,
            "layout": layout,
        }, batch_plan(spec, lengths, mb, packing, layout)
    from .. import fastpath

    candidates: tuple[int, ...]
    if mbs == "auto":
        # Packed: sequences per micro-batch; unpacked: rows (a few hundred tokens each).
        candidates = (1, 2, 4, 8) if packing else (1, 2, 4, 8, 16, 32)
    else:
        candidates = (int(mbs),)
    fastpath.optimize(model, seq_len=train.max_seq_len, micro_batch_size=1,
                      gradient_checkpointing=0, dequant_cache=0)  # fmt: skip
    probe = fastpath.probe_memory(model, layout=layout)
    budget = budget_gib(spec)
    policy = _POLICY[train.gradient_checkpointing]
    layers = max(1, int(getattr(base_config(model), "num_hidden_layers", 1)))
    seq = train.max_seq_len

    def memory_for(tokens: int, mb: int) -> dict[str, Any]:
        return fastpath.plan(
            model, seq_len=seq, micro_batch_size=max(1, -(-tokens // seq)), tokens=tokens,
            budget_gib=budget, layout=layout, policy=policy, probe=probe,
        )  # fmt: skip

    pick = planning.choose(
        candidates, lambda mb: batch_plan(spec, lengths, mb, packing, layout), memory_for,
        layers=layers, padded=layout == "padded",
    )  # fmt: skip
    settings = {
        "micro_batch_size": pick.micro_batch,
        "gradient_checkpointing": pick.memory["gradient_checkpointing"],
        "packing": packing,
        "layout": layout,
        "tokens_per_micro_batch": pick.tokens,
        "memory_budget_gib": round(budget, 2),
        "plan": pick.memory,
    }
    return settings, pick.batches


def apply_fastpath(model: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Apply the chosen memory plan to the patched model; the fast path's report."""
    from .. import fastpath

    planned: dict[str, Any] = settings.get("plan", {})
    report = fastpath.apply_plan(model, planned)
    return {**dict(report), "plan": {k: v for k, v in planned.items() if k != "probe"},
            "probe": planned.get("probe")}  # fmt: skip
