"""Measure our trainer on an H200 and refit the estimator's coefficients.

Run on an NVIDIA H200 (one command measures and refits)::

    python benchmarks/calibrate_estimator.py

or in two halves, measuring on the GPU box and fitting anywhere::

    python benchmarks/calibrate_estimator.py --measure --out DIR      # writes DIR/estimator_h200_measurements.json
    python benchmarks/calibrate_estimator.py --fit benchmarks/results/estimator_h200_measurements.json

Each config runs in its own process through ``benchmarks/measure_one.py --stack ours`` on a
random-weight model of the real shape (NF4 + double quant, LoRA r=16 on all linear layers).
The fit writes ``sdk/data/calibration.json`` (points, coefficients, date, GPU, versions) and
rewrites ``DEFAULT_COEFFS`` in ``remote/memory.py`` so the trainer on the instance uses the same
numbers. Configs marked ``holdout`` are measured but never fitted: ``estimator_accuracy.py``
checks the model on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The measuring half runs on the GPU box with only measure_one.py's needs; loraburst is
# imported by the fitting half alone.
if TYPE_CHECKING:
    from loraburst.remote.memory import Coefficients

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "sdk" / "data" / "calibration.json"
MEMORY_PY = ROOT / "remote" / "memory.py"
LORA_R = 16

# (model, seq, micro-batch, checkpointing, holdout): 3 shapes x 3 lengths x checkpointing on/off,
# and a held-out length (1024) per shape. Grouped by model so each checkpoint is written and
# cached once; the run stops starting configs at --budget-s and keeps what it has.
CONFIGS: list[tuple[str, int, int, bool, bool]] = [
    ("llama-3-8b", 512, 4, False, False),
    ("llama-3-8b", 2048, 2, True, False),
    ("llama-3-8b", 4096, 1, False, False),
    ("llama-3-8b", 1024, 2, False, True),
    ("mistral-7b", 2048, 1, False, False),
    ("mistral-7b", 512, 4, True, False),
    ("mistral-7b", 1024, 4, True, True),
    ("llama-3.2-3b", 512, 8, False, False),
    ("llama-3.2-3b", 2048, 2, True, False),
    ("llama-3.2-3b", 4096, 1, True, False),
    ("llama-3.2-3b", 1024, 4, False, True),
    ("mistral-7b", 4096, 1, True, False),
]


def _versions() -> dict[str, str]:
    """Package versions from metadata (importing torch here would cost device time)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    try:
        smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        out["gpu"], out["driver"] = (
            subprocess.run(smi, capture_output=True, text=True, timeout=30)
            .stdout.splitlines()[0]
            .split(", ")
        )
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        out["gpu"] = "unknown"
    return out


