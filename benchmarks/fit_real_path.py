"""Fit the estimator's real-path time model, and check the estimate on held-out jobs.

Reads ``results/real_path_calibration.json`` (``calibrate_real_path.py`` on the H200). Every run
is rebuilt here as the user would have written it: a model folder with the run's
``config.json`` and the benchmark tokenizer (no weights needed), the same rows, the same
``Job``; the client counts every row's tokens with that tokenizer, exactly as before a real run.

- **Fit** (runs not marked ``holdout``): the step-time model of ``loraburst._cost.replay``
  (utilisation, per-layer and per-micro-batch overheads, offload copies) against each run's
  steady step, given the plan the trainer chose; loading and the first step against the
  run's events. Written to ``sdk/data/calibration.json`` under ``real_path``.
- **Check** (every run, held-out ones reported apart): the product's own estimate
  (``loraburst._cost.estimate.estimate`` on an H200 of the measured size, the ``local``
  provider) against the measurement: tokens/s, peak allocated memory, wall time from
  ``Job.run`` to the adapter, and whether the measured time is inside the stated range.
  Written to ``results/estimator_accuracy_real_path.json`` and printed as a table.

    python benchmarks/fit_real_path.py [--check-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RUNS = HERE / "results" / "real_path_calibration.json"
OUT = HERE / "results" / "estimator_accuracy_real_path.json"
CALIBRATION = ROOT / "sdk" / "data" / "calibration.json"
H200_GIB = 139.8  # torch.cuda.get_device_properties(0).total_memory on the calibration H200
# Runs that measured nothing usable: Qwen2's tokenizer class replaced the benchmark's word
# tokenizer (every row became one token). (The 16 GiB Llama-3.2-3B run ran out of memory in its
# first call, the loss chunk under-counted by the planner; measured again after the fix.)
INVALID = {"q7-text-2048-packed", "q7-text-1024-unpacked"}
# Measured and checked, but not fitted: under its 16 GiB cap the steps alternated between 0.07
# and 0.32 s (the allocator at the cap), a regime the step model does not describe.
CHECK_ONLY = {"l3-text-4096-cap16"}


def _folder(run: dict[str, Any], root: Path) -> Path:
    from benchmarks.common import _save_tokenizer

    name = run["model"] + (f"-{run['layers']}l" if run.get("layers") else "")
    folder = root / name
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps({**run["config"], "torch_dtype": "bfloat16"})
        )
        _save_tokenizer(folder, run["config"])
    return folder


def _data(kind: str, root: Path) -> Path:
    from benchmarks.realistic_data import chat_rows, text_rows, write_jsonl

    path = root / f"rows-{kind}.jsonl"
    if not path.is_file():
        write_jsonl(text_rows(6000, seed=0) if kind == "text" else chat_rows(6000, seed=0), path)
    return path


def _job(run: dict[str, Any], root: Path) -> Any:
    """The run's job, as ``real_path.run_ours`` wrote it."""
    from loraburst import Job

    s = {k: v for k, v in run["settings"].items() if k not in ("layers", "steps", "lr")}
    train = {"max_steps": run.get("steps", 20), "max_seq_len": 2048, "learning_rate": 2e-4,
             "save_every_steps": None, "warmup_ratio": 0.1, **s}  # fmt: skip
    return Job(str(_folder(run, root)), str(_data(run["kind"], root)), train=train, name="bench")


def _steady_step(run: dict[str, Any]) -> float:
    from benchmarks.real_path import WARMUP

    return statistics.median(run["step_s"][WARMUP:])


