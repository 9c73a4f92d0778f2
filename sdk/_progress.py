"""The progress display: one rich bar for every provider (step/total, loss, tokens/s, ETA, $).

Messages carry provider and instance text (errors, paths, the agent's phase): they are printed
as plain text, never parsed as rich markup.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from loraburst.remote.protocol import State
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["ProgressView"]


class ProgressView:
    """Shows a run's State; prints plain lines instead of a bar when not on a terminal."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._console = Console(stderr=True)
        self._live = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._label = label
        self._last_printed = -1
        self._price_per_hour: float | None = None

    def __enter__(self) -> ProgressView:
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(),
                console=self._console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(escape(self._label), total=None, info="")
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def rate(self, price_per_hour: float) -> None:
        """The price of the machine now running, shown as dollars per hour burned."""
        self._price_per_hour = price_per_hour

    def message(self, text: str) -> None:
        if self.enabled:
            self._console.print(text, highlight=False, markup=False)

    def update(self, state: State, spent_usd: float) -> None:
        if not self.enabled:
            return
        parts = [state.phase]
        if state.loss is not None:
            parts.append(f"loss {state.loss:.4f}")
        if state.metrics and state.metrics.get("reward_margin") is not None:
            m = state.metrics  # a preference objective's step: DPO/ORPO reward margin, accuracy
            parts.append(f"margin {m['reward_margin']:+.3f} acc {m.get('reward_accuracy', 0):.2f}")
        if state.tokens_per_s:
            parts.append(f"{state.tokens_per_s:,.0f} tok/s")
        if state.eta_s is not None and state.phase == "training":
            parts.append(f"ETA {state.eta_s:,.0f}s")
        if state.gpu_util is not None:
            idle = " (idle?)" if state.gpu_util < 30 and state.phase == "training" else ""
            parts.append(f"GPU {state.gpu_util:.0f}%{idle}")
        parts.append(f"${spent_usd:.4f}")
        if self._price_per_hour:
            parts.append(f"${self._price_per_hour:.2f}/h")
        info = " | ".join(parts)
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, total=state.total_steps or None, completed=state.step, info=info
            )
        elif state.step != self._last_printed:
            self._last_printed = state.step
            self._console.print(
                f"{self._label}: step {state.step}/{state.total_steps} {info}",
                highlight=False,
                markup=False,
            )


def objective_line(metrics: dict[str, Any]) -> str | None:
    """One line on a preference job's own metrics (None for SFT), e.g. ``dpo: reward margin
    0.000 -> 0.412, accuracy 0.50 -> 0.88 (beta 0.1, reference live)``."""
    objective = metrics.get("objective")
    if objective in (None, "sft") or metrics.get("final_reward_margin") is None:
        return None
    line = (
        f"{objective}: reward margin {metrics['first_reward_margin']:.3f} -> "
        f"{metrics['final_reward_margin']:.3f}, accuracy {metrics['first_reward_accuracy']:.2f}"
        f" -> {metrics['final_reward_accuracy']:.2f} (beta {metrics.get('beta')}"
    )
    if metrics.get("reference"):
        line += f", reference {metrics['reference']}"
    return line + ")"
