"""The QLoRA recipe: set up, train with TRL's ``SFTTrainer``, save. One screen, top to bottom::

    spec        bundle/spec.json (the client's JobSpec)
    tokenizer   its chat template, else ChatML (remote/_data.py)
    data        input_ids + labels, -100 off the loss (assistant/completion tokens only)
    settings    micro-batch and gradient checkpointing (remote/memory.py on CUDA)
    model       NF4/FP4/int8 base (bitsandbytes) or bf16/fp32, wrapped in LoRA/DoRA (peft)
    train       SFTTrainer, checkpoint every save_every_steps, resume from the latest one
    save        adapter/, metrics.json, then manifest.json (its presence means complete)

Torch and friends are imported inside the functions: ``loraburst.remote`` itself is stdlib-only.
:func:`load_model` and :func:`run` are the API the benchmarks reuse.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import artifacts
from ._data import encode_rows, ensure_chat_template, read_jsonl
from .protocol import (
    ADAPTER_DIR,
    BUNDLE_DIR,
    CHECKPOINT_DIR,
    ENV_ARTIFACTS,
    MANIFEST_FILE,
    METRICS_FILE,
    build_manifest,
    write_atomic,
)

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = ["compute_dtype", "latest_checkpoint", "load_model", "load_tokenizer", "run"]

_GIB = 1024**3


def compute_dtype(name: str) -> Any:
    """The torch dtype for ``quant.compute_dtype``: "auto" = bf16 on a GPU that has it, else
    fp16 on a GPU, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _quantized(spec: dict[str, Any]) -> bool:
    """Base weights in 4/8 bits (QLoRA, QDoRA); plain LoRA and bits=16 keep them unquantised."""
    return bool(spec["method"] != "lora" and spec["quant"]["bits"] in (4, 8))


def _revision(spec: dict[str, Any], model_path: str) -> str | None:
    return None if Path(model_path).is_dir() else spec.get("model_revision")


