"""Money, in one place: what a provider bills for a span of time, and when a job must stop so
that its bill stays under a cap.

A provider bills whole increments (RunPod per second, Lambda per minute). Stopping is not free:
after the agent is told to stop it saves the partial adapter, the client pulls it and tears the
instance down, which takes about :data:`WRAP_UP_S`, and the last increment is billed whole; so a
budget stop is asked for :func:`stop_margin_s` before the money runs out, both by the agent's own
deadline (set at start, it holds even when the client is gone) and by the client watching the
bill. The stop travels with its reason (``"budget"`` or ``"max_runtime"``), so the result says
which cap ended the run.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "WRAP_UP_S",
    "Deadline",
    "affordable_steps",
    "billed_cost",
    "billed_seconds",
    "deadline",
    "must_stop",
    "stop_margin_s",
]

# Saving the partial adapter, pulling it and terminating after a stop (measured on the
# emulators and RunPod: 20-40 s for a LoRA adapter).
WRAP_UP_S = 45.0


def billed_seconds(seconds: float, increment_s: int) -> int:
    """``seconds`` of use rounded up to the provider's billing increment."""
    if seconds <= 0:
        return 0
    inc = max(1, int(increment_s))
    return math.ceil(seconds / inc) * inc


def billed_cost(price_per_hour: float, seconds: float, increment_s: int) -> float:
    """Dollars billed for ``seconds`` of use at ``price_per_hour``."""
    if price_per_hour <= 0:
        return 0.0
    return price_per_hour * billed_seconds(seconds, increment_s) / 3600.0


def stop_margin_s(increment_s: int) -> float:
    """How long before the money runs out a budget stop must be asked for."""
    return WRAP_UP_S + max(1, int(increment_s))


@dataclasses.dataclass(frozen=True)
class Deadline:
    """When the agent must stop by itself, and which cap that is."""

    at: float
    reason: str  # "budget" or "max_runtime"


def deadline(
    *,
    started_at: float,
    now: float,
    price_per_hour: float,
    increment_s: int,
    max_cost: float | None,
    spent_before: float = 0.0,
    max_runtime: float | None = None,
) -> Deadline | None:
    """The earliest of the budget's and the runtime cap's deadlines, or None.

    Args:
        started_at: when billing started on this instance (its launch).
        now: the present (a runtime cap counts from here).
        max_cost: the job's dollar cap; ``spent_before`` was spent by earlier attempts.
        max_runtime: seconds the run may take from now.
    """
    found: list[Deadline] = []
    if max_runtime is not None:
        found.append(Deadline(now + max_runtime, "max_runtime"))
    if max_cost is not None and price_per_hour > 0:
        seconds = (max_cost - spent_before) / price_per_hour * 3600.0
        found.append(
            Deadline(started_at + max(0.0, seconds - stop_margin_s(increment_s)), "budget")
        )
    return min(found, key=lambda d: d.at) if found else None


def must_stop(
    *, spent: float, max_cost: float | None, price_per_hour: float, increment_s: int
) -> bool:
    """Whether the bill so far leaves only enough of ``max_cost`` to stop cleanly."""
    if max_cost is None:
        return False
    margin = billed_cost(price_per_hour, stop_margin_s(increment_s), 1)
    return spent + margin >= max_cost


def affordable_steps(
    *,
    max_cost: float,
    price_per_hour: float,
    increment_s: int,
    setup_s: float,
    seconds_per_step: float,
) -> int:
    """About how many optimizer steps ``max_cost`` buys: setup paid first, one billing
    increment kept in hand."""
    if price_per_hour <= 0 or seconds_per_step <= 0:
        return 0
    affordable_s = max_cost / price_per_hour * 3600.0 - max(1, int(increment_s))
    return max(0, int((affordable_s - setup_s) / seconds_per_step))
