"""Supervised fine-tuning with LoRA/QLoRA/DoRA: set up, train, save. One screen, top to bottom::

tokenizer   its chat template, else ChatML
data        input_ids + labels, -100 off the loss (assistant/completion tokens only),
            tokenised on a thread while the model loads
batches     packed or not ("auto": pack short rows), one plan for every epoch, collated
            padding-free where the model allows
model       NF4/FP4/int8 base (bitsandbytes) or bf16/fp32, wrapped in LoRA/DoRA (peft)
settings    micro-batch, recompute and dequant cache planned on the loaded model (CUDA);
            where the setup's seconds went (setup_s)
train       Trainer over our batches; checkpoint every save_every_steps, resume from the
            newest; progress reported from a thread
evaluate    base against tuned: held-out loss, samples, lm-eval tasks (remote/evaluate.py)
finish      adapter/, metrics.json, exports (merged, GGUF, hub), each checked; the timeline
            into metrics.json; manifest.json last (training/outputs.finish)

Under torchrun (more than one GPU) every rank runs this; training/distributed.py decides DDP or
FSDP-QLoRA, and rank 0 alone writes the run's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import evaluate
from ..attention import train_implementation as train_attention
from ..batching import choose_packing
from ..protocol import ENV_ARTIFACTS, BundleSpec, JobSpecData
from ..sharding import rank_grad_accum
from ..training import (
    checkpoints,
    data,
    distributed,
    hf,
    loading,
    outputs,
    progress,
    settings,
    setup,
)

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["run"]

_GIB = 1024**3


def run(workdir: Path, bundle: BundleSpec, reporter: Reporter) -> None:
    """Train the job in ``workdir`` and write its artifacts.

    Raises:
        FileNotFoundError: a local model folder is missing (the message names it).
        loraburst.remote._data.DataError: a row cannot be used (names the file and row).
    """
    spec = bundle.spec
    path = loading.model_path(workdir, spec)  # before the heavy imports: fail in a second
    upload = os.environ.get(ENV_ARTIFACTS) or spec.artifacts
    reporter.update(phase="loading")
    reporter.event("loading", model=spec.model, method=spec.method, bits=spec.quant.bits)
    clock = setup.Clock()
    loading.quiet()
    import torch

    clock.mark("imports")

    # -- setup: data, model, memory plan ------------------------------------------------
    settings.cap_memory(spec)
    cuda = torch.cuda.is_available()
    ranks = distributed.current()
    # The checkpoint to resume from binds the engine: one written under FSDP resumes under
    # FSDP again, on any number of ranks (the agent starts even one under torchrun), one
    # written without it resumes without it.
    resume = checkpoints.resume_point(workdir, upload, reporter)
    written = None if resume is None else ("fsdp" if checkpoints.written_under_fsdp(resume)
                                           else "plain")  # fmt: skip
    multi: dict[str, Any] = {}
    if ranks.engaged(spec, fsdp_checkpoint=written == "fsdp"):
        multi = distributed.choose_strategy(spec, path, ranks.world, cuda=cuda,
                                            checkpoint=written)  # fmt: skip
    elif written == "fsdp" and resume is not None:
        raise distributed.DistributedTrainingError(
            f"{resume.name} was written under FSDP, whose model and optimizer state resume only "
            "under FSDP: run the job through the agent (it starts one FSDP rank under torchrun "
            "for it), or under torchrun with train.distributed: fsdp"
        )
    strategy = multi.get("strategy")
    sharded = bool(strategy and strategy.startswith("fsdp"))
    fast = cuda and not sharded  # the fast path runs on one GPU and under DDP
    dtype = loading.compute_dtype(spec.quant.compute_dtype)
    tokenizer, added = loading.load_tokenizer(spec, path)
    clock.mark("tokenizer")
    # The rows are tokenised on a thread while the model loads: loading is reading and
    # quantising (C++ and CUDA, the GIL let go), tokenising is the Rust tokenizer, so the two
    # overlap and the slower one alone is paid before the first step.
    with setup.beside(data.encode, workdir, bundle, tokenizer) as encoding:
        model, tokenizer = loading.load_model(spec, path, tokenizer, added, fast=fast,
                                              sharded=sharded)  # fmt: skip
        clock.mark("model")
        (rows, eval_rows, stats), clock.spans["encode"] = encoding.result()
    clock.mark("encode_wait")
    reporter.event("data", **stats)
    lengths = [len(r["input_ids"]) for r in rows]
    packing = choose_packing(spec.train.packing, lengths, spec.train.max_seq_len)
    if sharded and spec.quantized:
        distributed.check_quant_storage(model, dtype)
    layout, why_padded = data.layout(settings.base_config(model))
    attn = train_attention(settings.base_config(model), layout)
    if attn is not None:  # padding-free, or eager for soft-capped attention (Gemma-2)
        settings.base_config(model)._attn_implementation = attn
    chosen, plan = settings.choose(spec, model, lengths, packing, layout, fast=fast)
    clock.mark("plan")
    reporter.event(
        "settings",
        **{k: v for k, v in chosen.items() if k != "plan"},
        **({"plan": _public(chosen["plan"])} if "plan" in chosen else {}),
        batches_per_epoch=plan.batches_per_epoch,
        mean_tokens_per_micro_batch=round(plan.mean_tokens, 1),
        attention=settings.base_config(model)._attn_implementation,
        **({"padded_because": why_padded} if why_padded else {}),
        setup_s=clock.report(),
    )
    if chosen.get("plan", {}).get("fits") is False:
        reporter.event(
            "warning", message="the memory plan says even the smallest setting may not fit"
        )
    grad_accum, strategy_args = spec.train.grad_accum, None
    if strategy is not None:
        grad_accum = rank_grad_accum(spec.train.grad_accum, ranks.world)
        strategy_args = distributed.training_kwargs(
            str(strategy), model, checkpointing=bool(chosen["gradient_checkpointing"]), cuda=cuda
        )
        reporter.event(
            "distributed", **multi, grad_accum_per_rank=grad_accum,
            global_batch=chosen["micro_batch_size"] * grad_accum * ranks.world,
            turned_off=distributed.turned_off(str(strategy)),
        )  # fmt: skip
    if fast:
        # Our CUDA speed path (remote/fastpath/): its own recompute policy replaces HF's.
        report = settings.apply_fastpath(model, chosen)
        chosen = {**chosen, "gradient_checkpointing": bool(report.get("checkpointed_layers"))}
        # The reported peak is training's, not the memory probe's (as the anchors report it).
        torch.cuda.reset_peak_memory_stats()
        reporter.event("fastpath", **{k: v for k, v in report.items() if k != "plan"},
                       plan=report.get("plan", {}))  # fmt: skip
    elif dtype == torch.float32:
        # Keep LoRA adapters in fp32 when computing in fp32 (CPU).
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seed, mb = spec.train.seed, chosen["micro_batch_size"]
    train_loader = data.loader(rows, plan, seed=seed, layout=layout, pad_id=pad_id)
    eval_loader = None
    if eval_rows:
        eval_plan = data.batch_plan(spec, [len(r["input_ids"]) for r in eval_rows], mb, packing,
                                    layout)  # fmt: skip
        eval_loader = data.loader(eval_rows, eval_plan, seed=seed, layout=layout, pad_id=pad_id,
                                  shuffle=False)  # fmt: skip
    trainer = hf.trainer_class()(
        model=model,
        args=hf.training_args(
            spec, workdir, mb, dtype, grad_accum=grad_accum, distributed=strategy_args
        ),  # fmt: skip
        processing_class=tokenizer,
        loaders=(train_loader, eval_loader),
    )
    if strategy is not None:
        distributed.check_engine(trainer, strategy)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our events already say it, once
    callback = progress.progress_callback(reporter, upload, trainer)
    trainer.add_callback(callback)

    # -- train ----------------------------------------------------------------------------
    tokens_before = 0
    if resume is not None:
        reporter.event("resuming", checkpoint=resume.name)
        tokens_before = checkpoints.tokens_at(resume)  # now: rotation may delete it
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        callback.writer.close()

    # -- save -----------------------------------------------------------------------------
    stopped = reporter.stop_reason
    reporter.update(phase="saving")
    metrics = _metrics(spec, trainer, output, stats, chosen, resume, stopped, tokens_before)
    if eval_loader is not None and stopped is None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        if evaluate.wanted(spec, len(eval_rows)) and ranks.world > 1:
            reporter.event("warning", message="base-against-tuned evaluation runs on one GPU "
                           "only; the held-out loss above is the multi-GPU run's")  # fmt: skip
        elif evaluate.wanted(spec, len(eval_rows)):  # evaluation hook: base against tuned
            metrics["evaluation"] = evaluate.run(spec, model, tokenizer, trainer, eval_rows,
                                                 reporter, tuned_loss=metrics["eval_loss"])  # fmt: skip
        reporter.update(phase="saving")
    # -- finish: the adapter, then the exports (merged weights, GGUF, the hub, each checked)
    # before the manifest, so they are pulled and verified while the instance is still up.
    # Training's model and optimizer are let go first: exports load their own.
    held = {"trainer": trainer, "model": model, "callback": callback}
    del trainer, model, callback
    outputs.finish(workdir, bundle, path, reporter, held, tokenizer=tokenizer, metrics=metrics,
                   stopped=stopped, upload=upload)  # fmt: skip


def _public(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plan.items() if k != "probe"}


def _metrics(
    spec: JobSpecData,
    trainer: Any,
    output: Any,
    stats: dict[str, int],
    chosen: dict[str, Any],
    resume: Path | None,
    stopped: str | None,
    tokens_before: int,
) -> dict[str, Any]:
    import torch

    state = trainer.state
    history = outputs.loss_history(state)
    losses = [loss for _, loss in history]
    runtime = output.metrics.get("train_runtime", 0.0)
    session_tokens = trainer.tokens_seen - tokens_before
    cuda = torch.cuda.is_available()
    return {
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "loss_steps": [step for step, _ in history],
        "train_tokens": trainer.tokens_seen,
        "train_runtime_s": runtime,
        "tokens_per_s": session_tokens / runtime if runtime else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
        "stop_reason": stopped,
        "device": "cuda" if cuda else "cpu",
        "peak_vram_gb": torch.cuda.max_memory_allocated() / _GIB if cuda else None,
        "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / _GIB if cuda else None,
        "method": spec.method,
        "quantized_bits": spec.quant.bits if spec.quantized else None,
        "micro_batch_size": chosen["micro_batch_size"],
        "gradient_checkpointing": chosen["gradient_checkpointing"],
        "packing": chosen["packing"],
        "layout": chosen["layout"],
        "data": stats,
    }
