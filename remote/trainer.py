"""The SFT recipe: set up, train with transformers' ``Trainer`` over our own batches, save::

    spec        bundle/spec.json (the client's JobSpec)
    tokenizer   its chat template, else ChatML (remote/_data.py)
    data        input_ids + labels, -100 off the loss (assistant/completion tokens only)
    batches     packed or not ("auto": pack short rows), one plan for every epoch
                (remote/batching.py), collated padding-free where the model allows
                (remote/collate.py, remote/attention.py)
    model       NF4/FP4/int8 base (bitsandbytes) or bf16/fp32, wrapped in LoRA/DoRA (peft)
    settings    micro-batch, recompute and dequant cache planned on the loaded model (CUDA)
    train       Trainer, checkpoint every save_every_steps, resume from the latest one;
                progress reported from a thread, never blocking the GPU
    save        adapter/, metrics.json, then manifest.json (its presence means complete)

Torch and friends are imported inside the functions: ``loraburst.remote`` itself is stdlib-only.
:func:`load_model` and :func:`run` are the API the benchmarks reuse.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import artifacts
from ._data import encode_rows, ensure_chat_template, read_jsonl
from .attention import register as register_attention
from .backends import resolve_backend
from .batching import BatchPlan, choose_packing, epoch_batches, plan_batches
from .collate import EXTRA_KEYS, collate
from .protocol import (
    ADAPTER_DIR,
    BUNDLE_DIR,
    CHECKPOINT_DIR,
    ENV_ARTIFACTS,
    ENV_MODEL_DIR,
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


def _encode(
    workdir: Path, doc: dict[str, Any], tokenizer: Any
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], dict[str, int]]:
    """Encode train (and eval) rows; hold out ``eval_fraction`` when there is no eval file."""
    spec, train = doc["spec"], doc["spec"]["train"]

    def encode(source: str, fmt: str) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
        path = workdir / BUNDLE_DIR / source
        if fmt == "hub" or not path.is_file():
            from datasets import load_dataset

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
    return rows, eval_rows, stats


def _layout(model_path: str, spec: dict[str, Any]) -> tuple[str, str]:
    """``("flat", "")`` when the model can train padding-free, else ``("padded", why not)``."""
    from transformers import AutoConfig

    from .attention import supports

    config = AutoConfig.from_pretrained(model_path, revision=_revision(spec, model_path))
    ok, why = supports(config)
    return ("flat", "") if ok else ("padded", why)


def _batch_plan(
    spec: dict[str, Any], lengths: list[int], micro_batch: int, packing: bool, layout: str
) -> BatchPlan:
    train = spec["train"]
    epochs = max(1, math.ceil(train["epochs"])) if not train["max_steps"] else 1
    return plan_batches(
        lengths,
        max_seq_len=train["max_seq_len"],
        micro_batch=micro_batch,
        packing=packing,
        seed=train["seed"],
        epochs=epochs,
        padded=layout == "padded",
    )


def _plan_tokens(plan: BatchPlan, layout: str) -> int:
    """Tokens in the largest micro-batch as the model will see it (padding included)."""
    return plan.max_tokens if layout == "flat" else plan.max_padded_tokens


_POLICY = {"auto": "auto", True: "all", False: "none", "offload": "offload"}


def _budget_gib(spec: dict[str, Any]) -> float:
    """GPU memory the plan may use: the card's, or ``train.max_gpu_memory_gib`` when lower."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / _GIB
    cap = spec["train"].get("max_gpu_memory_gib")
    return min(total, float(cap)) if cap else total


def _cap_memory(spec: dict[str, Any]) -> None:
    """Hold the process to ``train.max_gpu_memory_gib`` (before anything is allocated)."""
    import torch

    cap = spec["train"].get("max_gpu_memory_gib")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / _GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) / total))


