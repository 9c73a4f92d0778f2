"""The SFT recipe on MLX: the job :mod:`.trainer` trains with torch, trained on Apple Silicon::

    spec        bundle/spec.json, refused up front where MLX cannot honour a setting
                (:func:`.backends.mlx_refusals`: the message names the alternative)
    tokenizer   transformers', with the same chat template as the torch recipe
    data        :func:`.training.data.encode`: the same rows, formats and loss mask (-100 = no loss)
    batches     unpacked rows grouped by length (:mod:`.batching`, padded layout), one plan for
                every epoch, so a resumed run replays exactly the batches it would have seen
    model       mlx-lm's model of the HF folder; QLoRA: every decoder linear quantised with
                ``nn.quantize`` (4-bit affine, groups of 64; the head and embeddings stay
                unquantised, as bitsandbytes leaves them); LoRA layers on the target modules
    train       AdamW (or SGD), the HF learning-rate schedules, gradient clipping, token-
                weighted gradient accumulation; one visible loop; checkpoint every
                save_every_steps and on a stop request, resume from the latest one
    save        adapter/ in PEFT's format (:mod:`.mlx_convert`) plus adapter/mlx/ in mlx-lm's,
                metrics.json, then manifest.json (its presence means complete)

MLX and mlx-lm are imported inside the functions: ``loraburst.remote`` stays stdlib-only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import artifacts
from .backends import mlx_refusals
from .batching import BatchPlan, epoch_batches, plan_batches
from .mlx_convert import mlx_to_peft
from .protocol import (
    ADAPTER_DIR,
    BUNDLE_DIR,
    CHECKPOINT_DIR,
    ENV_ARTIFACTS,
    MANIFEST_FILE,
    METRICS_FILE,
    BundleSpec,
    build_manifest,
    is_quantized,
    write_atomic,
)

# The shared recipe blocks that are not torch: paths, data, resume point, quiet logs.
from .training import checkpoints, loading
from .training import data as training_data

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = ["GROUP_SIZE", "UnsupportedSetting", "add_lora", "load_model", "plan_for_memory", "run"]

GROUP_SIZE = 64  # MLX's default quantisation group, the same block size as bitsandbytes NF4
IGNORE_INDEX = -100
_GIB = 1024**3
_PAD_MULTIPLE = 32  # padded widths round up to this: fewer distinct shapes for MLX's kernels
_STATE_FILE = "trainer_state.json"  # a checkpoint is complete once this exists (as HF's)
_KEEP_CHECKPOINTS = 2


class UnsupportedSetting(ValueError):
    """A job setting the MLX recipe cannot honour; the message names the field and the fix."""


def _compute_dtype(name: str) -> Any:
    """``quant.compute_dtype`` for MLX: "auto" = bfloat16 on a Metal GPU, float32 on CPU."""
    import mlx.core as mx

    if name == "auto":
        return mx.bfloat16 if mx.metal.is_available() else mx.float32
    return getattr(mx, name)


def _local_folder(spec: dict[str, Any], model_path: str) -> Path:
    """The model's folder: itself, or the hub snapshot (weights, config and tokenizer only)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    folder = snapshot_download(
        model_path, revision=spec.get("model_revision"), allow_patterns=patterns
    )
    return Path(folder)


def _targets(model: Any, target_modules: str | Sequence[str]) -> list[str]:
    """Module paths to wrap, matched as PEFT matches them.

    ``"all-linear"`` is every linear layer but the output head; a list matches a module whose
    path equals an entry or ends with ``"." + entry``.

    Raises:
        UnsupportedSetting: an entry that matches no linear layer (the known names are listed).
    """
    import mlx.nn as nn

    linears = [
        path
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear))
        and path.rpartition(".")[2] != "lm_head"
    ]
    if target_modules == "all-linear":
        return sorted(linears)
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = sorted({p for p in linears for t in wanted if p == t or p.endswith("." + t)})
    missing = [t for t in wanted if not any(p == t or p.endswith("." + t) for p in linears)]
    if missing:
        names = sorted({p.rpartition(".")[2] for p in linears})
        raise UnsupportedSetting(
            f"lora.target_modules: {missing} match no linear layer of this model; its linear "
            f"layers are named {names}"
        )
    return chosen


