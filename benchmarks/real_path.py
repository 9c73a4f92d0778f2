"""What users get: our trainer through ``Job.run(provider="local")`` beside the anchors' own SFT paths.

Every run is one process on the same rows (``realistic_data.py``: 6,000 log-normal rows, median
~350 tokens, longest 2,040) and the same random-weight model of a real shape (``common.py``):

- ``ours``: ``Job(model=<folder>, dataset=<jsonl>, train={...}).run(provider="local")``, the
  product's own entry: validation, bundle, the local provider, the agent, the trainer, the
  adapter pulled back verified. Step times come from the agent's ``step`` events (each stamped
  when the GPU finished that step).
- ``unsloth`` / ``vanilla``: ``anchor_sft.py`` (Unsloth's ``FastLanguageModel`` + TRL
  ``SFTTrainer``; transformers + bitsandbytes + peft + TRL ``SFTTrainer``).

Reported per run: steady-state tokens/s (median step after ``WARMUP`` steps), tokens/s over the
whole run (first step included), seconds from the start (``Job.run`` or process start) to the
end of the first step, and peak allocated / reserved GPU memory.

    python benchmarks/real_path.py [--only a,b] [--budget-s 540] [--report]

Results merge into ``results/real_path.json`` after every run; runs already there are skipped,
so a second call finishes the queue (``--rerun`` measures again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "real_path.json"
WARMUP = 5
STEPS = 30
CAP = 24.0

# key -> (config, stack, model, dataset kind, settings). Priority order.
RUNS: list[tuple[str, str, str, str, str, dict[str, Any]]] = [
    ("a/ours", "a", "ours", "llama-3-8b", "text", {"packing": True, "micro_batch_size": 4}),
    ("a/unsloth", "a", "unsloth", "llama-3-8b", "text", {"packing": True, "micro_batch": 4, "grad_ckpt": "off"}),
    ("d/ours", "d", "ours", "llama-3-8b", "text", {"packing": False}),
    ("d/unsloth", "d", "unsloth", "llama-3-8b", "text", {"packing": False, "micro_batch": 4, "grad_ckpt": "off"}),
    ("b/ours", "b", "ours", "llama-3-8b", "text", {"packing": True, "max_gpu_memory_gib": CAP}),
    # Lever-finding variants of (b), never an entry: micro-batch 4 under the cap (more layers
    # recomputed, half the host work per token), and the default with steps 10-12 profiled.
    ("b/ours-mb4", "b-lever", "ours", "llama-3-8b", "text", {"packing": True, "max_gpu_memory_gib": CAP, "micro_batch_size": 4}),
    ("b/ours-prof", "b-lever", "ours", "llama-3-8b", "text", {"packing": True, "max_gpu_memory_gib": CAP, "profile": "10:12"}),
    ("b/unsloth-mb2", "b", "unsloth", "llama-3-8b", "text", {"packing": True, "micro_batch": 2, "grad_ckpt": "off", "mem_cap": CAP}),
    # Micro-batch 1: half of mb2's activations, far from the cap (mb2 reserves 23.2 of 24 GiB).
    ("b/unsloth-mb1", "b", "unsloth", "llama-3-8b", "text", {"packing": True, "micro_batch": 1, "grad_ckpt": "off", "mem_cap": CAP}),
    ("b/unsloth-ckpt", "b", "unsloth", "llama-3-8b", "text", {"packing": True, "micro_batch": 4, "grad_ckpt": "unsloth", "mem_cap": CAP}),
    ("c/ours", "c", "ours", "llama-3-8b", "text", {"packing": True, "micro_batch_size": 4, "gradient_checkpointing": "offload"}),
    ("c/ours-mb2", "c", "ours", "llama-3-8b", "text", {"packing": True, "micro_batch_size": 2, "gradient_checkpointing": "offload"}),
    ("chat/ours", "chat", "ours", "llama-3-8b", "chat", {}),
    ("parity/ours", "parity", "ours", "llama-3.2-3b", "text", {"packing": True, "micro_batch_size": 2, "max_seq_len": 1024, "steps": 100, "lr": 1e-4}),
    ("parity/vanilla", "parity", "vanilla", "llama-3.2-3b", "text", {"packing": True, "micro_batch": 2, "max_len": 1024, "steps": 100, "lr": 1e-4, "grad_ckpt": "on"}),
]  # fmt: skip


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "unsloth", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def data_file(kind: str) -> Path:
    from benchmarks.common import models_root
    from benchmarks.realistic_data import chat_rows, text_rows, write_jsonl

    path = models_root() / f"rows-{kind}.jsonl"
    if not path.is_file():
        rows = text_rows(6000, seed=0) if kind == "text" else chat_rows(6000, seed=0)
        write_jsonl(rows, path)
    return path


def _steady(step_s: list[float], step_tokens: list[int]) -> float | None:
    rates = [n / t for n, t in zip(step_tokens[WARMUP:], step_s[WARMUP:], strict=True) if t > 0]
    return statistics.median(rates) if rates else None


def run_ours(model: str, kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One job through the product's entry; returns its measurements."""
    os.environ["LORABURST_HOME"] = tempfile.mkdtemp(prefix="lb-home-")
    # LORABURST_PROFILE_STEPS=FIRST:LAST (in the caller's environment) traces those steps of
    # the real run (remote/training/profiling.py); the summary rides in this run's record.
    profile_dir = Path(tempfile.mkdtemp(prefix="lb-prof-"))
    os.environ["LORABURST_PROFILE_DIR"] = str(profile_dir)
    from loraburst import Job
    from loraburst._state.home import runs_dir

    from benchmarks.common import ensure_checkpoint

    s = dict(settings)
    if "profile" in s:  # this run only: the agent reads it from the environment it inherits
        os.environ["LORABURST_PROFILE_STEPS"] = s.pop("profile")
    folder = ensure_checkpoint(model, layers=s.pop("layers", None))
    steps = s.pop("steps", STEPS)
    lr = s.pop("lr", 2e-4)
    train = {"max_steps": steps, "max_seq_len": 2048, "learning_rate": lr,
             "save_every_steps": None, "warmup_ratio": 0.1, **s}  # fmt: skip
    t0 = time.time()
    job = Job(str(folder), data_file(kind), train=train, name="bench",
              output_dir=tempfile.mkdtemp(prefix="lb-out-"))  # fmt: skip
    result = job.run(provider="local", progress=False, cache=False)
    wall = time.time() - t0
    events = [
        json.loads(x)
        for x in (runs_dir() / result.job_id / "events.jsonl").read_text().splitlines()
    ]
    steps_ev = [e for e in events if e["kind"] == "step"]
    begin = next(e["ts"] for e in events if e["kind"] == "training")
    times = [
        b["t"] - a["t"]
        for a, b in zip([{"t": begin, "tokens": 0}] + steps_ev, steps_ev, strict=False)
    ]
    tokens = [
        b["tokens"] - a["tokens"]
        for a, b in zip([{"tokens": 0}] + steps_ev, steps_ev, strict=False)
    ]
    m = result.metrics
    pick = {
        k: next((e for e in events if e["kind"] == k), None)
        for k in ("loading", "data", "settings", "fastpath", "training", "done")
    }
    return {
        "stack": "ours",
        "status": result.status,
        "step_s": times,
        "step_tokens": tokens,
        "losses": m.get("losses"),
        "steady_tok_s": _steady(times, tokens),
        "run_tok_s": steps_ev[-1]["tokens"] / (steps_ev[-1]["t"] - begin),
        "to_first_step_s": steps_ev[0]["t"] - t0,
        "wall_s": wall,
        "peak_alloc_gib": m.get("peak_vram_gb"),
        "peak_reserved_gib": m.get("peak_vram_reserved_gb"),
        "durations": result.durations,
        "settings": settings,
        "events": pick,
        **(
            {"profile": json.loads((profile_dir / "profile.json").read_text())}
            if (profile_dir / "profile.json").is_file()
            else {}
        ),
    }


