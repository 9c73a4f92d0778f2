"""Supervised fine-tuning on Apple Silicon with MLX (:mod:`..mlx_trainer`): the same data,
masks, events, checkpoints and PEFT-format adapter as :mod:`.sft`, on ``mlx`` and ``mlx-lm``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol import BundleSpec

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["run"]


def run(workdir: Path, bundle: BundleSpec, reporter: Reporter) -> None:
    """Train the job in ``workdir`` with MLX and write its artifacts."""
    from ..mlx_trainer import run as run_mlx

    run_mlx(workdir, reporter)
