"""DPO on one H200: our real path against TRL's plain ``DPOTrainer`` on the same pairs and model.

- ``ours``: ``Job(model=<folder>, dataset=<pairs.jsonl>, objective="dpo", ...).run(provider=
  "local")``, the product's entry (validation, bundle, agent, the preference recipe with the
  fast path, the adapter pulled back verified). Step times and tokens come from the agent's
  ``step`` events (each stamped when the GPU finished that step).
- ``trl``: transformers + bitsandbytes NF4 (double quant, bf16 compute) +
  ``prepare_model_for_kbit_training`` + peft LoRA + TRL's ``DPOTrainer`` with ``ref_model=None``
  (the reference is the adapter switched off, as ours), as its docs set up QLoRA DPO.

Same everywhere: the random-weight Llama-3-8B shape of ``common.py``, 2,000 text pairs from
``realistic_data.py``'s word chain (prompt median 150 tokens, answers median 250, so a pair is
~800 tokens with the prompt counted twice), beta 0.1, sigmoid loss, LoRA r 16 on all seven
projections, 4 pairs per step, prompt <= 512 and prompt + answer <= 1024 tokens, 30 steps.
Tokens per step count both sequences of every pair, prompt included (no padding), for both.

Reported per run: steady-state tokens/s (median step after ``WARMUP``), peak allocated and
reserved GPU memory, and for ours the settings the planner chose. Results merge into
``results/dpo_h200.json``; ``--report`` prints the table for ``RESULTS.md``.

    python benchmarks/dpo_h200.py [--only dpo/ours,dpo/trl] [--budget-s 540] [--report]

Not yet run: written for one device call (see ``run_h200.sh`` for the environment it expects).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "dpo_h200.json"
MODEL = "llama-3-8b"
PAIRS = 2000
STEPS = 30
WARMUP = 5
MAX_LEN, MAX_PROMPT = 1024, 512

# key -> (stack, settings). Priority order.
RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("dpo/ours", "ours", {"micro_batch_size": 4}),
    ("dpo/trl", "trl", {"grad_ckpt": True}),
    ("dpo/trl-nockpt", "trl", {"grad_ckpt": False}),
    ("dpo/ours-auto", "ours", {}),
    ("dpo/ours-precompute", "ours", {"micro_batch_size": 4, "reference": "precompute"}),
]


def pairs_file() -> Path:
    """The pairs every run trains on (written once per machine)."""
    from benchmarks.common import models_root
    from benchmarks.realistic_data import text_rows, write_jsonl

    path = models_root() / "pairs-dpo.jsonl"
    if not path.is_file():
        prompts = text_rows(PAIRS, seed=1, median=150, cap=MAX_PROMPT - 2)
        chosen = text_rows(PAIRS, seed=2, median=250, cap=MAX_LEN - MAX_PROMPT - 2)
        rejected = text_rows(PAIRS, seed=3, median=250, cap=MAX_LEN - MAX_PROMPT - 2)
        rows = [{"prompt": p["text"], "chosen": c["text"], "rejected": r["text"]}
                for p, c, r in zip(prompts, chosen, rejected, strict=True)]  # fmt: skip
        write_jsonl(rows, path)
    return path


def _steady(step_s: list[float], step_tokens: list[int]) -> float | None:
    rates = [n / t for n, t in zip(step_tokens[WARMUP:], step_s[WARMUP:], strict=True) if t > 0]
    return statistics.median(rates) if rates else None


def run_ours(settings: dict[str, Any]) -> dict[str, Any]:
    """One DPO job through the product's entry; its measurements."""
    os.environ["LORABURST_HOME"] = tempfile.mkdtemp(prefix="lb-home-")
    from loraburst import Job
    from loraburst._state.home import runs_dir

    from benchmarks.common import ensure_checkpoint

    s = dict(settings)
    objective = {"type": "dpo", "beta": 0.1, "loss_type": "sigmoid",
                 "reference": s.pop("reference", "live"), "max_prompt_len": MAX_PROMPT}  # fmt: skip
    train = {"max_steps": STEPS, "max_seq_len": MAX_LEN, "learning_rate": 5e-6,
             "save_every_steps": None, "warmup_ratio": 0.1, **s}  # fmt: skip
    t0 = time.time()
    job = Job(str(ensure_checkpoint(MODEL)), pairs_file(), objective=objective, train=train,
              lora={"r": 16, "alpha": 32}, name="bench-dpo",
              output_dir=tempfile.mkdtemp(prefix="lb-out-"))  # fmt: skip
    result = job.run(provider="local", progress=False, cache=False)
    events = [json.loads(x) for x in
              (runs_dir() / result.job_id / "events.jsonl").read_text().splitlines()]  # fmt: skip
    steps = [e for e in events if e["kind"] == "step"]
    begin = next(e["ts"] for e in events if e["kind"] == "training")
    marks = [{"t": begin, "tokens": 0}, *steps]
    times = [b["t"] - a["t"] for a, b in zip(marks, steps, strict=False)]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(marks, steps, strict=False)]
    m = result.metrics
    return {
        "stack": "ours", "status": result.status, "settings": settings,
        "step_s": times, "step_tokens": tokens, "steady_tok_s": _steady(times, tokens),
        "losses": m.get("losses"), "reward_margins": m.get("reward_margin_history"),
        "peak_alloc_gib": m.get("peak_vram_gb"), "peak_reserved_gib": m.get("peak_vram_reserved_gb"),
        "micro_batch_size": m.get("micro_batch_size"), "wall_s": time.time() - t0,
        "events": {k: next((e for e in events if e["kind"] == k), None)
                   for k in ("settings", "fastpath", "data", "reference")},
    }  # fmt: skip


