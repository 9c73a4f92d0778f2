"""What a finished (or stopped) run leaves: adapter/, metrics.json, then manifest.json (whose
presence means complete), uploaded too when the job has object storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import artifacts
from ..protocol import ADAPTER_DIR, MANIFEST_FILE, METRICS_FILE, build_manifest, write_atomic

__all__ = ["loss_history", "save_outputs"]


def loss_history(state: Any) -> list[tuple[int, float]]:
    """``(step, loss)`` of every optimizer step, across resumed runs (Trainer's log_history)."""
    by_step = {h["step"]: h["loss"] for h in state.log_history if h.get("loss") is not None}
    return sorted(by_step.items())


def save_outputs(
    workdir: Path, model: Any, tokenizer: Any, metrics: dict[str, Any], upload: str | None
) -> None:
    """Write the adapter and metrics, then the manifest that marks them complete."""
    model.save_pretrained(workdir / ADAPTER_DIR)
    tokenizer.save_pretrained(workdir / ADAPTER_DIR)
    write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    manifest = build_manifest(workdir, [ADAPTER_DIR, METRICS_FILE])
    write_atomic(workdir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if upload:
        for name in (ADAPTER_DIR, METRICS_FILE, MANIFEST_FILE):
            artifacts.upload_tree(upload, workdir / name, f"final/{name}")