def add_lora(model: Any, modules: Sequence[str], *, r: int, scale: float, dropout: float) -> None:
    """Freeze ``model`` and wrap each of ``modules`` (paths) in mlx-lm's ``LoRALinear``.

    ``lora_a`` starts uniform in ``+-1/sqrt(in)`` (from MLX's random state: seed it first) and
    ``lora_b`` at zero, so the wrapped model computes what the base did.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    by_path = dict(model.named_modules())
    wrapped = [
        (p, LoRALinear.from_base(by_path[p], r=r, dropout=dropout, scale=scale)) for p in modules
    ]
    model.update_modules(tree_unflatten(wrapped))


def load_model(spec: dict[str, Any], model_path: str) -> tuple[Any, dict[str, Any]]:
    """Load the base model for MLX, quantise it per ``spec``, and add fresh LoRA layers.

    ``spec`` is ``JobSpec.model_dump(mode="json")``. The adapters' initial values depend only on
    ``train.seed``.

    Returns:
        ``(model, config)``: the mlx-lm model, ready to train, and its ``config.json``.

    Raises:
        UnsupportedSetting: target modules that match nothing.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model as mlx_load_model

    folder = _local_folder(spec, model_path)
    model, config = mlx_load_model(folder)
    model.set_dtype(_compute_dtype(spec["quant"]["compute_dtype"]))
    if is_quantized(spec["method"], spec["quant"]["bits"]) and "quantization" not in config:

        def decoder_linear(path: str, module: Any) -> bool:
            # bitsandbytes leaves the head (and embeddings) unquantised; so do we. A layer
            # whose input is not a whole number of groups stays unquantised too.
            return (
                isinstance(module, nn.Linear)
                and path.rpartition(".")[2] != "lm_head"
                and module.weight.shape[1] % GROUP_SIZE == 0
            )

        nn.quantize(model, group_size=GROUP_SIZE, bits=4, class_predicate=decoder_linear)
    lora = spec["lora"]
    mx.random.seed(spec["train"]["seed"])
    add_lora(
        model,
        _targets(model, lora["target_modules"]),
        r=lora["r"],
        scale=lora["alpha"] / lora["r"],
        dropout=lora["dropout"],
    )
    return model, config


# -- batches ---------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _collate(rows: Sequence[Mapping[str, list[int]]], pad_id: int) -> tuple[Any, Any, int, int]:
    """One padded micro-batch: ids, labels (``-100`` past each row), real and loss tokens.

    Rows are right-padded: under a causal mask no real token attends to padding after it, so
    a row's loss is the same as alone (the same argument as :mod:`.collate`'s padded layout).
    """
    import mlx.core as mx
    import numpy as np

    width = _round_up(max(len(r["input_ids"]) for r in rows), _PAD_MULTIPLE)
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int32)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = row["input_ids"]
        labels[i, :n] = row["labels"]
    # Label 0 of a row is never predicted (nothing comes before it), as in collate.py.
    labels[:, 0] = IGNORE_INDEX
    real = sum(len(r["input_ids"]) for r in rows)
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return mx.array(ids), mx.array(labels), real, loss_tokens


def _micro_batches(
    rows: Sequence[Mapping[str, list[int]]], plan: BatchPlan, seed: int
) -> Iterator[tuple[float, list[Mapping[str, list[int]]]]]:
    """Every micro-batch of every epoch, forever, with the epoch (fractional) it ends."""
    lengths = [len(r["input_ids"]) for r in rows]
    epoch = 0
    while True:
        batches = epoch_batches(plan, lengths, seed=seed, epoch=epoch, padded=True)
        for k, batch in enumerate(batches, start=1):
            yield (
                epoch + k / len(batches),
                [rows[i] for unit in batch for i in plan.units[unit]],
            )
        epoch += 1