def measure(out_dir: Path, budget_s: float, per_config_s: float) -> Path:
    """Run every config in its own process; write one JSON with all points."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    points: list[dict[str, Any]] = []
    path = out_dir / "estimator_h200_measurements.json"
    doc = {"date": datetime.date.today().isoformat(), "versions": _versions(), "lora_r": LORA_R}
    for model, seq, mb, ckpt, holdout in CONFIGS:
        if time.monotonic() - start > budget_s:
            print(f"budget reached: skipping {model} seq {seq} mb {mb}", flush=True)
            continue
        tag = f"{model}-s{seq}-b{mb}-{'ck' if ckpt else 'nock'}"
        out = Path(tempfile.gettempdir()) / f"calib-{tag}.json"
        out.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "measure_one.py"),
            "--stack",
            "ours",
            "--model",
            model,
            "--seq",
            str(seq),
            "--micro-batch",
            str(mb),
            "--grad-ckpt",
            "on" if ckpt else "off",
            "--steps",
            "8",
            "--warmup",
            "2",
            "--out",
            str(out),
        ]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=per_config_s)
            text, err = proc.stdout, proc.stderr[-2000:]
        except subprocess.TimeoutExpired as exc:
            text, err = "", f"timeout after {per_config_s}s: {exc}"
        result: dict[str, Any] = {}
        candidates = [out.read_text()] if out.is_file() else []
        candidates += [ln for ln in reversed(text.splitlines()) if ln.startswith("{")]
        for candidate in candidates:
            try:
                result = json.loads(candidate)
                break
            except json.JSONDecodeError:
                continue
        point = {
            **result,  # measure_one's fields first: ours (booleans, holdout flag) win
            "model": model,
            "seq": seq,
            "micro_batch": mb,
            "grad_ckpt": ckpt,
            "holdout": holdout,
            "wall_s": round(time.monotonic() - t0, 1),
        }
        if not result.get("ok"):
            point["ok"] = False
            point["stderr_tail"] = err
        points.append(point)
        print(json.dumps({k: v for k, v in point.items() if k != "stderr_tail"}), flush=True)
        path.write_text(json.dumps({**doc, "points": points}, indent=1) + "\n")  # after each
    return path


def _shape(model: str) -> Any:
    from loraburst._cost.shapes import model_shape

    return model_shape(model).shape


def _bounded_fit(
    rows: list[list[float]], targets: list[float], bounds: list[tuple[float, float, float]]
) -> dict[int, float]:
    """Least squares with box bounds: a coefficient that leaves its (low, high) is pinned to
    the bound and the rest refitted; a column no point exercises takes its default."""
    from loraburst.remote.memory import solve_least_squares

    fixed = {i: d for i, (_, _, d) in enumerate(bounds) if all(r[i] == 0 for r in rows)}
    while True:
        free = [i for i in range(len(bounds)) if i not in fixed]
        adj = [
            t - sum(v * r[i] for i, v in fixed.items()) for r, t in zip(rows, targets, strict=True)
        ]
        sol = solve_least_squares([[r[i] for i in free] for r in rows], adj) if free else []
        coef = dict(zip(free, sol, strict=True))
        outside = {i: max(bounds[i][0] - v, v - bounds[i][1]) for i, v in coef.items()}
        worst = max(outside, key=lambda i: outside[i], default=None)
        if worst is None or outside[worst] <= 0:
            return {**fixed, **coef}
        fixed[worst] = min(max(coef[worst], bounds[worst][0]), bounds[worst][1])


def fit_time(points: list[dict[str, Any]]) -> dict[str, float]:
    """Grid-fit utilisation, host seconds per layer pass and the overlap p-norm.

    Minimises the squared log error of tokens/s; dequantisation stays at its physical bytes.
    """
    import math

    from loraburst.remote.memory import Coefficients, step_time

    unit = Coefficients(utilisation=1.0, layer_overhead_s=1.0, overlap_p=1.0)
    parts = []
    for p in points:
        t = step_time(
            _shape(p["model"]),
            seq_len=p["seq"],
            micro_batch_size=p["micro_batch"],
            lora_r=LORA_R,
            gradient_checkpointing=p["grad_ckpt"],
            coeffs=unit,
        )
        measured = p["micro_batch"] * p["seq"] / p["tokens_per_s"]
        parts.append((t["compute"], t["dequant"] + t["attention_scores"], t["host"], measured))

    def loss(u: float, oh: float, pn: float) -> float:
        err = 0.0
        for compute, other, host, measured in parts:
            gpu = compute / u + other
            total = max(gpu, host * oh) if pn > 50 else (gpu**pn + (host * oh) ** pn) ** (1 / pn)
            err += math.log(total / measured) ** 2
        return err

    best = min(
        (loss(u / 200, oh / 1e5, pn), u / 200, oh / 1e5, pn)
        for pn in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0, 100.0)
        for u in range(20, 201, 2)  # utilisation 0.10 .. 1.00
        for oh in range(0, 801, 10)  # 0 .. 8 ms per layer pass
    )
    _, u0, oh0, pn = best
    _, u, oh = min(
        (loss(u0 + du / 1000, oh0 + do / 1e6, pn), u0 + du / 1000, oh0 + do / 1e6)
        for du in range(-10, 11)
        for do in range(-100, 101, 5)
        if u0 + du / 1000 > 0 and oh0 + do / 1e6 >= 0
    )
    return {
        "utilisation": round(u, 4),
        "layer_overhead_s": round(oh, 6),
        "overlap_p": pn,
        "dequant_bytes": unit.dequant_bytes,
        "attn_score_traffic": 0.0,
    }


def fit_memory(points: list[dict[str, Any]]) -> dict[str, float]:
    """Fit activation, checkpoint, logits and fixed terms; choose fp32 or bf16 embeddings."""
    from loraburst.remote.memory import GIB, Coefficients, peak_vram

    best: tuple[float, dict[str, float]] | None = None
    for emb_bytes in (2, 4):
        base = Coefficients(
            embed_bytes=emb_bytes,
            act_mult=0,
            ckpt_bytes=0,
            logits_bytes=0,
            fixed_gib=0,
            reserved_ratio=1.0,
        )
        rows, targets = [], []
        for p in points:
            s = _shape(p["model"])
            static = peak_vram(
                s,
                seq_len=p["seq"],
                micro_batch_size=p["micro_batch"],
                lora_r=LORA_R,
                gradient_checkpointing=p["grad_ckpt"],
                coeffs=base,
            )["allocated"]
            unit = dataclasses.replace(base, act_mult=1.0)
            one = (
                peak_vram(
                    s,
                    seq_len=p["seq"],
                    micro_batch_size=p["micro_batch"],
                    lora_r=LORA_R,
                    gradient_checkpointing=False,
                    coeffs=unit,
                )["activations"]
                / s.layers
            )
            tokens = p["micro_batch"] * p["seq"]
            act = one if p["grad_ckpt"] else one * s.layers
            ck = tokens * s.layers * s.hidden / GIB if p["grad_ckpt"] else 0.0
            scores = tokens * s.heads * p["seq"] / GIB * (1 if p["grad_ckpt"] else s.layers)
            x = [act, ck, tokens * s.vocab / GIB, 1.0, scores]
            y = p["peak_alloc_gib"] - static
            rows.append([v / p["peak_alloc_gib"] for v in x])
            targets.append(y / p["peak_alloc_gib"])
        coef = _bounded_fit(
            rows,
            targets,
            [
                (0.25, 4.0, 1.0),
                (0.0, 12.0, 4.0),
                (0.0, 32.0, 16.0),
                (0.0, 3.0, 0.3),
                (0.0, 16.0, 0.0),
            ],
        )
        resid = sum(
            (sum(coef.get(i, 0.0) * r[i] for i in range(4)) - t) ** 2
            for r, t in zip(rows, targets, strict=True)
        )
        fitted = {
            "embed_bytes": emb_bytes,
            "act_mult": round(coef[0], 4),
            "ckpt_bytes": round(coef[1], 3),
            "logits_bytes": round(coef[2], 3),
            "fixed_gib": round(coef[3], 3),
            "attn_score_bytes": round(coef[4], 3),
        }
        if best is None or resid < best[0]:
            best = (resid, fitted)
    assert best is not None
    ratios = sorted(p["peak_reserved_gib"] / p["peak_alloc_gib"] for p in points)
    best[1]["reserved_ratio"] = round(ratios[len(ratios) // 2], 4)
    return best[1]


def fit(measurements: Path) -> Coefficients:
    """Fit on the non-holdout points; write calibration.json and memory.py's defaults."""
    from loraburst.remote.memory import Coefficients

    doc = json.loads(measurements.read_text())
    ok = [p for p in doc["points"] if p.get("ok")]
    train = [p for p in ok if not p["holdout"]]
    if len(train) < 4:
        raise SystemExit(f"only {len(train)} usable calibration points in {measurements}")
    values = {**Coefficients().to_dict(), **fit_time(train), **fit_memory(train)}
    coeffs = Coefficients.from_dict(values)
    errors = []
    from estimator_accuracy import predict  # same folder; shares the prediction code

    for p in train:
        pred = predict(p, coeffs)
        errors.append(abs(pred["tokens_per_s"] / p["tokens_per_s"] - 1))
    calib = {
        "gpu": doc["versions"].get("gpu", "NVIDIA H200"),
        "date": doc["date"],
        "versions": doc["versions"],
        "lora_r": doc.get("lora_r", LORA_R),
        "stack": "benchmarks/measure_one.py --stack ours (remote/fastpath.py, default options)",
        "note": doc.get("note", ""),
        "coefficients": coeffs.to_dict(),
        "accuracy": {"max_rel_error_tokens_per_s": round(max(errors), 3)},
        "points": [
            {
                k: p[k]
                for k in (
                    "model",
                    "seq",
                    "micro_batch",
                    "grad_ckpt",
                    "holdout",
                    "tokens_per_s",
                    "peak_alloc_gib",
                    "peak_reserved_gib",
                )
            }
            for p in ok
        ],
    }
    CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATION.write_text(json.dumps(calib, indent=1) + "\n")
    _rewrite_defaults(coeffs)
    print(json.dumps(coeffs.to_dict(), indent=1))
    return coeffs


def _rewrite_defaults(coeffs: Coefficients) -> None:
    args = ", ".join(f"{k}={v!r}" for k, v in coeffs.to_dict().items())
    text = MEMORY_PY.read_text()
    new, n = re.subn(
        r"DEFAULT_COEFFS = Coefficients\([^)]*\)", f"DEFAULT_COEFFS = Coefficients({args})", text
    )
    if n != 1:
        raise SystemExit(f"{MEMORY_PY}: expected one 'DEFAULT_COEFFS = Coefficients(...)' line")
    MEMORY_PY.write_text(new)
    subprocess.run(
        [sys.executable, "-m", "ruff", "format", str(MEMORY_PY)], check=False, capture_output=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="only measure")
    ap.add_argument("--fit", type=Path, help="only fit, from this measurements file")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where measurements go")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 1800)))
    ap.add_argument("--per-config-s", type=float, default=180)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.fit:
        fit(args.fit)
        return
    path = measure(args.out, args.budget_s, args.per_config_s)
    if not args.measure:
        fit(path)


if __name__ == "__main__":
    main()
