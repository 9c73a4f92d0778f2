"""Checkpoints: the newest complete one (here, or in the job's object storage) to resume from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import artifacts
from ..protocol import CHECKPOINT_DIR

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["latest_checkpoint", "resume_point", "tokens_at"]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` under ``root`` (one with trainer_state.json)."""
    done = [
        p
        for p in root.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_point(workdir: Path, upload: str | None, reporter: Reporter) -> Path | None:
    """The checkpoint to resume from: the newest here, else the newest uploaded (downloaded)."""
    root = workdir / CHECKPOINT_DIR
    found = latest_checkpoint(root)
    if found is None and upload:
        found = artifacts.download_latest_checkpoint(upload, root)
        if found is not None:
            reporter.event("checkpoint_downloaded", path=str(found))
    return found


def tokens_at(checkpoint: Path) -> int:
    """Training tokens seen when ``checkpoint`` was written."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))