def load_tokenizer(spec: dict[str, Any], model_path: str) -> tuple[Any, list[str]]:
    """The model's tokenizer with a chat template and a pad token; and the tokens we added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=_revision(spec, model_path))
    added = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def load_model(
    spec: dict[str, Any],
    model_path: str,
    tokenizer: Any = None,
    added: list[str] | None = None,
    *,
    fast: bool = False,
) -> tuple[Any, Any]:
    """Load the base model (quantised per ``spec``) and wrap it in fresh LoRA/DoRA adapters.

    ``spec`` is ``JobSpec.model_dump(mode="json")``. The adapters' initial values depend only on
    ``train.seed``. Special tokens added for the ChatML default get trainable embedding rows.
    With ``fast`` (CUDA, before :func:`loraburst.remote.fastpath.optimize`), embeddings and norms
    stay in bf16 instead of ``prepare_model_for_kbit_training``'s fp32 copies: the fast path
    computes norms in fp32 internally, and recompute is its decision.

    Returns:
        ``(peft_model, tokenizer)``, ready to train, on CUDA when present, else CPU.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    if tokenizer is None:
        tokenizer, added = load_tokenizer(spec, model_path)
    quant, lora = spec["quant"], spec["lora"]
    dtype = compute_dtype(quant["compute_dtype"])
    quantized = _quantized(spec)
    bnb = None
    if quantized and quant["bits"] == 4:
        bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantized:
        bnb = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=_revision(spec, model_path),
        quantization_config=bnb,
        dtype=dtype,
        device_map={"": device},
    )
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # a KV cache is dead weight in training
    if bnb is not None and not fast:
        # Checkpointing is the trainer's decision (SFTConfig), not this helper's.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
    set_seed(spec["train"]["seed"])
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        use_dora=spec["method"] == "dora",
        task_type="CAUSAL_LM",
        trainable_token_indices=tokenizer.convert_tokens_to_ids(added) if added else None,
    )
    return get_peft_model(model, config), tokenizer


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` under ``root`` (one with trainer_state.json)."""
    done = [
        p
        for p in root.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _datasets(
    workdir: Path, doc: dict[str, Any], tokenizer: Any
) -> tuple[Any, Any, dict[str, int]]:
    """Encode train (and eval) rows; hold out ``eval_fraction`` when there is no eval file."""
    from datasets import Dataset, load_dataset

    spec, train = doc["spec"], doc["spec"]["train"]

    def encode(source: str, fmt: str) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
        path = workdir / BUNDLE_DIR / source
        if fmt == "hub" or not path.is_file():
            rows: Any = load_dataset(source, split="train")
            fmt = "hub"
        else:
            rows = read_jsonl(path)
        return encode_rows(
            rows,
            fmt,
            tokenizer,
            max_seq_len=train["max_seq_len"],
            loss_on=train["loss_on"],
            source=source,
        )

    rows, stats = encode(spec["dataset"], doc["data_format"])
    eval_rows: list[dict[str, list[int]]] = []
    if spec.get("eval_dataset"):
        eval_rows, _ = encode(spec["eval_dataset"], doc["data_format"])
    elif train["eval_fraction"] > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(train["seed"]).shuffle(order)
        n_eval = max(1, round(train["eval_fraction"] * len(rows)))
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    stats["eval_rows"] = len(eval_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    return Dataset.from_list(rows), eval_ds, stats


def _settings(spec: dict[str, Any], model_path: str, seq_len: int, rows: int) -> dict[str, Any]:
    """Micro-batch size and gradient checkpointing: the spec's, or chosen for this machine."""
    import torch

    train = spec["train"]
    mbs, ckpt = train["micro_batch_size"], train["gradient_checkpointing"]
    if not torch.cuda.is_available():
        return {
            "micro_batch_size": min(4, max(rows, 1)) if mbs == "auto" else mbs,
            "gradient_checkpointing": False if ckpt == "auto" else ckpt,
        }
    if mbs != "auto" and ckpt != "auto":
        return {"micro_batch_size": mbs, "gradient_checkpointing": ckpt}
    from transformers import AutoConfig

    from .memory import choose_settings

    config = AutoConfig.from_pretrained(model_path, revision=_revision(spec, model_path))
    quantized = _quantized(spec)
    return choose_settings(
        config.to_dict(),
        vram_gb=torch.cuda.get_device_properties(0).total_memory / _GIB,
        seq_len=seq_len,
        lora_r=spec["lora"]["r"],
        bits=spec["quant"]["bits"] if quantized else 16,
        micro_batch_size=mbs,
        gradient_checkpointing=ckpt,
        target_modules=spec["lora"]["target_modules"],
    )


def _fastpath(
    model: Any, spec: dict[str, Any], settings: dict[str, Any], seq_len: int
) -> dict[str, Any]:
    """Apply the CUDA fast path with the fastest recompute/dequant-cache setting that fits.

    With ``gradient_checkpointing: auto`` the number of recomputed layers and the dequant cache
    are planned against this card's memory; an explicit choice is kept.
    """
    import torch

    from . import fastpath

    mbs = settings["micro_batch_size"]
    planned: dict[str, Any] = {}
    if spec["train"]["gradient_checkpointing"] == "auto":
        vram = torch.cuda.get_device_properties(0).total_memory / _GIB
        planned = fastpath.plan(model, seq_len=seq_len, micro_batch_size=mbs, budget_gib=vram)
        every, cache = int(planned["gradient_checkpointing"]), planned["dequant_cache"]
        recompute: int | None = planned["recompute_layers"]
        loss_chunk: int | None = planned["loss_chunk"]
    else:
        every, cache, recompute = (1 if settings["gradient_checkpointing"] else 0), 0, None
        loss_chunk = None
    fastpath.optimize(
        model,
        seq_len=seq_len,
        micro_batch_size=mbs,
        gradient_checkpointing=every,
        dequant_cache=cache,
        recompute_layers=recompute,
        loss_chunk=loss_chunk,
    )
    return {**dict(model.fastpath_report), "plan": planned}


def _sft_config(spec: dict[str, Any], workdir: Path, settings: dict[str, Any], dtype: Any) -> Any:
    import torch
    from trl import SFTConfig  # type: ignore[attr-defined]

    train = spec["train"]
    save = train["save_every_steps"]
    return SFTConfig(
        output_dir=str(workdir / CHECKPOINT_DIR),
        max_steps=train["max_steps"] or -1,
        num_train_epochs=train["epochs"],
        learning_rate=train["learning_rate"],
        per_device_train_batch_size=settings["micro_batch_size"],
        per_device_eval_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        warmup_steps=train["warmup_ratio"],  # a float below 1 is a ratio
        lr_scheduler_type=train["lr_scheduler"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        optim=train["optim"],
        seed=train["seed"],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        max_length=train["max_seq_len"],
        packing=train["packing"],
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=save or 500,
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _progress_callback(reporter: Reporter, upload: str | None) -> Any:
    """A TrainerCallback: state.json + events each step, S3 upload per checkpoint, and stops."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.step0 = time.time(), state.global_step
            self.tokens0 = state.num_input_tokens_seen
            reporter.update(phase="training", step=state.global_step, total_steps=state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            elapsed = max(time.time() - self.t0, 1e-9)
            done = max(state.global_step - self.step0, 1)
            tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
            eta = (state.max_steps - state.global_step) * elapsed / done
            reporter.update(
                step=state.global_step,
                loss=logs["loss"],
                tokens_per_s=round(tps, 1),
                eta_s=round(eta, 1),
                epoch=state.epoch,
            )
            reporter.event(
                "step",
                step=state.global_step,
                total=state.max_steps,
                loss=round(logs["loss"], 4),
                lr=logs.get("learning_rate"),
                tokens_per_s=round(tps, 1),
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reason = reporter.stop_reason
            if reason is not None and not control.should_training_stop:
                reporter.event("stopping", reason=reason, step=state.global_step)
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            reporter.event("checkpoint", step=state.global_step, path=str(path))
            if upload:
                files = artifacts.upload_checkpoint(upload, path)
                reporter.event("checkpoint_uploaded", step=state.global_step, files=files)

    return Progress()


def _trainer_class() -> Any:
    """TRL's SFTTrainer; on CPU with the plain causal-LM loss.

    TRL 1.x computes the SFT loss with a fused LM head whose kernels are Triton (GPU) only; on
    CPU the model's own loss over the same labels is the same number, computed the usual way.
    """
    from transformers import Trainer
    from trl import SFTTrainer  # type: ignore[attr-defined]

    class LoraburstSFTTrainer(SFTTrainer):
        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            fast = getattr(getattr(model, "fastpath_report", None), "get", lambda _k: False)
            if self.args.device.type in ("cuda", "xpu") and not fast("chunked_loss"):
                # TRL's loss reads the logits for its metrics; the fast path's chunked loss
                # never materialises them, so it goes through Trainer's plain loss instead.
                return super().compute_loss(  # type: ignore[no-untyped-call]
                    model, inputs, return_outputs, num_items_in_batch
                )
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LoraburstSFTTrainer


def _resume_point(workdir: Path, upload: str | None, reporter: Reporter) -> Path | None:
    root = workdir / CHECKPOINT_DIR
    found = latest_checkpoint(root)
    if found is None and upload:
        found = artifacts.download_latest_checkpoint(upload, root)
        if found is not None:
            reporter.event("checkpoint_downloaded", path=str(found))
    return found


def _quiet() -> None:
    # bitsandbytes looks for an optional hub kernel for CPU 4-bit matmuls and warns when it is
    # absent; the built-in path is the one we use, so the warning is noise in agent.log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _model_path(workdir: Path, spec: dict[str, Any]) -> str:
    """The bundled or local model folder (checked), else the hub id as given."""
    model = spec["model"]
    if model != "model" and not Path(model).is_absolute():
        return str(model)  # a hub id
    path = workdir / BUNDLE_DIR / model  # an absolute path stays itself
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"model folder {path} {what}; check the job's `model`")
    return str(path)


def run(workdir: Path, reporter: Reporter | None = None) -> None:
    """Train the job in ``workdir`` (see :mod:`.protocol`) and write its artifacts.

    Raises:
        FileNotFoundError: the spec or a local model folder is missing (the message names it).
        loraburst.remote._data.DataError: a row cannot be used (names the file and row).
    """
    if reporter is None:
        from .agent import Reporter

        reporter = Reporter(workdir)
    doc = json.loads((workdir / BUNDLE_DIR / "spec.json").read_text())
    spec = doc["spec"]
    model_path = _model_path(workdir, spec)  # before the heavy imports: fail in a second
    upload = os.environ.get(ENV_ARTIFACTS) or spec.get("artifacts")
    reporter.update(phase="loading")
    reporter.event(
        "loading", model=spec["model"], method=spec["method"], bits=spec["quant"]["bits"]
    )
    _quiet()
    import torch
    from transformers import PrinterCallback

    tokenizer, added = load_tokenizer(spec, model_path)
    train_ds, eval_ds, stats = _datasets(workdir, doc, tokenizer)
    reporter.event("data", **stats)
    seq_len = min(spec["train"]["max_seq_len"], max(len(ids) for ids in train_ds["input_ids"]))
    settings = _settings(spec, model_path, seq_len, len(train_ds))
    reporter.event("settings", **settings)
    if settings.get("fits") is False:
        reporter.event(
            "warning", message="the memory model says even the smallest setting may not fit"
        )
    fast = torch.cuda.is_available()
    model, tokenizer = load_model(spec, model_path, tokenizer, added, fast=fast)
    dtype = compute_dtype(spec["quant"]["compute_dtype"])
    if fast:
        # Our CUDA speed path (remote/fastpath.py): its own recompute policy replaces HF's.
        report = _fastpath(model, spec, settings, seq_len)
        settings = {**settings, "gradient_checkpointing": False}
        reporter.event(
            "fastpath",
            **{k: v for k, v in report.items() if k != "plan"},
            plan=report.get("plan", {}),
        )

    trainer = _trainer_class()(
        model=model,
        args=_sft_config(spec, workdir, settings, dtype),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[_progress_callback(reporter, upload)],
    )
    trainer.remove_callback(PrinterCallback)  # our events already say it, once
    if dtype == torch.float32:
        # TRL keeps QLoRA adapters in bf16; computing in fp32 (CPU), keep them in fp32 too.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    resume = _resume_point(workdir, upload, reporter)
    tokens_before = 0
    if resume is not None:
        reporter.event("resuming", checkpoint=resume.name)
        tokens_before = _tokens_at(resume)  # read now: checkpoint rotation may delete it
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    stopped = reporter.stop_reason
    reporter.update(phase="saving")
    model.save_pretrained(workdir / ADAPTER_DIR)
    tokenizer.save_pretrained(workdir / ADAPTER_DIR)
    metrics = _metrics(spec, trainer, output, stats, settings, resume, stopped, tokens_before)
    if eval_ds is not None and stopped is None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    manifest = build_manifest(workdir, [ADAPTER_DIR, METRICS_FILE])
    write_atomic(workdir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if upload:
        for name in (ADAPTER_DIR, METRICS_FILE, MANIFEST_FILE):
            artifacts.upload_tree(upload, workdir / name, f"final/{name}")
    phase = "stopped" if stopped else "done"
    reporter.update(phase=phase, stop_reason=stopped, step=trainer.state.global_step, eta_s=0.0)
    reporter.event(phase, steps=trainer.state.global_step, final_loss=metrics["final_loss"])


def _metrics(
    spec: dict[str, Any],
    trainer: Any,
    output: Any,
    stats: dict[str, int],
    settings: dict[str, Any],
    resume: Path | None,
    stopped: str | None,
    tokens_before: int,
) -> dict[str, Any]:
    import torch

    state = trainer.state
    history = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    losses = [loss for _, loss in history]
    runtime = output.metrics.get("train_runtime", 0.0)
    session_tokens = state.num_input_tokens_seen - tokens_before
    return {
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "loss_steps": [step for step, _ in history],
        "train_tokens": state.num_input_tokens_seen,
        "train_runtime_s": runtime,
        "tokens_per_s": session_tokens / runtime if runtime else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
        "stop_reason": stopped,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_vram_gb": torch.cuda.max_memory_allocated() / _GIB
        if torch.cuda.is_available()
        else None,
        "method": spec["method"],
        "quantized_bits": spec["quant"]["bits"] if _quantized(spec) else None,
        "micro_batch_size": settings["micro_batch_size"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "data": stats,
    }


def _tokens_at(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))