def _features(run: dict[str, Any], planner: Any, rp: Any) -> list[float]:
    """Seconds of each term of the step model at unit coefficients, for the trainer's plan."""
    import dataclasses

    ev = run["events"]
    plan = (ev.get("fastpath") or {}).get("plan", {})
    tokens = statistics.fmean(run["step_tokens"][1:])
    args = (tokens, int(plan.get("recompute_layers", 0)), int(plan.get("dequant_cache", 0)),
            bool(plan.get("offload")))  # fmt: skip
    kw = {"tflops": 989.0, "bandwidth_gbs": 4800.0, "gemm_efficiency": 0.80}
    zero = dataclasses.replace(rp, utilisation=1e30, dequant_bytes=0.0, layer_s=0.0, step_s=0.0,
                               offload_s_per_gb=0.0)  # fmt: skip

    def term(**c: float) -> float:
        return float(planner.step_seconds(*args, coeffs=dataclasses.replace(zero, **c), **kw))

    return [term(utilisation=1.0), term(dequant_bytes=1.0), term(layer_s=1.0), term(step_s=1.0),
            term(offload_s_per_gb=1.0)]  # fmt: skip


def _planner(run: dict[str, Any], root: Path) -> tuple[Any, Any, Any]:
    from loraburst._cost.replay import Planner, workload
    from loraburst._cost.shapes import model_shape

    job = _job(run, root)
    train, _ = job.prepare()
    st = train.stats
    ms = model_shape(job.spec.model)
    wl = workload(job.spec, st.lengths, st.rows, st.tokens or 0, padded=ms.shape.eager_attention)
    return job, st, Planner(job.spec, ms.shape, ms.config, wl)


def fit(runs: dict[str, Any], root: Path) -> dict[str, Any]:
    from loraburst._cost.replay import RealPathCoeffs
    from loraburst.remote.memory import solve_least_squares

    rp = RealPathCoeffs()
    rows, targets, used, others = [], [], [], []
    loads, firsts = [], []
    for key, run in runs.items():
        if run.get("holdout") or key in INVALID | CHECK_ONLY or run.get("error"):
            continue
        _, _, planner = _planner(run, root)
        x = _features(run, planner, rp)
        if planner.model_type not in ("llama", "mistral"):
            others.append((planner.model_type, x, _steady_step(run)))
            continue
        # Dequantisation held at 4.5 bytes per weight per pass (the synthetic loop's fit): the
        # runs with uncached layers are too few to fit it apart from the rest.
        rows.append([x[0], x[3], x[4]])
        targets.append(_steady_step(run) - rp.dequant_bytes * x[1])
        used.append(key)
        gb = 2.0 * _params(run["config"]) / 1e9
        # Everything but the steps: start, tokenise, load, quantise, probe, save, pull.
        loads.append((gb, run["durations"]["total"] - sum(run["step_s"])))
        firsts.append(run["step_s"][0] - _steady_step(run))
    # Fitted: 1/utilisation, seconds per micro-batch, offload copies not hidden (per GB). The
    # per-layer host time is left at 0: with one micro-batch per step it cannot be told apart
    # from the per-micro-batch time on these runs.
    inv_util, step_s, offload = solve_least_squares(rows, targets)
    dq = rp.dequant_bytes
    layer_s = 0.0
    # Load: everything a user waits for besides the steps (start, tokenise, load, quantise,
    # probe, save, pull), as a constant plus the checkpoint at a rate.
    a, b = solve_least_squares([[1.0, gb] for gb, _ in loads], [s for _, s in loads])
    coeffs: dict[str, Any] = {
        "utilisation": round(1.0 / inv_util, 4),
        "dequant_bytes": round(max(0.0, dq), 2),
        "layer_s": round(max(0.0, layer_s), 6),
        "step_s": round(max(0.0, step_s), 5),
        "offload_s_per_gb": round(max(0.0, offload), 5),
        "load_s": round(a, 2),
        "load_gbs": round(1.0 / b, 3) if b > 0 else 1e9,
        "first_step_s": round(statistics.median(firsts), 2),
    }
    # Other architectures: their measured step over the Llama/Mistral model's, one factor each.
    ratios: dict[str, list[float]] = {}
    for arch, x, measured in others:
        model = x[0] * inv_util + x[1] * max(0.0, dq) + step_s + x[4] * max(0.0, offload)
        ratios.setdefault(arch, []).append(measured / model)
    coeffs["arch_time"] = {a: round(statistics.median(r), 3) for a, r in ratios.items()}
    return {"coefficients": coeffs, "fitted_runs": used}


