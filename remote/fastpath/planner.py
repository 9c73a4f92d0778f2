"""The memory plan: measure the patched model's memory (:func:`probe_memory`) and choose the
recompute policy, dequant cache and loss chunk that fit a budget (:func:`plan`)."""

from __future__ import annotations

from typing import Any

from ..planning import UNVERIFIED_MARGIN as UNVERIFIED_MARGIN
from ..planning import VERIFIED_ARCHITECTURES as VERIFIED_ARCHITECTURES
from ._common import GIB, decoder_layers


def plan(
    model: Any,
    *,
    seq_len: int,
    micro_batch_size: int,
    budget_gib: float,
    headroom_gib: float | None = None,
    tokens: int | None = None,
    layout: str = "padded",
    policy: str = "auto",
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pick the recompute policy and dequant cache that fit ``budget_gib`` on this card.

    Headroom (default 1.5 GiB plus 6% of the budget) is left for the allocator: on the H200 a
    plan 0.9 GiB under a 24 GiB cap ran with the allocator at the cap, freeing and retrying,
    25% slower than one with a little more recompute. Architectures whose predictions have not
    been checked against an H200 measurement (:data:`VERIFIED_ARCHITECTURES`) are planned
    against the budget divided by :data:`UNVERIFIED_MARGIN`.

    Memory is *measured*, not modelled: :func:`probe_memory` runs this very model (as patched
    by :func:`optimize`, with the attention and loss the trainer uses) forward and backward at
    three small sizes and fits what the forward keeps and what the step peaks at as
    ``c0 + c1 tokens + c2 tokens^2`` (the square for attention that keeps its scores). So the
    plan holds for any architecture the trainer loads. Where the probe cannot run, the plan is
    the safe one: every layer recomputed with its input in host memory, small loss chunks, no
    dequant cache.

    Least recompute first (policy ``"auto"``): as few recomputed layers as fit (skipping one
    layer's recompute saves ~25% of its time for its activations, a far better trade than the
    dequant cache of a layer, which saves only the dequantisation); the memory left then goes to
    the dequant cache, one decoder layer at a time. ``"all"`` recomputes every layer, ``"none"``
    none, ``"offload"`` every layer with its input kept in host memory.

    Args:
        seq_len: longest sequence (attention's quadratic term, where there is one).
        micro_batch_size: sequences per micro-batch (with ``seq_len``: the padded size).
        tokens: tokens per micro-batch when not ``seq_len * micro_batch_size`` (padding-free).
        layout: ``"flat"`` (one padding-free row) or ``"padded"``.
        probe: a :func:`probe_memory` result for this model (measured once, reused).

    Returns:
        ``recompute_layers`` and ``dequant_cache`` (layer counts), ``offload`` (bool),
        ``loss_chunk`` (tokens per loss chunk, None for the default), ``gradient_checkpointing``
        (whether any layer recomputes), ``predicted_peak_gib``, ``fits`` and ``probe``.
    """
    import torch

    from ..planning import plan_memory

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    n_layers = len(decoder_layers(base)) or int(cfg.num_hidden_layers)
    verified = getattr(type(cfg), "model_type", None) in VERIFIED_ARCHITECTURES
    if probe is None:
        probe = probe_memory(model, layout=layout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    best = plan_memory(
        probe=probe, base_bytes=allocated, trainable=trainable, n_layers=n_layers,
        hidden=int(cfg.hidden_size), vocab=int(cfg.vocab_size),
        budget_gib=budget_gib if verified else budget_gib / UNVERIFIED_MARGIN,
        tokens=tokens or seq_len * micro_batch_size, seq_len=seq_len, layout=layout,
        policy=policy, headroom_gib=headroom_gib,
        softcap=bool(getattr(cfg, "final_logit_softcapping", None)),
    )  # fmt: skip
    best["probe"] = probe
    best["verified_architecture"] = verified
    # What the plan stood on, for the client's estimate to be fitted against (calibration).
    best["base_gib"] = round(allocated / GIB, 3)
    best["trainable"] = trainable
    return best


def probe_memory(
    model: Any, *, layout: str = "flat", sizes: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    """Measure the patched model's memory for one training step at three small sizes.

    Each size is one row of random tokens, run forward (with the trainer's loss, its chunk held
    at 128 tokens so the loss adds the same small amount every time) and backward. Fitted
    exactly through the three points: ``kept_fit`` (what the forward keeps for the backward)
    and ``peak_fit`` (the step's peak), each ``(c0, c1, c2)`` for ``c0 + c1 n + c2 n^2``
    bytes. Also counts the bytes of one layer's dequantised weights (the dequant cache's unit).
    Costs a few tenths of a second; the LoRA gradients it makes are cleared. CUDA only.
    Sizes default to 128/256/512 tokens (256/512/1024 where eager attention needs the square):
    small, so that the probe's own peak stays under a lean plan's (an 8B probe at 1,024 tokens
    peaked 2 GiB above the offloaded plan it was sizing).

    Returns:
        ``ok`` with the fits, ``cache_bytes`` and ``chunked_loss``; or ``ok=False`` and
        ``reason``.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return {"ok": False, "reason": "the model has no parameters"}
    if not layers or device.type != "cuda":
        return {"ok": False, "reason": "no decoder layers on CUDA to measure"}
    vocab = int(base.config.vocab_size)
    quadratic = layout == "padded" and base.config._attn_implementation == "eager"
    if sizes is None:
        sizes = (256, 512, 1024) if quadratic else (128, 256, 512)
    report: dict[str, Any] = getattr(model, "fastpath_report", None) or {}
    chunked = bool(report.get("chunked_loss"))
    chunk_was = getattr(base, "_fastpath_loss_chunk", None)
    was_training = model.training
    kept: list[float] = []
    peak: list[float] = []
    try:
        base._fastpath_loss_chunk = 128
        model.train()
        gen = torch.Generator().manual_seed(0)
        for n in sizes:
            ids = torch.randint(0, min(vocab, 32000), (1, n), generator=gen).to(device)
            batch: dict[str, Any] = {
                "input_ids": ids, "labels": ids,
                "position_ids": torch.arange(n, device=device)[None], "use_cache": False,
            }  # fmt: skip
            if layout == "flat":
                cu = torch.tensor([0, n], dtype=torch.int32, device=device)
                batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = model(**batch).loss
            torch.cuda.synchronize()
            kept.append(float(torch.cuda.memory_allocated() - before))
            loss.backward()
            torch.cuda.synchronize()
            peak.append(float(torch.cuda.max_memory_allocated() - before))
            del loss, batch
            for p in model.parameters():
                p.grad = None
    except Exception as exc:  # an architecture or setting we cannot run this way
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        base._fastpath_loss_chunk = chunk_was
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
        torch.cuda.empty_cache()
    cache = 0
    for module in layers[0].modules():
        base_layer: Any = getattr(module, "base_layer", None)
        weight = getattr(base_layer, "weight", None)
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            cache += 2 * int(base_layer.in_features) * int(base_layer.out_features)
    # Memory grows with the square of a row only where attention keeps its scores (eager);
    # elsewhere a square fitted to three small sizes is allocator noise, which extrapolated
    # 8x beyond them became 11 GB of phantom memory on the H200 (8B, 8K tokens).
    fit = _fit3 if quadratic else _fit_linear
    return {
        "ok": True,
        "sizes": list(sizes),
        "kept": kept,
        "peak": peak,
        "kept_fit": fit(sizes, kept),
        "peak_fit": fit(sizes, peak),
        "cache_bytes": cache,
        "chunked_loss": chunked,
        "quadratic": quadratic,
    }


def _fit_linear(x: tuple[int, int, int], y: list[float]) -> tuple[float, float, float]:
    """``c0 + c1 x`` through the two largest points, whose noise matters least."""
    c1 = (y[2] - y[1]) / (x[2] - x[1])
    return y[2] - c1 * x[2], c1, 0.0


def _fit3(x: tuple[int, int, int], y: list[float]) -> tuple[float, float, float]:
    """``c0 + c1 x + c2 x^2`` through three points; a negative square (noise) refitted linear."""
    (x0, x1, x2), (y0, y1, y2) = x, y
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    c2 = (d12 - d01) / (x2 - x0)
    if c2 <= 0:  # linear: the slope of the two largest points, whose noise matters least
        c1 = d12
        return y2 - c1 * x2, c1, 0.0
    c1 = d01 - c2 * (x0 + x1)
    return y0 - c1 * x0 - c2 * x0 * x0, c1, c2
