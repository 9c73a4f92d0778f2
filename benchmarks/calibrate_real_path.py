"""Measure the trainer's real path over a spread of jobs, for the estimator's fit and its check.

Every run is a real job through ``Job.run(provider="local")`` (``real_path.run_ours``): the
realistic rows of ``realistic_data.py`` (text or chat), a random-weight model of a real shape
(some with fewer decoder layers to spare the disk: the estimate takes the same config), and the
trainer's own choices (micro-batch, packing, recompute plan) unless the run fixes them. Each run
records what the estimator needs to be fitted against: the trainer's settings and memory plan
(``settings`` / ``fastpath`` events, with the probe's fit), the steady and whole-run tokens/s,
each phase's seconds (load, first step, train, pull), and the measured peak.

Runs marked ``holdout`` are never fitted: ``estimator_accuracy.py`` checks the estimate on them.

    python benchmarks/calibrate_real_path.py [--only KEY,...] [--budget-s 540] [--cleanup]

Results merge into ``results/real_path_calibration.json`` after every run (runs already there
are skipped), so a second call finishes the queue. ``--cleanup`` deletes a model folder once its
last queued run is done (the H200's 64 GB disk holds three or four 7B checkpoints at most).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "real_path_calibration.json"
STEPS = 20

# key -> (model, decoder layers or None for all, dataset kind, train settings, holdout).
# Fitted and held-out runs are interleaved so that a partial call still serves both.
RUNS: list[tuple[str, str, int | None, str, dict[str, Any], bool]] = [
    ("l8-text-2048-packed", "llama-3-8b", None, "text", {"packing": True}, False),
    ("l8-text-2048-cap24", "llama-3-8b", None, "text", {"packing": True, "max_gpu_memory_gib": 24.0}, True),
    ("l8-text-2048-unpacked", "llama-3-8b", None, "text", {"packing": False}, False),
    ("l8-chat-1024-packed", "llama-3-8b", None, "chat", {"packing": True, "max_seq_len": 1024}, True),
    ("l8-text-4096-offload", "llama-3-8b", None, "text", {"packing": True, "max_seq_len": 4096, "gradient_checkpointing": "offload"}, False),
    ("l3-text-1024-packed", "llama-3.2-3b", None, "text", {"packing": True, "max_seq_len": 1024}, False),
    ("l3-chat-2048-unpacked", "llama-3.2-3b", None, "chat", {"packing": False}, True),
    ("l3-text-4096-cap16", "llama-3.2-3b", None, "text", {"packing": True, "max_seq_len": 4096, "max_gpu_memory_gib": 16.0}, False),
    ("m7-text-2048-mb2", "mistral-7b", 16, "text", {"packing": True, "micro_batch_size": 2}, False),
    ("m7-chat-4096-packed", "mistral-7b", 16, "chat", {"packing": True, "max_seq_len": 4096}, True),
    ("q7-text-2048-packed", "qwen2.5-7b", 10, "text", {"packing": True}, False),
    ("q7-text-1024-unpacked", "qwen2.5-7b", 10, "text", {"packing": False, "max_seq_len": 1024}, True),
    ("p3-text-4096-packed", "phi-3-mini", 16, "text", {"packing": True, "max_seq_len": 4096}, False),
    ("p3-text-2048-cap16", "phi-3-mini", 16, "text", {"packing": True, "max_gpu_memory_gib": 16.0}, True),
    ("g9-text-2048-packed", "gemma-2-9b", 12, "text", {"packing": True}, False),
    ("g9-text-1024-unpacked", "gemma-2-9b", 12, "text", {"packing": False, "max_seq_len": 1024}, True),
]  # fmt: skip


def one(key: str) -> dict[str, Any]:
    from benchmarks.common import MODELS
    from benchmarks.real_path import run_ours

    _, model, layers, kind, settings, holdout = next(r for r in RUNS if r[0] == key)
    raw = run_ours(
        model, kind, {"steps": STEPS, **({"layers": layers} if layers else {}), **settings}
    )
    config = dict(MODELS[model])
    if layers:
        config["num_hidden_layers"] = layers
    raw.update(key=key, model=model, layers=layers, kind=kind, holdout=holdout, config=config,
               max_seq_len=settings.get("max_seq_len", 2048), steps=STEPS)  # fmt: skip
    return raw


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--cleanup", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, its JSON to --out
        assert args.out is not None
        args.out.write_text(json.dumps(one(args.one)))
        return
    from benchmarks.common import models_root
    from benchmarks.real_path import _versions

    doc = _load()
    doc.setdefault("versions", _versions())
    only = {x for x in args.only.split(",") if x}
    queue = [r for r in RUNS if (not only or r[0] in only)
             and (args.rerun or r[0] not in doc["runs"] or doc["runs"][r[0]].get("error"))]  # fmt: skip
    t_end = time.time() + args.budget_s
    for i, (key, model, layers, *_) in enumerate(queue):
        if time.time() > t_end:
            print(f"budget spent before {key}", flush=True)
            break
        from benchmarks.common import run_child

        raw = run_child(__file__, key, t_end, grace_s=150)
        raw.setdefault("key", key)
        doc["runs"][key] = raw
        doc["date"] = datetime.date.today().isoformat()
        RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"{key}: steady {raw.get('steady_tok_s')} peak {raw.get('peak_alloc_gib')} "
              f"{raw.get('error', '')[-800:]} ({raw['elapsed_s']} s)", flush=True)  # fmt: skip
        later = [(m, n) for _, m, n, *_ in queue[i + 1 :]]
        if args.cleanup and (model, layers) not in later:
            name = model if layers is None else f"{model}-{layers}l"
            shutil.rmtree(models_root() / name, ignore_errors=True)


if __name__ == "__main__":
    main()
