"""transformers' ``Trainer`` as the recipes use it: over our own batches, with the step's loss
and token count kept on the device and the host respectively, so nothing waits on the GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..collate import EXTRA_KEYS
from ..protocol import CHECKPOINT_DIR, JobSpecData

__all__ = ["trainer_class", "training_args"]


def training_args(
    spec: JobSpecData,
    workdir: Path,
    micro_batch: int,
    dtype: Any,
    *,
    grad_accum: int | None = None,
    distributed: dict[str, Any] | None = None,
) -> Any:
    """``TrainingArguments`` for ``spec``: checkpoints under ``checkpoints/``, no logging of
    Trainer's own (progress is ours), recompute left to the fast path.

    On more than one GPU, ``grad_accum`` is each rank's share of the job's
    (:func:`..sharding.rank_grad_accum`) and ``distributed`` the strategy's own keywords
    (:func:`.distributed.training_kwargs`)."""
    import torch
    from transformers import TrainingArguments

    train = spec.train
    save = train.save_every_steps
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        **(distributed or {}),
        output_dir=str(workdir / CHECKPOINT_DIR),
        max_steps=train.max_steps or -1,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum or train.grad_accum,
        gradient_checkpointing=False,  # the fast path's recompute policy, or none on CPU
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
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


def trainer_class() -> Any:
    """transformers' ``Trainer`` over our own batches, loss bookkeeping without host syncs."""
    from transformers import Trainer

    class LoraburstTrainer(Trainer):
        """Trains on :mod:`..batching`'s micro-batches; counts tokens on the host."""

        def __init__(self, *args: Any, loaders: tuple[Any, Any], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._loaders = loaders
            self.tokens_seen = 0
            self.step_tokens = 0  # this rank's, this optimizer step (progress sums the ranks)
            self.step_loss: Any = None

        def get_train_dataloader(self) -> Any:
            return self.accelerator.prepare(self._loaders[0])

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            return self.accelerator.prepare(self._loaders[1])

        def floating_point_ops(self, inputs: Any) -> int:
            return 0  # not reported; the stock count walks every parameter each micro-batch

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self.step_tokens += int(inputs.pop("num_tokens", 0))
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
