"""Checkpoints: the newest complete one (here, or in the job's object storage) to resume from,
and whether it was written under FSDP (then it resumes under FSDP again, on any number of ranks,
one included). Standard library only: the agent asks before it starts the trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import artifacts
from ..protocol import CHECKPOINT_DIR

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["FSDP_MARK", "latest_checkpoint", "resume_point", "tokens_at", "written_under_fsdp"]

# What accelerate names an FSDP checkpoint's model state (``pytorch_model_fsdp.bin`` for a full
# state dict, ``pytorch_model_fsdp_0/`` for a sharded one): the mark transformers' Trainer
# itself reads (``FSDP_MODEL_NAME``) when it refuses such a checkpoint outside FSDP.
FSDP_MARK = "pytorch_model_fsdp"


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


def written_under_fsdp(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds FSDP's state (model and optimizer as accelerate saves them
    under FSDP), which Trainer loads only under FSDP: such a checkpoint resumes under FSDP again,
    on one rank or more (FSDP's full state dicts are the same at any world size)."""
    return checkpoint.is_dir() and any(FSDP_MARK in p.name for p in checkpoint.iterdir())
