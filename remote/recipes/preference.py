"""Preference tuning (DPO, ORPO) with LoRA/QLoRA/DoRA: set up, train, save. One screen::

tokenizer   its chat template, else ChatML (as SFT)
data        pairs: prompt + chosen and prompt + rejected, the prompt off the loss
            (remote/pairs.py); one pair = one unit of two rows, never split across batches
model       the base as SFT loads it, with a fresh adapter or init_adapter (trainable)
settings    SFT's memory plan, over pairs (a pair holds up to 2 x max_seq_len tokens)
reference   DPO: the adapter switched off each step ("live"), or one pass before training
            ("precompute", also the reference of a job started from an adapter); ORPO: none
train       Trainer with the preference loss (remote/training/preference.py); reward margin
            and accuracy reported with every step; checkpoints and resume as SFT
finish      adapter/, metrics.json (with the objective's metrics), exports, manifest.json
            last, as SFT (training/outputs.finish)

One GPU only: the client refuses a GPU count above one for DPO/ORPO before renting, and the
agent starts this recipe as one process.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attention import train_implementation as train_attention
from ..batching import BatchPlan
from ..pairs import encode_pairs, reference_mode
from ..protocol import ENV_ARTIFACTS, BundleSpec, JobSpecData, ObjectiveSpec
from ..training import (
    checkpoints,
    data,
    distributed,
    hf,
    loading,
    outputs,
    preference,
    progress,
    settings,
    setup,
)
from .sft import _metrics as sft_metrics

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["run"]

_NO_FUSED_CE = (
    "fused cross-entropy: a preference loss needs each sequence's log-probability, so answer-"
    "token logits are made in chunks (recomputed in backward) instead"
)


def run(workdir: Path, bundle: BundleSpec, reporter: Reporter) -> None:
    """Train the job's preference objective in ``workdir`` and write its artifacts.

    Raises:
        FileNotFoundError: a local model folder or the starting adapter is missing.
        loraburst.remote._data.DataError: a pair cannot be used (names the file and row).
    """
    spec, objective = bundle.spec, bundle.spec.objective
    if distributed.current().world > 1:
        raise ValueError(
            f"{objective.type} trains on one GPU; this run has {distributed.current().world} "
            "ranks (multi-GPU training is for objective sft)"
        )
    path = loading.model_path(workdir, spec)  # before the heavy imports: fail in a second
    adapter = loading.adapter_path(workdir, spec)
    upload = os.environ.get(ENV_ARTIFACTS) or spec.artifacts
    reference = reference_mode(objective, adapter)
    reporter.update(phase="loading")
    reporter.event("loading", model=spec.model, method=spec.method, bits=spec.quant.bits,
                   objective=objective.type, init_adapter=bool(adapter))  # fmt: skip
    clock = setup.Clock()
    loading.quiet()
    import torch

    clock.mark("imports")

    # -- setup: data, model, memory plan ------------------------------------------------
    tokenizer, added = loading.load_tokenizer(spec, path)
    clock.mark("tokenizer")
    settings.cap_memory(spec)
    cuda = torch.cuda.is_available()
    # Pairs are tokenised while the model loads (see recipes/sft.py).
    with setup.beside(_encode, workdir, bundle, tokenizer) as encoding:
        model, tokenizer = loading.load_model(spec, path, tokenizer, added, fast=cuda,
                                              adapter=adapter)  # fmt: skip
        clock.mark("model")
        (rows, eval_rows, stats), clock.spans["encode"] = encoding.result()
    clock.mark("encode_wait")
    reporter.event("data", **stats)
    layout, why_padded = data.layout(settings.base_config(model))
    attn = train_attention(settings.base_config(model), layout)
    if attn is not None:  # padding-free, or eager for soft-capped attention (Gemma-2)
        settings.base_config(model)._attn_implementation = attn
    pair_spec = _pair_spec(spec)
    chosen, plan = settings.choose(pair_spec, model, _pair_lengths(rows), False, layout)
    plan = _pair_units(plan)
    clock.mark("plan")
    reporter.event(
        "settings",
        **{k: v for k, v in chosen.items() if k != "plan"},
        objective=objective.type, beta=objective.beta, reference=reference,
        batches_per_epoch=plan.batches_per_epoch,
        mean_tokens_per_micro_batch=round(plan.mean_tokens, 1),
        **({"padded_because": why_padded} if why_padded else {}),
        setup_s=clock.report(),
    )  # fmt: skip
    dtype = loading.compute_dtype(spec.quant.compute_dtype)
    if cuda:
        report = settings.apply_fastpath(model, chosen)
        chosen = {**chosen, "gradient_checkpointing": bool(report.get("checkpointed_layers"))}
        torch.cuda.reset_peak_memory_stats()
        reporter.event("fastpath", **{k: v for k, v in report.items() if k != "plan"},
                       plan=report.get("plan", {}), turned_off=[_NO_FUSED_CE])  # fmt: skip
    elif dtype == torch.float32:
        for param in model.parameters():  # LoRA adapters in fp32 when computing in fp32 (CPU)
            if param.requires_grad:
                param.data = param.data.float()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seed, mb = spec.train.seed, chosen["micro_batch_size"]
    eval_plan = None
    if eval_rows:
        eval_plan = _pair_units(data.batch_plan(pair_spec, _pair_lengths(eval_rows), mb, False,
                                                layout))  # fmt: skip
    if reference == "precompute":
        # The model as loaded (base, or the starting adapter): also on resume, before the
        # checkpoint's weights are loaded, so the reference is always the same.
        reporter.event("reference", mode="precompute", pairs=len(rows) // 2)
        preference.precompute_reference(model, rows, plan, layout=layout, pad_id=pad_id)
        if eval_plan is not None:
            preference.precompute_reference(model, eval_rows, eval_plan, layout=layout,
                                            pad_id=pad_id)  # fmt: skip
    train_loader = preference.pair_loader(rows, plan, seed=seed, layout=layout, pad_id=pad_id)
    eval_loader = None
    if eval_plan is not None:
        eval_loader = preference.pair_loader(eval_rows, eval_plan, seed=seed, layout=layout,
                                             pad_id=pad_id, shuffle=False)  # fmt: skip
    trainer = preference.trainer_class(objective)(
        model=model,
        args=hf.training_args(spec, workdir, mb, dtype),
        processing_class=tokenizer,
        loaders=(train_loader, eval_loader),
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    callback = progress.progress_callback(reporter, upload, trainer)
    trainer.add_callback(callback)

    # -- train ----------------------------------------------------------------------------
    resume = checkpoints.resume_point(workdir, upload, reporter)
    tokens_before = 0
    if resume is not None:
        reporter.event("resuming", checkpoint=resume.name)
        tokens_before = checkpoints.tokens_at(resume)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        callback.writer.close()

    # -- save -----------------------------------------------------------------------------
    stopped = reporter.stop_reason
    reporter.update(phase="saving")
    metrics = sft_metrics(spec, trainer, output, stats, chosen, resume, stopped, tokens_before)
    metrics.update(_objective_metrics(objective, reference, trainer))
    if eval_loader is not None and stopped is None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    # -- finish, as SFT: adapter, exports, manifest ---------------------------------------
    held = {"trainer": trainer, "model": model, "callback": callback}
    del trainer, model, callback
    outputs.finish(workdir, bundle, path, reporter, held, tokenizer=tokenizer, metrics=metrics,
                   stopped=stopped, upload=upload,
                   final_reward_margin=metrics.get("final_reward_margin"))  # fmt: skip


def _encode(
    workdir: Path, bundle: BundleSpec, tokenizer: Any
) -> tuple[data.Rows, data.Rows, dict[str, int]]:
    """Encode train (and eval) pairs; hold out ``eval_fraction`` of the pairs when there is no
    eval file. Rows come two by two: chosen, rejected."""
    spec, train = bundle.spec, bundle.spec.train

    def one(source: str | list[dict[str, Any]]) -> tuple[data.Rows, dict[str, int]]:
        if isinstance(source, list):  # the client refuses this before renting (Job.prepare)
            raise ValueError("preference pairs come from one file or hub dataset, not a mix")
        raw, _ = data.read_source(workdir, source, bundle.data_format)
        return encode_pairs(raw, tokenizer, max_seq_len=train.max_seq_len,
                            max_prompt_len=spec.objective.max_prompt_len, source=source)  # fmt: skip

    rows, stats = one(spec.dataset)
    eval_rows: data.Rows = []
    pairs = len(rows) // 2
    if spec.eval_dataset:
        eval_rows, _ = one(spec.eval_dataset)
    elif train.eval_fraction > 0 and pairs > 1:
        order = list(range(pairs))
        random.Random(train.seed).shuffle(order)
        n_eval = max(1, round(train.eval_fraction * pairs))

        def take(idx: list[int]) -> data.Rows:
            return [row for i in idx for row in rows[2 * i : 2 * i + 2]]

        eval_rows, rows = take(order[:n_eval]), take(sorted(order[n_eval:]))
        stats["rows"] = len(rows) // 2
    stats["eval_rows"] = len(eval_rows) // 2
    return rows, eval_rows, stats


def _pair_lengths(rows: data.Rows) -> list[int]:
    return [len(rows[i]["input_ids"]) + len(rows[i + 1]["input_ids"])
            for i in range(0, len(rows), 2)]  # fmt: skip


def _pair_spec(spec: JobSpecData) -> JobSpecData:
    """The spec the memory plan sees: a pair (one unit) holds up to twice max_seq_len."""
    train = dataclasses.replace(spec.train, max_seq_len=2 * spec.train.max_seq_len)
    return dataclasses.replace(spec, train=train)


def _pair_units(plan: BatchPlan) -> BatchPlan:
    """A plan over pairs ``[[i], ...]`` as units over rows ``[[2 i, 2 i + 1], ...]``."""
    units = [[2 * unit[0], 2 * unit[0] + 1] for unit in plan.units]
    return dataclasses.replace(plan, units=units)


def _objective_metrics(
    objective: ObjectiveSpec, reference: str | None, trainer: Any
) -> dict[str, Any]:
    """The objective, its settings, and each of its step metrics' history, first and last."""
    out: dict[str, Any] = {"objective": objective.type, "beta": objective.beta}
    if reference:
        out.update(reference=reference, loss_type=objective.loss_type)
    by_step: dict[int, dict[str, Any]] = {}
    for h in trainer.state.log_history:
        if h.get("reward_margin") is not None:
            by_step[h["step"]] = h
    history = [by_step[s] for s in sorted(by_step)]
    for name in trainer.metric_names:
        values = [h[name] for h in history if h.get(name) is not None]
        out[f"{name}_history"] = values
        out[f"first_{name}"] = values[0] if values else None
        out[f"final_{name}"] = values[-1] if values else None
    return out
