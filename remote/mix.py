"""How a mix of sources is drawn: the rows each source gives, chosen the same way on the client
(for the estimate and the report) and on the instance (for training). Standard library only.

Without weights a mix is every source's rows, one after the other. With weights (every source
has one) it takes rows in those proportions without repeating any: the source that runs out
first, relative to its share, sets the mix's size, as ``datasets.interleave_datasets`` does with
``stopping_strategy="first_exhausted"``. Which rows of a larger source are kept is a seeded
random choice, so the same job always trains on the same rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["mix_counts", "pick"]


def mix_counts(sizes: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Rows taken from each source.

    Raises:
        ValueError: some sources have a weight and others do not.
    """
    if all(w is None for w in weights):
        return list(sizes)
    if any(w is None for w in weights):
        missing = [str(i + 1) for i, w in enumerate(weights) if w is None]
        raise ValueError(
            f"source(s) {', '.join(missing)} of the mix have no weight; give every source a "
            "weight (shares of the mix), or none (every row of every source)"
        )
    total = math.fsum(w for w in weights if w is not None)
    shares = [(w or 0.0) / total for w in weights]
    size = min(n / s for n, s in zip(sizes, shares, strict=True))
    # The smallest source, relative to its share, gives all its rows; the others their share.
    return [min(n, math.floor(size * s + 1e-9)) for n, s in zip(sizes, shares, strict=True)]


def pick(size: int, count: int, seed: int, salt: int) -> list[int]:
    """``count`` of the indices ``0 .. size-1``, in order: all of them when ``count >= size``,
    else a choice seeded by the job's seed and the source's position."""
    if count >= size:
        return list(range(size))
    return sorted(random.Random(f"{seed}:{salt}").sample(range(size), count))
