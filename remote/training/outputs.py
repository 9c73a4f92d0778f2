"""What a finished (or stopped) run leaves: adapter/ and metrics.json, then the exports made from
them (:mod:`..export`), then manifest.json (whose presence means complete), all uploaded too when
the job has object storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import artifacts
from ..protocol import ADAPTER_DIR, MANIFEST_FILE, METRICS_FILE, build_manifest, write_atomic

__all__ = ["free_memory", "loss_history", "save_adapter", "seal"]


def loss_history(state: Any) -> list[tuple[int, float]]:
    """``(step, loss)`` of every optimizer step, across resumed runs (Trainer's log_history)."""
    by_step = {h["step"]: h["loss"] for h in state.log_history if h.get("loss") is not None}
    return sorted(by_step.items())


def save_adapter(workdir: Path, model: Any, tokenizer: Any, metrics: dict[str, Any]) -> None:
    """Write the adapter (with its tokenizer) and the metrics."""
    model.save_pretrained(workdir / ADAPTER_DIR)
    tokenizer.save_pretrained(workdir / ADAPTER_DIR)
    write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))


def seal(workdir: Path, upload: str | None, extra: list[str] | None = None) -> None:
    """Write the manifest of the adapter, the metrics and ``extra`` (the exports): last, so that
    its presence means complete; then upload them all when the job has object storage."""
    names = [ADAPTER_DIR, METRICS_FILE, *(extra or [])]
    manifest = build_manifest(workdir, names)
    write_atomic(workdir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if upload:
        for name in (*names, MANIFEST_FILE):
            artifacts.upload_tree(upload, workdir / name, f"final/{name}")


def free_memory() -> None:
    """Let go of training's GPU memory (the exports load models of their own)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