def _params(config: dict[str, Any]) -> float:
    from loraburst.remote.memory import param_counts, shape_from_config

    return float(param_counts(shape_from_config(config))["total"])


def check(runs: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    from loraburst._cost.estimate import estimate

    out = []
    for key, run in runs.items():
        if key in INVALID or run.get("error"):
            continue
        job, st, _ = _planner(run, root)
        est = estimate(job.spec, tokens=st.tokens or 0, rows=st.rows, tokens_exact=st.tokens_exact,
                       gpus=["H200"], providers=["local"], local_gpus=[("H200", H200_GIB)],
                       lengths=st.lengths)  # fmt: skip
        row = est.rows[0]
        measured_tok = run["steady_tok_s"]
        wall = run["durations"]["total"]
        out.append({
            "run": key, "holdout": bool(run.get("holdout")),
            "estimate_tok_s": row.tokens_per_s, "measured_tok_s": round(measured_tok, 1),
            "tok_s_error": round(row.tokens_per_s / measured_tok - 1, 4),
            "estimate_peak_gib": row.peak_vram_gb, "measured_peak_gib": round(run["peak_alloc_gib"], 2),
            "peak_error": round(row.peak_vram_gb / run["peak_alloc_gib"] - 1, 4),
            "estimate_wall_s": row.total_s, "measured_wall_s": round(wall, 1),
            "wall_error": round(row.total_s / wall - 1, 4),
            "wall_in_range": row.total_low_s <= wall <= row.total_high_s,
            "range_s": [row.total_low_s, row.total_high_s],
            "estimate_micro_batch": row.micro_batch_size,
            "trainer_micro_batch": run["events"]["settings"]["micro_batch_size"],
            "fits": row.fits,
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    doc = json.loads(RUNS.read_text())
    root = Path(tempfile.gettempdir()) / "lb-fit"
    root.mkdir(exist_ok=True)
    if not args.check_only:
        fitted = fit(doc["runs"], root)
        cal = json.loads(CALIBRATION.read_text())
        cal["real_path"] = {**cal.get("real_path", {}), **fitted, "date": doc.get("date"),
                            "source": "benchmarks/results/real_path_calibration.json"}  # fmt: skip
        CALIBRATION.write_text(json.dumps(cal, indent=1) + "\n")
        from loraburst._cost.estimate import load_calibration

        load_calibration.cache_clear()
        print(json.dumps(fitted["coefficients"]))
    rows = check(doc["runs"], root)
    held = [r for r in rows if r["holdout"]]
    summary = {
        "max_abs_tok_s_error_holdout": max((abs(r["tok_s_error"]) for r in held), default=None),
        "max_abs_peak_error_holdout": max((abs(r["peak_error"]) for r in held), default=None),
        "max_abs_wall_error_holdout": max((abs(r["wall_error"]) for r in held), default=None),
        "all_walls_in_range": all(r["wall_in_range"] for r in rows),
    }
    OUT.write_text(json.dumps({"date": datetime.date.today().isoformat(), "gpu": "H200",
                               "rows": rows, "summary": summary}, indent=1) + "\n")  # fmt: skip
    print(
        "| run | held out | tok/s est / meas (err) | peak GiB est / meas (err) | "
        "wall s est / meas (err) | in range | mb est / trainer |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {'yes' if r['holdout'] else ''} | {r['estimate_tok_s']:,.0f} / "
              f"{r['measured_tok_s']:,.0f} ({r['tok_s_error']:+.1%}) | {r['estimate_peak_gib']:.1f} / "
              f"{r['measured_peak_gib']:.1f} ({r['peak_error']:+.1%}) | {r['estimate_wall_s']:.0f} / "
              f"{r['measured_wall_s']:.0f} ({r['wall_error']:+.1%}) | {'yes' if r['wall_in_range'] else 'NO'} | "
              f"{r['estimate_micro_batch']} / {r['trainer_micro_batch']} |")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