# -- schedule and optimizer ------------------------------------------------------------------


def _lr_at(train: Mapping[str, Any], step: int, total: int) -> float:
    """transformers' schedules (``get_scheduler``): the rate for optimizer step ``step``
    (0-based), with ``warmup_ratio`` of ``total`` steps of linear warm-up."""
    peak = float(train["learning_rate"])
    kind = train["lr_scheduler"]
    warmup = int(math.ceil(float(train["warmup_ratio"]) * total))
    if kind == "constant":
        return peak
    if step < warmup:
        return peak * step / max(1, warmup)
    if kind == "constant_with_warmup":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine


def _optimizer(train: Mapping[str, Any]) -> Any:
    import mlx.optimizers as optim

    if train["optim"] == "sgd":
        return optim.SGD(learning_rate=0.0, weight_decay=train["weight_decay"])
    # transformers' AdamW defaults: betas (0.9, 0.999), eps 1e-8 (MLX's default decay is 0.01).
    return optim.AdamW(
        learning_rate=0.0, betas=[0.9, 0.999], eps=1e-8, weight_decay=train["weight_decay"]
    )


# -- memory and settings ---------------------------------------------------------------------


def _settings(
    spec: dict[str, Any], config: Mapping[str, Any], lengths: Sequence[int]
) -> dict[str, Any]:
    """Micro-batch size and recompute: the spec's, or chosen for this Mac's GPU memory.

    On Metal, :func:`plan_for_memory` within the GPU's working set; on MLX's CPU build (tests,
    Linux) "auto" means micro-batch 4 without recompute, as the torch recipe does on CPU.
    """
    import mlx.core as mx

    train = spec["train"]
    mbs, ckpt = train["micro_batch_size"], train["gradient_checkpointing"]
    if not mx.metal.is_available():
        mb = min(4, max(len(lengths), 1)) if mbs == "auto" else int(mbs)
        return {"micro_batch_size": mb, "gradient_checkpointing": ckpt is True}
    return plan_for_memory(spec, config, lengths, _budget_gib(spec))


def plan_for_memory(
    spec: dict[str, Any], config: Mapping[str, Any], lengths: Sequence[int], budget_gib: float
) -> dict[str, Any]:
    """The fastest micro-batch / recompute pair whose peak fits ``budget_gib``, from the memory
    model the client's estimate uses (:func:`.memory.choose_settings`); the spec's own values
    where it sets them. Sized for full ``max_seq_len`` rows, timed at the mean row.
    """
    from .memory import choose_settings

    train = spec["train"]
    pick = choose_settings(
        config,
        vram_gb=budget_gib,
        seq_len=train["max_seq_len"],
        mean_seq_len=max(1, round(sum(lengths) / max(len(lengths), 1))),
        lora_r=spec["lora"]["r"],
        bits=spec["quant"]["bits"] if is_quantized(spec["method"], spec["quant"]["bits"]) else 16,
        micro_batch_size=train["micro_batch_size"],
        gradient_checkpointing=train["gradient_checkpointing"],
        target_modules=spec["lora"]["target_modules"],
    )
    return {
        "micro_batch_size": int(pick["micro_batch_size"]),
        "gradient_checkpointing": bool(pick["gradient_checkpointing"]),
        "memory_budget_gib": round(budget_gib, 2),
        "planned_peak_gib": round(float(pick["peak_vram_gb"]), 2),
        "fits": bool(pick["fits"]),
    }


def _budget_gib(spec: dict[str, Any]) -> float:
    """What the GPU may use: Metal's recommended working set, or the spec's cap when lower."""
    import mlx.core as mx

    info = (getattr(mx, "device_info", None) or mx.metal.device_info)()
    total = float(info.get("max_recommended_working_set_size", info.get("memory_size", 0))) / _GIB
    cap = spec["train"].get("max_gpu_memory_gib")
    return min(total, float(cap)) if cap else total