def run_anchor(stack: str, model: str, kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.common import ensure_checkpoint

    s = dict(settings)
    folder = ensure_checkpoint(model, layers=s.pop("layers", None))
    out = Path(tempfile.mkdtemp()) / "anchor.json"
    cmd = [sys.executable, str(HERE / "anchor_sft.py"), "--stack", stack, "--model", str(folder),
           "--data", str(data_file(kind)), "--steps", str(s.pop("steps", STEPS)),
           "--micro-batch", str(s.pop("micro_batch", 4)), "--grad-ckpt", s.pop("grad_ckpt", "off"),
           "--max-len", str(s.pop("max_len", 2048)), "--lr", str(s.pop("lr", 2e-4)), "--out", str(out)]  # fmt: skip
    if s.pop("packing", False):
        cmd.append("--packing")
    if "mem_cap" in s:
        cmd += ["--mem-cap-gib", str(s.pop("mem_cap"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        return {"stack": stack, "error": (proc.stdout + proc.stderr)[-3000:], "settings": settings}
    raw = json.loads(out.read_text())
    raw["steady_tok_s"] = _steady(raw["step_s"], raw["step_tokens"])
    raw["run_tok_s"] = sum(raw["step_tokens"]) / sum(raw["step_s"]) if raw["step_s"] else None
    return raw


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}


def _save(doc: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _entries(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per comparison: ours against the anchor's fastest run that fits the same cap."""
    date = datetime.date.today().isoformat()
    out = []
    for config in ("a", "b", "c", "d", "e", "parity"):
        ours = runs.get(f"{config}/ours") if config != "e" else runs.get("a/ours")
        if not ours or ours.get("error"):
            continue
        anchors = [
            (k, r)
            for k, r in runs.items()
            if k.startswith(f"{config}/") and r.get("stack") != "ours" and not r.get("error")
        ]
        if config == "c":
            anchors = [
                (k, r)
                for k, r in runs.items()
                if r.get("stack") == "unsloth" and not r.get("error")
            ]
            anchors = sorted(anchors, key=lambda kr: kr[1]["peak_alloc_gib"])[:1]  # its leanest
        if config == "e":
            anchors = [(k, r) for k, r in runs.items() if k == "a/unsloth"]
        if not anchors:
            continue
        if config == "parity":
            key, anchor = anchors[0]
            tail = lambda xs: statistics.fmean(xs[-10:])  # noqa: E731
            mine, theirs = tail(ours["losses"]), tail(anchor["losses"])
            out.append({"config": "parity", "ours_final_loss": mine, "anchor_final_loss": theirs,
                        "ratio": mine / theirs, "anchor": key, "date": date})  # fmt: skip
            continue
        field = "to_first_step_s" if config == "e" else "steady_tok_s"
        key, anchor = max(anchors, key=lambda kr: kr[1].get("steady_tok_s") or 0)
        ratio = (anchor[field] / ours[field]) if config == "e" else (ours[field] / anchor[field])
        out.append({
            "config": config, "ours_tok_s": ours.get("steady_tok_s"),
            "ours_run_tok_s": ours.get("run_tok_s"), "anchor_tok_s": anchor.get("steady_tok_s"),
            "anchor_run_tok_s": anchor.get("run_tok_s"), "anchor": f"{key} {anchor.get('settings')}",
            "ratio": ratio, "ours_peak_gib": ours.get("peak_alloc_gib"),
            "anchor_peak_gib": anchor.get("peak_alloc_gib"),
            "ours_to_first_step_s": ours.get("to_first_step_s"),
            "anchor_to_first_step_s": anchor.get("to_first_step_s"),
            "mem_cap_gib": CAP if config == "b" else None, "date": date,
        })  # fmt: skip
    return out


def report(doc: dict[str, Any]) -> None:
    print("| run | steady tok/s | run tok/s | to 1st step s | peak alloc GiB | reserved GiB |")
    print("|---|---|---|---|---|---|")
    for key, r in doc["runs"].items():
        if r.get("error"):
            print(f"| {key} | error: {r['error'][-200:]!r} | | | | |")
            continue
        f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
        print(f"| {key} | {f(r.get('steady_tok_s'))} | {f(r.get('run_tok_s'))} | "
              f"{f(r.get('to_first_step_s'), 1)} | {f(r.get('peak_alloc_gib'), 1)} | "
              f"{f(r.get('peak_reserved_gib'), 1)} |")  # fmt: skip
    for e in doc.get("entries", []):
        print(json.dumps(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--call", default=None, help="a label for this device call, kept per run")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, its JSON to --out
        key, config, stack, model, kind, settings = next(r for r in RUNS if r[0] == args.one)
        raw = (
            run_ours(model, kind, settings)
            if stack == "ours"
            else run_anchor(stack, model, kind, settings)
        )
        assert args.out is not None
        args.out.write_text(json.dumps(raw))
        return
    doc = _load()
    if args.report:
        report(doc)
        return
    t_end = time.time() + args.budget_s
    only = [x for x in args.only.split(",") if x]
    doc.setdefault("versions", _versions())
    # In the order --only names them (what matters most first, while the budget lasts).
    order = sorted(RUNS, key=lambda r: min(
        (i for i, x in enumerate(only) if x in (r[0], r[1])), default=len(only)))  # fmt: skip
    for key, config, *_ in order:
        if only and config not in only and key not in only:
            continue
        if key in doc["runs"] and not doc["runs"][key].get("error") and not args.rerun:
            continue
        if time.time() > t_end:
            print(f"budget spent before {key}", flush=True)
            break
        from benchmarks.common import run_child

        raw = run_child(__file__, key, t_end)
        raw["call"] = args.call or datetime.datetime.now().isoformat(timespec="minutes")
        if key in doc["runs"]:  # measured again: the earlier run stays on record
            old = doc["runs"][key]
            doc.setdefault("superseded", {})[f"{key}@{old.get('call', 'earlier')}"] = old
        doc["runs"][key] = raw
        doc["entries"] = _entries(doc["runs"])
        doc["date"] = datetime.date.today().isoformat()
        _save(doc)
        print(
            f"{key}: {raw.get('steady_tok_s') or raw.get('error', '')[-600:]} ({raw['elapsed_s']} s)",
            flush=True,
        )
    report(doc)


if __name__ == "__main__":
    main()