class _CountingCollator:
    """TRL's preference collator, counting each batch's real tokens (prompt twice: it is fed
    with the chosen and with the rejected answer) on the host."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens = inner, 0

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        counted = 0
        for key, value in batch.items():
            if key.endswith("attention_mask"):
                counted += int(value.sum()) * (2 if key.startswith("prompt") else 1)
        if not counted:
            # TRL 1.15's collator returns no attention masks (the H200 run of 2026-12-01
            # counted 0): count the tokenised features instead, each sequence capped at
            # max_length as TRL truncates it.
            for f in features:
                prompt = len(f.get("prompt_input_ids", ()))
                for side in ("chosen_input_ids", "rejected_input_ids"):
                    counted += min(MAX_LEN, prompt + len(f.get(side, ())))
        self.tokens += counted
        return batch


def run_trl(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on QLoRA, as its documentation sets it up; its measurements."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer

    from benchmarks.common import ensure_checkpoint

    folder = ensure_checkpoint(MODEL)
    ckpt = bool(settings.get("grad_ckpt", True))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16),
    )  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
    wanted = {
        "output_dir": tempfile.mkdtemp(prefix="trl-dpo-"), "max_steps": STEPS,
        "per_device_train_batch_size": 4, "learning_rate": 5e-6, "warmup_ratio": 0.1,
        "beta": 0.1, "loss_type": "sigmoid", "max_length": MAX_LEN,
        "max_prompt_length": MAX_PROMPT, "max_completion_length": MAX_LEN - MAX_PROMPT,
        "bf16": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "gradient_checkpointing": ckpt, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "disable_tqdm": True, "seed": 42, "precompute_ref_log_probs": False,
    }  # fmt: skip
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    config = DPOConfig(**{k: v for k, v in wanted.items() if k in known})
    data = load_dataset("json", data_files=str(pairs_file()), split="train")
    times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            self.t0, self.n0 = time.time(), counter.tokens

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            times.append(time.time() - self.t0)
            tokens.append(counter.tokens - self.n0)

    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=data,
                         processing_class=tok, callbacks=[Clock()])  # fmt: skip
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {
        "stack": "trl", "settings": settings, "step_s": times, "step_tokens": tokens,
        "steady_tok_s": _steady(times, tokens),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "reward_margins": margins,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3,
    }  # fmt: skip


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def report(doc: dict[str, Any]) -> None:
    """The table for RESULTS.md, and ours against TRL's fastest run."""
    print("| run | steady tok/s | peak alloc GiB | reserved GiB | micro-batch (pairs) |")
    print("|---|---|---|---|---|")
    for key, r in doc["runs"].items():
        if r.get("error"):
            print(f"| {key} | error: {r['error'][-200:]!r} | | | |")
            continue
        f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
        print(f"| {key} | {f(r.get('steady_tok_s'))} | {f(r.get('peak_alloc_gib'), 1)} | "
              f"{f(r.get('peak_reserved_gib'), 1)} | {r.get('micro_batch_size', 4)} |")  # fmt: skip
    ours = doc["runs"].get("dpo/ours", {})
    trl = [r for k, r in doc["runs"].items() if k.startswith("dpo/trl") and not r.get("error")]
    if ours.get("steady_tok_s") and trl:
        best = max(trl, key=lambda r: r.get("steady_tok_s") or 0)
        if not best.get("steady_tok_s"):
            return  # no tokens counted for TRL's runs: no ratio to print
        print(json.dumps({"ours_tok_s": ours["steady_tok_s"], "trl_tok_s": best["steady_tok_s"],
                          "ratio": ours["steady_tok_s"] / best["steady_tok_s"],
                          "ours_peak_gib": ours.get("peak_alloc_gib"),
                          "trl_peak_gib": best.get("peak_alloc_gib"), "trl": best["settings"],
                          "date": doc.get("date")}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:  # a child process: one run, its JSON to --out
        key, stack, settings = next(r for r in RUNS if r[0] == args.one)
        raw = run_ours(settings) if stack == "ours" else run_trl(settings)
        assert args.out is not None
        args.out.write_text(json.dumps(raw))
        return
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    if args.report:
        report(doc)
        return
    t_end = time.time() + args.budget_s
    only = {x for x in args.only.split(",") if x}
    doc.setdefault("versions", _versions())
    for key, _, _ in RUNS:
        if only and key not in only:
            continue
        if key in doc["runs"] and not doc["runs"][key].get("error") and not args.rerun:
            continue
        if time.time() > t_end:
            print(f"budget spent before {key}", flush=True)
            break
        from benchmarks.common import run_child

        raw = run_child(__file__, key, t_end)
        doc["runs"][key] = raw
        doc["date"] = datetime.date.today().isoformat()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"{key}: {raw.get('steady_tok_s') or raw.get('error', '')[-600:]} "
              f"({raw['elapsed_s']} s)", flush=True)  # fmt: skip
    report(doc)


if __name__ == "__main__":
    main()