def _cap_memory(spec: dict[str, Any]) -> None:
    """Hold MLX to ``train.max_gpu_memory_gib``; on Metal, keep the model wired in memory."""
    import mlx.core as mx

    cap = spec["train"].get("max_gpu_memory_gib")
    if cap:
        mx.set_memory_limit(int(float(cap) * _GIB))
    if mx.metal.is_available():
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        maybe_set_recommended_wired_limit()


# -- checkpoints -----------------------------------------------------------------------------


def _checkpoints(root: Path) -> list[Path]:
    done = [
        p
        for p in root.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / _STATE_FILE).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]))


def _save_checkpoint(root: Path, model: Any, optimizer: Any, state: Mapping[str, Any]) -> Path:
    """``checkpoint-<step>/``: adapter and optimizer tensors, then ``trainer_state.json``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = root / f"checkpoint-{state['global_step']}"
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(path / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    mx.save_safetensors(str(path / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    write_atomic(path / _STATE_FILE, json.dumps(dict(state), indent=1, sort_keys=True))
    for old in _checkpoints(root)[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _load_checkpoint(path: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore adapter and optimizer from ``path``; its trainer state.

    Raises:
        UnsupportedSetting: a checkpoint another backend wrote (its layout differs).
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    state: dict[str, Any] = json.loads((path / _STATE_FILE).read_text())
    if state.get("backend") != "mlx":
        raise UnsupportedSetting(
            f"{path} was written by the torch backend and cannot resume with MLX; set "
            "train.backend: torch to resume it, or remove the checkpoints to start over"
        )
    adapters = cast(dict[str, Any], mx.load(str(path / "adapters.safetensors")))
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    moments = cast(dict[str, Any], mx.load(str(path / "optimizer.safetensors")))
    optimizer.state = tree_unflatten(list(moments.items()))
    return state


# -- the recipe ------------------------------------------------------------------------------


def _loss(model: Any, ids: Any, labels: Any, denominator: Any) -> Any:
    """Summed cross-entropy of the loss tokens over ``denominator`` (the step's loss tokens),
    so micro-batches add up to the step's token-weighted mean, as transformers' Trainer does."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(ids[:, :-1]).astype(mx.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0)) * mask
    return ce.sum() / denominator


def _evaluate(
    model: Any, rows: Sequence[Mapping[str, list[int]]], micro_batch: int, pad_id: int
) -> float:
    import mlx.core as mx

    total, count = 0.0, 0
    for k in range(0, len(rows), micro_batch):
        ids, labels, _, n = _collate(rows[k : k + micro_batch], pad_id)
        if n:
            total += float(_loss(model, ids, labels, mx.array(1.0)).item())
            count += n
    return total / count if count else float("nan")


def run(workdir: Path, reporter: Reporter | None = None) -> None:
    """Train the job in ``workdir`` with MLX and write its artifacts (see :mod:`.protocol`).

    Raises:
        UnsupportedSetting: a setting MLX cannot honour (before the model is loaded), a model
            whose tokenizer would need new tokens, or another backend's checkpoint.
        FileNotFoundError: the spec or a local model folder is missing.
        loraburst.remote._data.DataError: a row cannot be used (names the file and row).
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if reporter is None:
        from .agent import Reporter

        reporter = Reporter(workdir)
    doc = json.loads((workdir / BUNDLE_DIR / "spec.json").read_text())
    spec, train = doc["spec"], doc["spec"]["train"]
    refusals = mlx_refusals(spec)
    if refusals:
        raise UnsupportedSetting(
            "the MLX backend cannot train this job:\n  " + "\n  ".join(refusals)
        )
    typed = BundleSpec.from_dict(doc)
    model_path = loading.model_path(workdir, typed.spec)
    upload = os.environ.get(ENV_ARTIFACTS) or spec.get("artifacts")
    reporter.update(phase="loading")
    reporter.event(
        "loading",
        model=spec["model"],
        method=spec["method"],
        bits=spec["quant"]["bits"],
        backend="mlx",
    )
    loading.quiet()
    # -- setup: tokenizer, data, model, settings
    tokenizer, added = loading.load_tokenizer(typed.spec, model_path)
    if added:
        raise UnsupportedSetting(
            f"the model's tokenizer has no chat template, and the ChatML default needs tokens "
            f"it lacks ({', '.join(added)}); the MLX backend does not train new embedding rows. "
            "Use a model with a chat template (an -Instruct variant), prompt/completion or text "
            "rows, or train.backend: torch"
        )
    rows, eval_rows, stats = training_data.encode(workdir, typed, tokenizer)
    reporter.event("data", **stats)
    lengths = [len(r["input_ids"]) for r in rows]
    _cap_memory(spec)
    model, config = load_model(spec, model_path)
    settings = _settings(spec, config, lengths)
    mb, accum = settings["micro_batch_size"], train["grad_accum"]
    epochs = max(1, math.ceil(train["epochs"])) if not train["max_steps"] else 1
    plan = plan_batches(lengths, max_seq_len=train["max_seq_len"], micro_batch=mb, packing=False,
                        seed=train["seed"], epochs=epochs, padded=True)  # fmt: skip
    per_epoch = max(1, plan.batches_per_epoch // accum)
    total = train["max_steps"] or math.ceil(train["epochs"] * per_epoch)
    settings.update(packing=False, layout="padded", quantization=(
        f"mlx affine 4-bit, groups of {GROUP_SIZE}" if is_quantized(spec["method"], spec["quant"]["bits"]) else None))  # fmt: skip
    reporter.event("settings", **settings, backend="mlx", device=_device(),
                   batches_per_epoch=plan.batches_per_epoch,
                   mean_tokens_per_micro_batch=round(plan.mean_tokens, 1))  # fmt: skip
    if settings.get("fits") is False:
        reporter.event("warning", message="the memory plan says even the smallest setting may "
                       "not fit this Mac's GPU memory")  # fmt: skip
    if settings["gradient_checkpointing"]:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # every decoder layer recomputes in the backward
    optimizer = _optimizer(train)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    resume = checkpoints.resume_point(workdir, upload, reporter)
    state: dict[str, Any] = {"backend": "mlx", "global_step": 0, "num_input_tokens_seen": 0,
                             "log_history": [], "max_steps": total, "epoch": 0.0}  # fmt: skip
    if resume is not None:
        reporter.event("resuming", checkpoint=resume.name)
        state = {**_load_checkpoint(resume, model, optimizer), "max_steps": total}
    resumed_from, tokens_before = (
        state["global_step"] if resume else None,
        state["num_input_tokens_seen"],
    )
    loss_and_grad = nn.value_and_grad(model, _loss)
    stream = _micro_batches(rows, plan, train["seed"])
    for _ in range(state["global_step"] * accum):  # replay the order: skip what was trained
        next(stream)

    # -- train: one optimizer step per iteration, grad_accum micro-batches each
    model.train()
    reporter.update(phase="training", step=state["global_step"], total_steps=total)
    reporter.event("training", step=state["global_step"], total=total)
    t0, stopped = time.time(), None
    while state["global_step"] < total:
        step = state["global_step"]
        drawn = [next(stream) for _ in range(accum)]
        value, tokens = _step(model, loss_and_grad, optimizer, [m for _, m in drawn], pad_id,
                              train, step, total)  # fmt: skip
        state["global_step"], state["epoch"] = step + 1, drawn[-1][0]
        state["num_input_tokens_seen"] += tokens
        state["log_history"].append({"step": step + 1, "loss": value})
        _report(reporter, state, total, value, t0, resumed_from or 0, tokens_before)
        stopped = reporter.stop_reason
        if stopped is not None:
            reporter.event("stopping", reason=stopped, step=step + 1)
        save_every = train["save_every_steps"]
        if (save_every and (step + 1) % save_every == 0) or stopped is not None:
            _checkpoint(workdir, model, optimizer, state, reporter, upload)
        if stopped is not None:
            break
    runtime = time.time() - t0

    # -- save: the PEFT adapter (and mlx-lm's), metrics, then the manifest
    reporter.update(phase="saving")
    model.eval()
    lora = dict(tree_flatten(model.trainable_parameters()))
    _save_adapter(workdir / ADAPTER_DIR, lora, spec, model_path, tokenizer)
    metrics = _metrics(
        spec, state, stats, settings, runtime, resumed_from, tokens_before, stopped, lora
    )
    if eval_rows and stopped is None:
        metrics["eval_loss"] = _evaluate(model, eval_rows, mb, pad_id)
    write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    manifest = build_manifest(workdir, [ADAPTER_DIR, METRICS_FILE])
    write_atomic(workdir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if upload:
        for name in (ADAPTER_DIR, METRICS_FILE, MANIFEST_FILE):
            artifacts.upload_tree(upload, workdir / name, f"final/{name}")
    phase = "stopped" if stopped else "done"
    reporter.update(phase=phase, stop_reason=stopped, step=state["global_step"], eta_s=0.0)
    reporter.event(phase, steps=state["global_step"], final_loss=metrics["final_loss"])


def _step(
    model: Any,
    loss_and_grad: Any,
    optimizer: Any,
    micro_batches: Sequence[Sequence[Mapping[str, list[int]]]],
    pad_id: int,
    train: Mapping[str, Any],
    step: int,
    total: int,
) -> tuple[float, int]:
    """One optimizer step over ``micro_batches`` (``grad_accum`` of them): gradients weighted
    by loss tokens, clipped to ``max_grad_norm``, applied at the schedule's rate.

    Returns:
        The step's loss (mean over its loss tokens) and the real tokens it trained on.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    batches = [_collate(rows, pad_id) for rows in micro_batches]
    denominator = mx.array(float(max(sum(b[3] for b in batches), 1)))
    grads, loss_sum = None, mx.array(0.0)
    for ids, labels, _, _ in batches:
        loss, g = loss_and_grad(model, ids, labels, denominator)
        grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        loss_sum = loss_sum + loss
        mx.eval(grads, loss_sum)  # bound the graph to one micro-batch
    grads, _ = optim.clip_grad_norm(grads, train["max_grad_norm"])
    optimizer.learning_rate = _lr_at(train, step, total)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return float(cast(float, loss_sum.item())), sum(b[2] for b in batches)


def _checkpoint(
    workdir: Path,
    model: Any,
    optimizer: Any,
    state: Mapping[str, Any],
    reporter: Reporter,
    upload: str | None,
) -> None:
    path = _save_checkpoint(workdir / CHECKPOINT_DIR, model, optimizer, state)
    reporter.event("checkpoint", step=state["global_step"], path=str(path))
    if upload:
        files = artifacts.upload_checkpoint(upload, path)
        reporter.event("checkpoint_uploaded", step=state["global_step"], files=files)


def _device() -> str:
    import mlx.core as mx

    return "metal" if mx.metal.is_available() else "cpu"


def _report(
    reporter: Reporter,
    state: Mapping[str, Any],
    total: int,
    loss: float,
    t0: float,
    step0: int,
    tokens0: int,
) -> None:
    """The same ``state.json`` fields and ``step`` event as the torch recipe's progress."""
    now = time.time()
    step, tokens = state["global_step"], state["num_input_tokens_seen"]
    elapsed, done = now - t0, step - step0
    tps = (tokens - tokens0) / elapsed if elapsed > 0 and done > 0 else None
    eta = (total - step) * elapsed / done if done > 0 else None
    reporter.update(step=step, loss=loss, tokens_per_s=round(tps, 1) if tps else None,
                    eta_s=round(eta, 1) if eta is not None else None, epoch=state["epoch"])  # fmt: skip
    reporter.event("step", step=step, total=total, loss=round(loss, 4), tokens=tokens,
                   t=round(now, 4), tokens_per_s=round(tps, 1) if tps else None)  # fmt: skip


def _save_adapter(
    out: Path, lora: Mapping[str, Any], spec: dict[str, Any], model_path: str, tokenizer: Any
) -> None:
    """PEFT's layout in ``out`` (what ``PeftModel.from_pretrained`` loads), mlx-lm's in
    ``out/mlx`` (what ``mlx_lm.generate --adapter-path`` loads), and the tokenizer."""
    import mlx.core as mx

    shutil.rmtree(out, ignore_errors=True)
    cfg = spec["lora"]
    is_hub = not Path(model_path).is_dir()
    mlx_to_peft(
        lora, out, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"],
        base_model=spec["model"] if is_hub else model_path,
        revision=spec.get("model_revision") if is_hub else None,
    )  # fmt: skip
    tokenizer.save_pretrained(out)
    native = out / "mlx"
    native.mkdir()
    mx.save_safetensors(str(native / "adapters.safetensors"), dict(lora))
    # mlx-lm applies LoRA to the last num_layers layers, to the keys given relative to a layer.
    keys = sorted({k.split(".layers.", 1)[1].split(".", 1)[1].rsplit(".", 1)[0] for k in lora})
    layers = {int(k.split(".layers.", 1)[1].split(".", 1)[0]) for k in lora}
    native_cfg = {
        "fine_tune_type": "lora",
        "num_layers": max(layers) + 1 if layers else 0,
        "lora_parameters": {
            "rank": cfg["r"],
            "scale": cfg["alpha"] / cfg["r"],
            "dropout": cfg["dropout"],
            "keys": keys,
        },  # fmt: skip
    }
    (native / "adapter_config.json").write_text(json.dumps(native_cfg, indent=2) + "\n")


def _metrics(
    spec: dict[str, Any],
    state: Mapping[str, Any],
    stats: Mapping[str, int],
    settings: Mapping[str, Any],
    runtime: float,
    resumed_from: int | None,
    tokens_before: int,
    stopped: str | None,
    lora: Mapping[str, Any],
) -> dict[str, Any]:
    """The torch recipe's metrics fields (the client reads them the same way), plus MLX's."""
    import mlx.core as mx

    history = sorted({h["step"]: h["loss"] for h in state["log_history"]}.items())
    losses = [loss for _, loss in history]
    session = state["num_input_tokens_seen"] - tokens_before
    peak = mx.get_peak_memory() / _GIB
    return {
        "backend": "mlx",
        "steps": state["global_step"],
        "total_steps": state["max_steps"],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "loss_steps": [step for step, _ in history],
        "train_tokens": state["num_input_tokens_seen"],
        "train_runtime_s": runtime,
        "tokens_per_s": session / runtime if runtime else None,
        "trainable_params": sum(int(v.size) for v in lora.values()),
        "resumed_from_step": resumed_from,
        "stop_reason": stopped,
        "device": _device(),
        # Unified memory: MLX's peak is the GPU's share of it (None on the CPU build).
        "peak_vram_gb": peak if mx.metal.is_available() else None,
        "peak_vram_reserved_gb": None,
        "peak_memory_gb": peak,
        "method": spec["method"],
        "quantized_bits": spec["quant"]["bits"]
        if is_quantized(spec["method"], spec["quant"]["bits"])
        else None,
        "quantization": settings.get("quantization"),
        "micro_batch_size": settings["micro_batch_size"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "packing": False,
        "layout": "padded",
        "data": dict(stats),
    }
