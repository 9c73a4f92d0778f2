"""The job's rows, tokenised with their loss masks, and how they are cut into micro-batches and
fed to the model (packed or not, padding-free where the model allows)."""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path
from typing import Any

from .._data import encode_rows, read_jsonl
from ..batching import BatchPlan, epoch_batches, plan_batches
from ..collate import collate
from ..protocol import BUNDLE_DIR, BundleSpec, JobSpecData
from . import sources

__all__ = ["Rows", "batch_plan", "encode", "layout", "loader", "read_source"]

Rows = list[dict[str, list[int]]]


def encode(workdir: Path, bundle: BundleSpec, tokenizer: Any) -> tuple[Rows, Rows, dict[str, Any]]:
    """Encode train (and eval) rows; hold out ``eval_fraction`` when there is no eval file.
    A list of sources is read and mixed by :mod:`.sources`.

    Raises:
        loraburst.remote._data.DataError: a row cannot be used (names the file and row).
    """
    spec, train = bundle.spec, bundle.spec.train

    def one(source: str | list[dict[str, Any]], fmt: str) -> tuple[Rows, dict[str, Any]]:
        if isinstance(source, list):
            return sources.encode_sources(workdir, source, spec, tokenizer)
        rows, fmt = read_source(workdir, source, fmt)
        return encode_rows(
            rows, fmt, tokenizer, max_seq_len=train.max_seq_len, loss_on=train.loss_on,
            source=source, system_prompt=spec.system_prompt,
        )  # fmt: skip

    rows, stats = one(spec.dataset, bundle.data_format)
    sources.check_truncation(spec.data_checks, stats, "dataset")
    stats["chat_template"] = sources.template_used(spec, tokenizer)
    eval_rows: Rows = []
    if spec.eval_dataset:
        eval_rows, _ = one(spec.eval_dataset, bundle.data_format)
    elif train.eval_fraction > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(train.seed).shuffle(order)
        n_eval = max(1, round(train.eval_fraction * len(rows)))
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    stats["eval_rows"] = len(eval_rows)
    return rows, eval_rows, stats


def read_source(workdir: Path, source: str, fmt: str) -> tuple[Any, str]:
    """A dataset's rows: the bundle's normalised JSONL, or a hub dataset (format ``"hub"``)."""
    path = workdir / BUNDLE_DIR / source
    if fmt == "hub" or not path.is_file():
        from datasets import load_dataset

        return load_dataset(source, split="train"), "hub"
    return read_jsonl(path), fmt


def layout(config: Any) -> tuple[str, str]:
    """``("flat", "")`` when the model can train padding-free, else ``("padded", why not)``."""
    from ..attention import supports

    ok, why = supports(config)
    return ("flat", "") if ok else ("padded", why)


def batch_plan(
    spec: JobSpecData, lengths: list[int], micro_batch: int, packing: bool, layout: str
) -> BatchPlan:
    """The job's micro-batches (every epoch scanned for the largest one)."""
    train = spec.train
    epochs = max(1, math.ceil(train.epochs)) if not train.max_steps else 1
    return plan_batches(
        lengths, max_seq_len=train.max_seq_len, micro_batch=micro_batch, packing=packing,
        seed=train.seed, epochs=epochs, padded=layout == "padded",
    )  # fmt: skip


class _Units:
    """A torch-style dataset whose item ``i`` is packing unit ``i``: its encoded rows."""

    def __init__(self, rows: Rows, units: list[list[int]]) -> None:
        self.rows, self.units = rows, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> Rows:
        return [self.rows[j] for j in self.units[i]]


class _EpochBatches:
    """Batch sampler: the plan's micro-batches for the current epoch (:mod:`..batching`).

    Trainer calls ``set_epoch``; each epoch's order depends only on the seed and the epoch, so
    a resumed run skips exactly the batches it had trained on.
    """

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


def loader(
    rows: Rows,
    plan: BatchPlan,
    *,
    seed: int,
    layout: str,
    pad_id: int,
    shuffle: bool = True,
    collate_fn: Any = None,
) -> Any:
    """A ``DataLoader`` over the plan's micro-batches (``shuffle=False``: in order, for eval);
    ``collate_fn`` replaces :func:`..collate.collate` (preference pairs add their indices)."""
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
        collate_fn=collate_fn or functools.partial(collate, layout=layout, pad_id=pad_id),
        pin_memory=torch.cuda.is_available(),
    )
