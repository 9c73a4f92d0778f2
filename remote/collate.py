"""Micro-batches as tensors: one flat padding-free row, or padded rows, both packing-aware.

A micro-batch arrives as a list of *units* (a packed sequence, or one row when unpacked), each a
list of encoded rows ``{"input_ids", "labels"}`` (:mod:`._data`). Inside every unit the rows keep
their own positions (``position_ids`` restart at 0 for each row) and the first label of each row
is ignored, so no row learns to predict the next row's first token from its own end: the loss of
a row is the same packed or alone.

- ``flat`` (padding-free): every row of every unit concatenated into one ``[1, tokens]`` row,
  with the rows' boundaries as ``cu_seq_lens_q/k`` and ``max_length_q/k`` for
  :mod:`.attention`. The length is rounded up to a multiple of ``pad_multiple`` with one extra
  padding segment (ignored by the loss, attending only to itself), which bounds the number of
  distinct shapes the compiled kernels see.
- ``padded``: one batch row per unit, right-padded to the longest unit (rounded up the same
  way); no attention mask, so transformers derives the packed rows' block-diagonal mask from
  ``position_ids`` (padding comes after every real token, so causal attention never sees it).
  The batch says ``use_cache=False``: with a cache, transformers skips that mask.

Each batch also carries ``num_tokens`` and ``num_loss_tokens`` as Python ints (counted here, on
the host, so progress reporting never waits on the GPU); the trainer pops them before the forward.

Standard library at import; torch inside :func:`collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["EXTRA_KEYS", "collate"]

IGNORE_INDEX = -100
EXTRA_KEYS = ("num_tokens", "num_loss_tokens")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def _unit(
    rows: Sequence[dict[str, list[int]]],
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Concatenate a unit's rows: ids, labels (first of each row ignored), positions, lengths."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        if n == 0:
            continue
        ids += row["input_ids"]
        labels += [IGNORE_INDEX, *row["labels"][1:]]
        positions += range(n)
        lengths.append(n)
    return ids, labels, positions, lengths


def collate(
    units: Sequence[Sequence[dict[str, list[int]]]],
    *,
    layout: str,
    pad_id: int,
    pad_multiple: int = 64,
) -> dict[str, Any]:
    """Build one micro-batch.

    Args:
        units: the micro-batch's packed sequences (or single rows), each a list of encoded rows.
        layout: ``"flat"`` (padding-free, for :mod:`.attention`) or ``"padded"``.
        pad_id: the token id used for padding.
        pad_multiple: round the (flat or per-row) length up to a multiple of this.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` (long tensors ``[rows, length]``), plus
        ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (ints) in the flat layout, and the
        host-side counts ``num_tokens`` and ``num_loss_tokens``.

    Raises:
        ValueError: an unknown layout, or a micro-batch with no tokens.
    """
    import torch

    built = [_unit(rows) for rows in units]
    real = sum(len(ids) for ids, *_ in built)
    if real == 0:
        raise ValueError("a micro-batch with no tokens")
    loss_tokens = sum(sum(1 for t in labels if t != IGNORE_INDEX) for _, labels, _, _ in built)
    counts = {"num_tokens": real, "num_loss_tokens": loss_tokens}
    if layout == "flat":
        ids, labels, positions, lengths = [], [], [], []
        for u_ids, u_labels, u_pos, u_len in built:
            ids += u_ids
            labels += u_labels
            positions += u_pos
            lengths += u_len
        pad = _round_up(real, pad_multiple) - real
        if pad:
            ids += [pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += range(pad)
            lengths.append(pad)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        longest = max(lengths)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": longest,
            "max_length_k": longest,
            **counts,
        }
    if layout != "padded":
        raise ValueError(f"layout={layout!r}: use 'flat' or 'padded'")
    width = _round_up(max(len(ids) for ids, *_ in built), pad_multiple)
    batch_ids, batch_labels, batch_pos = [], [], []
    for u_ids, u_labels, u_pos, _ in built:
        pad = width - len(u_ids)
        batch_ids.append(u_ids + [pad_id] * pad)
        batch_labels.append(u_labels + [IGNORE_INDEX] * pad)
        # Padding continues the last row's positions: it sits after every real token, so
        # causal attention never lets a real token see it, and it adds no packed boundary.
        last = (u_pos[-1] + 1) if u_pos else 0
        batch_pos.append(u_pos + list(range(last, last + pad)))
    return {
        "input_ids": torch.tensor(batch_ids, dtype=torch.long),
        "labels": torch.tensor(batch_labels, dtype=torch.long),
        "position_ids": torch.tensor(batch_pos, dtype=torch.long),
        # With a KV cache transformers skips the packed-rows mask: rows would see each other.
        "use_cache": False,
        **counts,
    }