def _settings(
    spec: dict[str, Any], model: Any, lengths: list[int], packing: bool, layout: str
) -> tuple[dict[str, Any], BatchPlan]:
    """Micro-batch and the recompute/dequant-cache plan: the spec's, or chosen for this card.

    On CUDA the fast path's patches are applied first, then one decoder layer's memory is
    measured (:func:`.fastpath.probe_memory`) and every candidate micro-batch is planned against
    the card's memory. With ``micro_batch_size: auto`` the one with the best predicted
    throughput wins: recomputing a layer costs about a third of its time, so fewer recomputed
    layers beat a larger micro-batch once steps hold a few thousand tokens.
    """
    import torch

    train = spec["train"]
    mbs = train["micro_batch_size"]
    if not torch.cuda.is_available():
        mb = min(4, max(len(lengths), 1)) if mbs == "auto" else int(mbs)
        plan = _batch_plan(spec, lengths, mb, packing, layout)
        return {
            "micro_batch_size": mb,
            "gradient_checkpointing": train["gradient_checkpointing"] not in ("auto", False),
            "packing": packing,
            "layout": layout,
        }, plan
    from . import fastpath

    candidates: tuple[int, ...]
    if mbs == "auto":
        # Packed: sequences per micro-batch; unpacked: rows (a few hundred tokens each).
        candidates = (1, 2, 4, 8) if packing else (1, 2, 4, 8, 16, 32)
    else:
        candidates = (int(mbs),)
    fastpath.optimize(model, seq_len=train["max_seq_len"], micro_batch_size=1,
                      gradient_checkpointing=0, dequant_cache=0)  # fmt: skip
    probe = fastpath.probe_memory(model, layout=layout)
    budget = _budget_gib(spec)
    policy = _POLICY[train["gradient_checkpointing"]]
    layers = max(1, int(getattr(_base_config(model), "num_hidden_layers", 1)))
    best: tuple[tuple[bool, float], dict[str, Any], BatchPlan] | None = None
    for mb in candidates:
        plan = _batch_plan(spec, lengths, mb, packing, layout)
        if mb > candidates[0] and plan.batches_per_epoch < 2:
            break  # a bigger micro-batch than the data fills
        tokens = _plan_tokens(plan, layout)
        seq = train["max_seq_len"]
        option = fastpath.plan(
            model, seq_len=seq, micro_batch_size=max(1, -(-tokens // seq)), tokens=tokens,
            budget_gib=budget, layout=layout, policy=policy, probe=probe,
        )  # fmt: skip
        # Throughput model: a recomputed layer costs ~1/3 of its step time; ~800 tokens' worth
        # of fixed work per step (optimizer, launches) favours bigger steps until then.
        cost = plan.mean_tokens * (1 + option["recompute_layers"] / (3 * layers)) + 800
        score = (bool(option["fits"]), plan.mean_tokens / cost if option["fits"] else -tokens)
        settings = {
            "micro_batch_size": mb,
            "gradient_checkpointing": option["gradient_checkpointing"],
            "packing": packing,
            "layout": layout,
            "tokens_per_micro_batch": tokens,
            "memory_budget_gib": round(budget, 2),
            "plan": option,
        }
        if best is None or score > best[0]:
            best = (score, settings, plan)
    assert best is not None
    return best[1], best[2]


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _fastpath(model: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Apply the chosen memory plan to the patched model; the fast path's report."""
    from . import fastpath

    planned: dict[str, Any] = settings.get("plan", {})
    report = fastpath.apply_plan(model, planned)
    return {**dict(report), "plan": {k: v for k, v in planned.items() if k != "probe"},
            "probe": planned.get("probe")}  # fmt: skip


def _training_args(
    spec: dict[str, Any], workdir: Path, settings: dict[str, Any], dtype: Any
) -> Any:
    import torch
    from transformers import TrainingArguments

    train = spec["train"]
    save = train["save_every_steps"]
    cuda = torch.cuda.is_available()
    return TrainingArguments(
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
        fp16=dtype == torch.float16 and cuda,
        use_cpu=not cuda,
        # Progress is reported by our callback from host-side counts and a loss copied back
        # asynchronously; Trainer's own logging would block on the GPU once per step.
        logging_strategy="no",
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="no",
        save_strategy="steps" if save else "no",
        save_steps=save or 500,
        save_total_limit=2,
        eval_strategy="no",
        prediction_loss_only=True,
        label_names=["labels"],
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class _Units:
    """A torch-style dataset whose item ``i`` is packing unit ``i``: its encoded rows."""

    def __init__(self, rows: list[dict[str, list[int]]], units: list[list[int]]) -> None:
        self.rows, self.units = rows, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> list[dict[str, list[int]]]:
        return [self.rows[j] for j in self.units[i]]


class _EpochBatches:
    """Batch sampler: the plan's micro-batches for the current epoch (see :mod:`.batching`)."""

    def __init__(self, plan: BatchPlan, lengths: list[int], seed: int, padded: bool) -> None:
        self.plan, self.lengths, self.seed, self.padded = plan, lengths, seed, padded
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.batches_per_epoch

    def __iter__(self) -> Any:
        return iter(
            epoch_batches(
                self.plan, self.lengths, seed=self.seed, epoch=self.epoch, padded=self.padded
            )
        )


def _loader(
    rows: list[dict[str, list[int]]],
    plan: BatchPlan,
    *,
    seed: int,
    layout: str,
    pad_id: int,
    shuffle: bool = True,
) -> Any:
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    sampler: Any = _EpochBatches(plan, lengths, seed, layout == "padded")
    if not shuffle:
        n = plan.micro_batch
        sampler = [
            list(range(k, min(k + n, len(plan.units)))) for k in range(0, len(plan.units), n)
        ]
    return torch.utils.data.DataLoader(
        _Units(rows, plan.units),  # type: ignore[arg-type]
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, layout=layout, pad_id=pad_id),
        pin_memory=torch.cuda.is_available(),
    )


def _trainer_class() -> Any:
    """transformers' ``Trainer`` over our own batches, loss bookkeeping without host syncs."""
    from transformers import Trainer

    class LoraburstTrainer(Trainer):
        """Trains on :mod:`.batching`'s micro-batches; counts tokens on the host."""

        def __init__(self, *args: Any, loaders: tuple[Any, Any], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._loaders = loaders
            self.tokens_seen = 0
            self.step_loss: Any = None

        def get_train_dataloader(self) -> Any:
            return self.accelerator.prepare(self._loaders[0])

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            return self.accelerator.prepare(self._loaders[1])

        def floating_point_ops(self, inputs: Any) -> int:
            return 0  # not reported; the stock count walks every parameter each micro-batch

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self.tokens_seen += int(inputs.pop("num_tokens", 0))
            inputs.pop("num_loss_tokens", None)
            loss = super().training_step(model, inputs, num_items_in_batch)
            detached = loss.detach()
            self.step_loss = detached if self.step_loss is None else self.step_loss + detached
            return loss

        def prediction_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            for key in EXTRA_KEYS:
                inputs.pop(key, None)
            return super().prediction_step(model, inputs, *args, **kwargs)

    return LoraburstTrainer


class _ProgressWriter:
    """Reports each step from a thread, so the training loop never waits on the GPU or disk.

    The step's loss is copied to the host asynchronously behind a CUDA event; the thread waits
    for the event, then writes ``state.json`` and a ``step`` event. The time the event completed
    is when the GPU finished the step, which is what tokens/s is measured against.
    """

    def __init__(self, reporter: Reporter, trainer: Any) -> None:
        import queue
        import threading

        self.reporter, self.trainer = reporter, trainer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.thread.start()
        self.t0: float | None = None
        self.tokens0 = 0
        self.step0 = 0

    def start(self, t0: float, tokens: int, step: int) -> None:
        """Start the clock: tokens/s counts from here (warm-up included, as users wait it)."""
        self.t0, self.tokens0, self.step0 = t0, tokens, step

    def submit(self, state: Any, loss: Any, tokens: int) -> None:
        import torch

        event = None
        if loss is not None and loss.is_cuda:
            loss = loss.to("cpu", non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        self.queue.put((state.global_step, state.max_steps, state.epoch, loss, event, tokens))

    def drain(self) -> None:
        """Wait until every submitted step is reported (before a checkpoint or the end)."""
        self.queue.join()

    def close(self) -> None:
        self.drain()
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._report(*item)
            except Exception as exc:  # reporting must never kill training; say so in the log
                print(f"[agent] progress report failed: {exc!r}", flush=True)
            finally:
                self.queue.task_done()

    def _report(
        self, step: int, total: int, epoch: Any, loss: Any, event: Any, tokens: int
    ) -> None:
        if event is not None:
            event.synchronize()
        now = time.time()
        value = float(loss) if loss is not None else None
        if self.t0 is None:
            self.start(now, tokens, step)
        assert self.t0 is not None
        elapsed = now - self.t0
        done = step - self.step0
        tps = (tokens - self.tokens0) / elapsed if elapsed > 0 and done > 0 else None
        eta = (total - step) * elapsed / done if done > 0 else None
        entry = {"step": step, "loss": value, "tokens": tokens, "t": round(now, 4)}
        self.history.append(entry)
        self.trainer.state.log_history.append({"step": step, "loss": value})
        self.reporter.update(
            step=step,
            loss=value,
            tokens_per_s=round(tps, 1) if tps else None,
            eta_s=round(eta, 1) if eta is not None else None,
            epoch=epoch,
        )
        self.reporter.event(
            "step",
            step=step,
            total=total,
            loss=round(value, 4) if value is not None else None,
            tokens=tokens,
            t=round(now, 4),
            tokens_per_s=round(tps, 1) if tps else None,
        )


def _progress_callback(reporter: Reporter, upload: str | None, trainer: Any) -> Any:
    """A TrainerCallback: step reports (via :class:`_ProgressWriter`), S3 uploads, stops."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.writer = _ProgressWriter(reporter, trainer)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trainer.tokens_seen = state.num_input_tokens_seen
            self.writer.start(time.time(), trainer.tokens_seen, state.global_step)
            reporter.update(phase="training", step=state.global_step, total_steps=state.max_steps)
            reporter.event("training", step=state.global_step, total=state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            state.num_input_tokens_seen = trainer.tokens_seen
            self.writer.submit(state, trainer.step_loss, trainer.tokens_seen)
            trainer.step_loss = None
            reason = reporter.stop_reason
            if reason is not None and not control.should_training_stop:
                reporter.event("stopping", reason=reason, step=state.global_step)
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:
                self.writer.drain()  # the checkpoint's log_history must hold every step

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            reporter.event("checkpoint", step=state.global_step, path=str(path))
            if upload:
                files = artifacts.upload_checkpoint(upload, path)
                reporter.event("checkpoint_uploaded", step=state.global_step, files=files)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.writer.close()

    return Progress()


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
    # The Rust tokenizer encodes each batch of rows on every core (nothing forks after it).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _model_path(workdir: Path, spec: dict[str, Any], doc: dict[str, Any] | None = None) -> str:
    """The model folder (checked), else the hub id as given.

    ``"model"`` is the bundled folder, or, for a model uploaded once per instance and found by
    its content hash, the folder the client named in ``LORABURST_MODEL_DIR``; an absolute path
    (the ``local`` provider uses a local folder in place) stays itself.
    """
    model = spec["model"]
    if model != "model" and not Path(model).is_absolute():
        return str(model)  # a hub id
    path = workdir / BUNDLE_DIR / model
    shared = os.environ.get(ENV_MODEL_DIR)
    if model == "model" and not path.exists() and shared:
        path = Path(shared)
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
    # -- train.backend: MLX has its own recipe (remote/mlx_trainer.py); "auto" picks it on
    # Apple Silicon. Everything below is the torch recipe.
    if resolve_backend(spec["train"].get("backend")) == "mlx":
        from .mlx_trainer import run as run_mlx

        return run_mlx(workdir, reporter)
    model_path = _model_path(workdir, spec, doc)  # before the heavy imports: fail in a second
    upload = os.environ.get(ENV_ARTIFACTS) or spec.get("artifacts")
    reporter.update(phase="loading")
    reporter.event(
        "loading", model=spec["model"], method=spec["method"], bits=spec["quant"]["bits"]
    )
    _quiet()
    import torch

    tokenizer, added = load_tokenizer(spec, model_path)
    rows, eval_rows, stats = _encode(workdir, doc, tokenizer)
    reporter.event("data", **stats)
    lengths = [len(r["input_ids"]) for r in rows]
    _cap_memory(spec)
    packing = choose_packing(spec["train"]["packing"], lengths, spec["train"]["max_seq_len"])
    layout, why_padded = _layout(model_path, spec)
    model, tokenizer = load_model(
        spec, model_path, tokenizer, added, fast=torch.cuda.is_available()
    )
    if layout == "flat":
        _base_config(model)._attn_implementation = register_attention()
    settings, plan = _settings(spec, model, lengths, packing, layout)
    reporter.event(
        "settings",
        **{k: v for k, v in settings.items() if k != "plan"},
        **(
            {"plan": {k: v for k, v in settings["plan"].items() if k != "probe"}}
            if "plan" in settings
            else {}
        ),
        batches_per_epoch=plan.batches_per_epoch,
        mean_tokens_per_micro_batch=round(plan.mean_tokens, 1),
        **({"padded_because": why_padded} if why_padded else {}),
    )
    if settings.get("plan", {}).get("fits") is False:
        reporter.event(
            "warning", message="the memory plan says even the smallest setting may not fit"
        )
    dtype = compute_dtype(spec["quant"]["compute_dtype"])
    if torch.cuda.is_available():
        # Our CUDA speed path (remote/fastpath.py): its own recompute policy replaces HF's.
        report = _fastpath(model, settings)
        settings = {**settings, "gradient_checkpointing": bool(report.get("checkpointed_layers"))}
        # The reported peak is training's, not the memory probe's (as the anchors report it).
        torch.cuda.reset_peak_memory_stats()
        reporter.event(
            "fastpath",
            **{k: v for k, v in report.items() if k != "plan"},
            plan=report.get("plan", {}),
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seed = spec["train"]["seed"]
    train_loader = _loader(rows, plan, seed=seed, layout=layout, pad_id=pad_id)
    eval_loader = None
    if eval_rows:
        eval_plan = _batch_plan(
            spec, [len(r["input_ids"]) for r in eval_rows], settings["micro_batch_size"],
            packing, layout,
        )  # fmt: skip
        eval_loader = _loader(
            eval_rows, eval_plan, seed=seed, layout=layout, pad_id=pad_id, shuffle=False
        )
    args = _training_args(spec, workdir, {**settings, "gradient_checkpointing": False}, dtype)
    trainer = _trainer_class()(
        model=model,
        args=args,
        processing_class=tokenizer,
        loaders=(train_loader, eval_loader),
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our events already say it, once
    progress = _progress_callback(reporter, upload, trainer)
    trainer.add_callback(progress)
    if dtype == torch.float32:
        # Keep LoRA adapters in fp32 when computing in fp32 (CPU).
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    resume = _resume_point(workdir, upload, reporter)
    tokens_before = 0
    if resume is not None:
        reporter.event("resuming", checkpoint=resume.name)
        tokens_before = _tokens_at(resume)  # read now: checkpoint rotation may delete it
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        progress.writer.close()

    stopped = reporter.stop_reason
    reporter.update(phase="saving")
    model.save_pretrained(workdir / ADAPTER_DIR)
    tokenizer.save_pretrained(workdir / ADAPTER_DIR)
    metrics = _metrics(spec, trainer, output, stats, settings, resume, stopped, tokens_before)
    if eval_loader is not None and stopped is None:
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
    by_step = {h["step"]: h["loss"] for h in state.log_history if h.get("loss") is not None}
    history = sorted(by_step.items())
    losses = [loss for _, loss in history]
    runtime = output.metrics.get("train_runtime", 0.0)
    session_tokens = trainer.tokens_seen - tokens_before
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
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_vram_gb": torch.cuda.max_memory_allocated() / _GIB
        if torch.cuda.is_available()
        else None,
        "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / _GIB
        if torch.cuda.is_available()
        else None,
        "method": spec["method"],
        "quantized_bits": spec["quant"]["bits"] if _quantized(spec) else None,
        "micro_batch_size": settings["micro_batch_size"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "packing": settings["packing"],
        "layout": settings["layout"],
        "data": stats,
    }


def _tokens_at(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))
