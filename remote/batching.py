"""Which rows go into which micro-batch: packing, length grouping and the step plan.

One function, :func:`plan_batches`, decides the whole training order from the rows' token
counts alone, so the trainer and the client's estimate replay the same batches (the estimate
knows every row's length before anything is rented):

- **packed**: rows are packed best-fit-decreasing into sequences of ``max_seq_len`` tokens
  (a row never straddles two sequences); a micro-batch is ``micro_batch`` such sequences.
- **unpacked**: a micro-batch is ``micro_batch`` rows. With a padding-free layout (variable-length
  attention) the rows are simply shuffled; with a padded layout they are grouped by length
  (shuffled, sorted inside mega-batches of 64 micro-batches, which are shuffled again), so a
  micro-batch of long rows is not padded to its longest row at the cost of short ones.

Every epoch has its own order, drawn from ``seed`` and the epoch number only, so a resumed run
sees exactly the batches it would have seen.

Standard library only.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import statistics
from collections.abc import Sequence

__all__ = [
    "BatchPlan",
    "choose_packing",
    "epoch_batches",
    "pack_rows",
    "plan_batches",
]

# Rows this much shorter than max_seq_len on average waste most of a padded micro-batch, and
# make padding-free micro-batches too small to keep a GPU busy: pack them.
_PACK_BELOW = 0.5
_MEGA_BATCH = 64


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing packing of row indices into sequences of at most ``capacity`` tokens.

    Longest rows first, each into the fullest sequence it still fits in (a new one if none);
    rows longer than ``capacity`` get a sequence of their own (the trainer truncates them
    before this point, so this only happens to callers that did not).

    Returns:
        Sequences as lists of row indices, in the order they were opened; each list keeps its
        rows longest first.
    """
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (free space, bin) kept sorted: the best fit is the first entry with enough space.
    free: list[tuple[int, int]] = []
    for i in order:
        n = min(lengths[i], capacity)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, best = free.pop(k)
        else:
            space, best = capacity, len(bins)
            bins.append([])
        bins[best].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, best))
    return bins


def choose_packing(packing: bool | str, lengths: Sequence[int], max_seq_len: int) -> bool:
    """Resolve ``train.packing``: ``"auto"`` packs when rows average under half a sequence."""
    if isinstance(packing, bool):
        return packing
    if packing != "auto":
        raise ValueError(f"packing={packing!r}: use true, false or 'auto'")
    if len(lengths) < 2:
        return False
    return statistics.fmean(lengths) < _PACK_BELOW * max_seq_len


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one epoch is cut into micro-batches, and the sizes the memory plan needs.

    Attributes:
        packed: whether rows are packed into ``max_seq_len`` sequences.
        micro_batch: sequences (packed) or rows (unpacked) per micro-batch.
        units: the epoch's packing units: one list of row indices per packed sequence, or one
            row per unit when unpacked.
        batches_per_epoch: micro-batches in one epoch.
        max_tokens: the most real tokens any micro-batch of any epoch holds (padding-free).
        max_padded_tokens: the most tokens any micro-batch holds once padded to its longest
            sequence (the padded layout's size).
        mean_tokens: real tokens per micro-batch, on average.
    """

    packed: bool
    micro_batch: int
    units: list[list[int]]
    batches_per_epoch: int
    max_tokens: int
    max_padded_tokens: int
    mean_tokens: float


def _unit_lengths(units: list[list[int]], lengths: Sequence[int], cap: int) -> list[int]:
    return [min(sum(lengths[i] for i in unit), cap * len(unit)) for unit in units]


def epoch_batches(plan: BatchPlan, lengths: Sequence[int], *, seed: int, epoch: int,
                  padded: bool) -> list[list[int]]:  # fmt: skip
    """The micro-batches of one epoch, as lists of unit indices into ``plan.units``.

    Args:
        plan: from :func:`plan_batches`.
        lengths: token count of every row (as given to :func:`plan_batches`).
        seed: ``train.seed``.
        epoch: 0-based epoch; each epoch has its own order.
        padded: group unpacked rows by length (a padded layout); padding-free layouts shuffle.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(plan.units)))
    rng.shuffle(order)
    mb = plan.micro_batch
    if padded and not plan.packed:
        size = [sum(lengths[i] for i in unit) for unit in plan.units]
        mega = mb * _MEGA_BATCH
        grouped: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda u: -size[u])
            grouped += [chunk[k : k + mb] for k in range(0, len(chunk), mb)]
        rng.shuffle(grouped)
        return grouped
    return [order[k : k + mb] for k in range(0, len(order), mb)]


def plan_batches(
    lengths: Sequence[int],
    *,
    max_seq_len: int,
    micro_batch: int,
    packing: bool,
    seed: int,
    epochs: int = 1,
    padded: bool = False,
) -> BatchPlan:
    """Cut the rows into micro-batches and measure them.

    Args:
        lengths: token count of every (already truncated) training row.
        max_seq_len: sequence length (packing capacity).
        micro_batch: sequences (packed) or rows (unpacked) per micro-batch.
        packing: pack rows into ``max_seq_len`` sequences.
        seed: ``train.seed``; orders are drawn from it.
        epochs: how many epochs' orders to scan for the largest micro-batch.
        padded: whether micro-batches will be padded to their longest sequence (affects the
            unpacked order; see :func:`epoch_batches`).

    Raises:
        ValueError: no rows, or a size below 1.
    """
    if not lengths:
        raise ValueError("no rows to batch")
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch}: must be at least 1")
    units = pack_rows(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]
    unit_len = _unit_lengths(units, lengths, max_seq_len)
    plan = BatchPlan(packing, micro_batch, units, -(-len(units) // micro_batch), 0, 0, 0.0)
    max_tokens = max_padded = 0
    for epoch in range(max(1, epochs)):
        for batch in epoch_batches(plan, lengths, seed=seed, epoch=epoch, padded=padded):
            sizes = [unit_len[u] for u in batch]
            max_tokens = max(max_tokens, sum(sizes))
            max_padded = max(max_padded, max(sizes) * len(sizes))
    return dataclasses.replace(
        plan,
        max_tokens=max_tokens,
        max_padded_tokens=max_padded,
        mean_tokens=sum(unit_len) / plan.batches_per_epoch,
    )
