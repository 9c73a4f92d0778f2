"""The memory planner's predicted peak against the measured peak, architecture by architecture.

Each run is a real job through ``Job.run(provider="local")`` (``real_path.run_ours``) on a
random-weight model of the architecture's real widths with fewer decoder layers (the plan and
the peak both scale per layer), packed rows of ``realistic_data.py``, micro-batch 4 x 2048. The
prediction is the plan the trainer chose (its ``fastpath`` event); the measurement is
``torch.cuda.max_memory_allocated`` of the training process.

    python benchmarks/planner_accuracy.py [--only gemma-2-9b,...] [--layers 6]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "planner_accuracy.json"
ARCHS = ["llama-3-8b", "mistral-7b", "qwen2.5-7b", "gemma-2-9b", "phi-3-mini"]


def one(arch: str, layers: int, cap: float | None) -> dict[str, Any]:
    from benchmarks.real_path import run_ours

    settings: dict[str, Any] = {"layers": layers, "steps": 8, "packing": True,
                                "micro_batch_size": 4}  # fmt: skip
    if cap:
        settings["max_gpu_memory_gib"] = cap
    raw = run_ours(arch, "text", settings)
    fast = raw["events"].get("fastpath") or {}
    plan = fast.get("plan") or {}
    predicted, measured = plan.get("predicted_peak_gib"), raw.get("peak_alloc_gib")
    return {
        "arch": arch,
        "layers": layers,
        "mem_cap_gib": cap,
        "predicted_peak_gib": predicted,
        "measured_peak_gib": measured,
        "error": (predicted / measured - 1) if predicted and measured else None,
        "plan": plan,
        "probe": fast.get("probe"),  # the three sizes measured and the fits the plan stood on
        "attention": (raw["events"].get("settings") or {}).get("attention"),
        "layout": (raw["events"].get("settings") or {}).get("layout"),
        "steady_tok_s": raw.get("steady_tok_s"),
        "status": raw.get("status"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--cap", type=float, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        assert args.out is not None
        args.out.write_text(json.dumps(one(args.one, args.layers, args.cap)))
        return
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    doc.setdefault("runs", {})  # raw runs; "rows" is the summary table RESULTS.md shows
    for arch in [a for a in ARCHS if not args.only or a in args.only.split(",")]:
        out = Path(tempfile.mkdtemp()) / "one.json"
        cmd = [
            sys.executable,
            __file__,
            "--one",
            arch,
            "--layers",
            str(args.layers),
            "--out",
            str(out),
        ]
        if args.cap:
            cmd += ["--cap", str(args.cap)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        key = f"{arch}/{args.layers}l" + (f"/cap{args.cap:g}" if args.cap else "")
        doc["runs"][key] = (
            json.loads(out.read_text()) if out.is_file()
            else {"arch": arch, "failed": (proc.stdout + proc.stderr)[-3000:]}
        )  # fmt: skip
        doc["date"] = datetime.date.today().isoformat()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        r = doc["runs"][key]
        print(key, r.get("predicted_peak_gib"), r.get("measured_peak_gib"), r.get("error"),
              r.get("failed", "")[-800:], flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
