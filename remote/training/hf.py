"""transformers' ``Trainer`` as the recipes use it: over our own batches, with the step's loss
and token count kept on the device and the host respectively, so nothing waits on the GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..collate import EXTRA_KEYS
from ..fastpath.lora import forget_stacks
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
            self._first_step_seen = False  # and the first step's set-up done

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                _fsdp_on_cpu(self)

        def get_train_dataloader(self) -> Any:
            return self.accelerator.prepare(self._loaders[0])

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            return self.accelerator.prepare(self._loaders[1])

        def floating_point_ops(self, inputs: Any) -> int:
            return 0  # not reported; the stock count walks every parameter each micro-batch

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            if not self._first_step_seen:
                if self.is_fsdp_enabled:
                    _report_shards(model)
                # Set-up may have written the adapters in place since the memory probe (DDP's
                # broadcast from rank 0, a checkpoint resumed): the fast path's stacked copies
                # of them are rebuilt at the first step.
                forget_stacks()
                self._first_step_seen = True
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


def _report_shards(model: Any) -> None:
    """Check that FSDP sharded every parameter of the wrapped ``model`` and say, on each rank,
    what this rank holds (in the ranks' log, agent.log)."""
    import torch.distributed as dist

    from .distributed import check_sharded

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    c = check_sharded(model, world)
    print(
        f"[rank {rank}/{world}] FSDP shards {c['sharded']} of {c['params']} parameters "
        f"({c['nf4_sharded']} of {c['nf4']} 4-bit weights): this rank holds "
        f"{c['local_elements']} of {c['elements']} elements",
        flush=True,
    )


def _fsdp_on_cpu(trainer: Any) -> None:
    """Turn accelerate's FSDP on for a CPU process group (gloo), where it asked for it.

    accelerate (1.15, ``AcceleratorState.__init__``) sets ``DistributedType.FSDP`` only when the
    process group is a GPU's (``MULTI_GPU`` and kin); on CPU it keeps ``MULTI_CPU`` and drops
    the plugin, and Trainer would then run DDP under an FSDP request. torch's FSDP2
    (``fully_shard``) itself runs on CPU over gloo (all-gather, reduce-scatter), so the state is
    set as accelerate sets it on a GPU: the plugin kept, the distributed type FSDP for the
    accelerator and the process state. What then runs is accelerate's own FSDP2 preparation
    (``fsdp2_prepare_model``), state-dict saving and loading: the same code as on GPUs.
    :func:`.distributed.check_engine` and the trainer's shard check confirm it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # a GPU group accelerate declined FSDP for: check_engine says so
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
