"""What a finished (or stopped) run leaves: adapter/ and metrics.json, then the exports made from
them (:mod:`..export`), then manifest.json (whose presence means complete), all uploaded too when
the job has object storage. :func:`finish` is every torch recipe's tail, rank 0's alone to write."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import artifacts, telemetry
from ..protocol import (
    ADAPTER_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    BundleSpec,
    build_manifest,
    write_atomic,
)
from . import distributed

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["finish", "free_memory", "loss_history", "save_adapter", "seal"]


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


def finish(
    workdir: Path,
    bundle: BundleSpec,
    model_path: str,
    reporter: Reporter,
    held: MutableMapping[str, Any],
    *,
    tokenizer: Any,
    metrics: dict[str, Any],
    stopped: str | None,
    upload: str | None,
    **final: Any,
) -> None:
    """A recipe's tail: save the adapter and metrics, make the exports, seal, report the end.

    ``held`` carries the training objects (``trainer``, ``model``, and anything holding them,
    such as the progress callback); they are let go before the exports load models of their
    own, so the caller must hold no other reference. ``final`` rides on the last event.

    Under torchrun every rank calls it: the adapter's full state dict is gathered from every
    rank (FSDP shards it) by ``Trainer.save_model``, then rank 0 alone writes the files, makes
    the exports, seals the manifest and reports; the other ranks return.
    """
    ctx = distributed.current()
    trainer, model = held["trainer"], held["model"]
    steps = trainer.state.global_step
    if ctx.world > 1 or getattr(trainer, "is_fsdp_enabled", False):
        # A collective under FSDP (the full state dict); Trainer writes on rank 0 only.
        trainer.save_model(str(workdir / ADAPTER_DIR))
        distributed.barrier()
        if ctx.main:
            # Trainer's own record of its arguments is no part of the adapter.
            (workdir / ADAPTER_DIR / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(workdir / ADAPTER_DIR)
            write_atomic(workdir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
    else:
        save_adapter(workdir, model, tokenizer, metrics)
    del trainer, model
    held.clear()
    if not ctx.main:
        return
    exported: list[str] = []
    if stopped is None:
        from .. import export

        free_memory()
        exported = export.run(workdir, dataclasses.asdict(bundle), model_path, reporter)
    telemetry.record(workdir, metrics)  # report hook: the timeline rides in metrics.json
    seal(workdir, upload, exported)
    phase = "stopped" if stopped else "done"
    reporter.update(phase=phase, stop_reason=stopped, step=steps, eta_s=0.0)
    reporter.event(phase, steps=steps, final_loss=metrics["final_loss"], **final)
