"""The multi-GPU trainer's CUDA path, rehearsed on one GPU: FSDP-QLoRA and DDP through torchrun.

Two GPUs are their own issue (the ``nvidia-h200-x2`` kind); this checks on one H200 what a CPU
cannot: that Trainer (accelerate) really sets up FSDP over NF4 weights stored in bf16, trains
with a finite, falling loss, and hands back one full adapter that ``PeftModel`` loads; and that
the fast path runs under DDP's wrapper. Each strategy runs as one rank
(``torchrun --nproc_per_node 1 -m loraburst.remote.rank``) with ``train.distributed`` named, on a
random-weight Llama with a tokenizer trained on the sample data (no hub).

Run: ``python benchmarks/multi_gpu_h200.py OUT.json`` (``benchmarks/run_h200.sh`` sets up the
packages). Results: ``benchmarks/results/multi_gpu_h200.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "chat.jsonl"


def _workdir(root: Path, model: Path, distributed: str) -> Path:
    from loraburst import JobSpec

    workdir = root / distributed.replace("+", "_")
    bundle = workdir / "bundle"
    (bundle / "data").mkdir(parents=True)
    shutil.copy(DATA, bundle / "data" / "train.jsonl")
    train = {"max_steps": 12, "micro_batch_size": 2, "learning_rate": 1e-3, "max_seq_len": 256,
             "warmup_ratio": 0.0, "save_every_steps": 6, "distributed": distributed}  # fmt: skip
    spec = JobSpec(model=str(model), dataset="data/train.jsonl", train=train).model_dump(
        mode="json"
    )
    doc = {"protocol_version": 1, "job_id": "mg", "data_format": "messages", "spec": spec}
    (bundle / "spec.json").write_text(json.dumps(doc))
    code = bundle / "code" / "loraburst"
    shutil.copytree(ROOT / "remote", code / "remote", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "__init__.py").write_text('"""Bundled loraburst agent code."""\n')
    return workdir


def _run(workdir: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{workdir / 'bundle' / 'code'}:{os.environ.get('PYTHONPATH', '')}",
    }
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "loraburst.remote.rank", str(workdir)],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    events = [json.loads(x) for x in (workdir / "events.jsonl").read_text().splitlines() if x]
    out: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    out["events"] = {e["kind"]: e for e in events if e["kind"] in ("distributed", "fastpath",
                                                                   "settings", "failed", "done")}  # fmt: skip
    if proc.returncode != 0:
        out["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
        return out
    metrics = json.loads((workdir / "metrics.json").read_text())
    out.update({k: metrics.get(k) for k in ("losses", "tokens_per_s", "peak_vram_gb", "steps")})
    out["adapter_files"] = sorted(p.name for p in (workdir / "adapter").iterdir())
    out["peft_loads"] = _peft_loads(workdir)
    return out


def _peft_loads(workdir: Path) -> bool:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    doc = json.loads((workdir / "bundle" / "spec.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(doc["spec"]["model"], dtype=torch.bfloat16)
    tuned = PeftModel.from_pretrained(base, str(workdir / "adapter")).cuda()
    logits = tuned(input_ids=torch.tensor([[1, 2, 3, 4]], device="cuda")).logits
    return bool(torch.isfinite(logits).all())


def main(out: Path) -> int:
    os.environ.setdefault("LORABURST_HOME", tempfile.mkdtemp(prefix="lb-home-"))
    from loraburst.testing import make_tiny_model

    texts = [m["content"] for line in DATA.read_text().splitlines() if line.strip()
             for m in json.loads(line)["messages"]]  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="lb-mg-"))
    model = make_tiny_model(root / "model", texts, hidden_size=512, layers=8, heads=8,
                            kv_heads=4, intermediate=1376, vocab_size=4096)  # fmt: skip
    results = {s: _run(_workdir(root, model, s)) for s in ("fsdp", "ddp")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    for name, r in results.items():
        losses = r.get("losses") or []
        print(name, "rc", r["rc"], "first/last loss", losses[:1], losses[-1:],
              "peft", r.get("peft_loads"), "engine", r["events"].get("distributed"))  # fmt: skip
        if r["rc"]:
            print(r.get("log_tail", ""))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(
        main(
            Path(sys.argv[1])
            if len(sys.argv) > 1
            else ROOT / "benchmarks/results/multi_gpu_h200.json"
        )
    )
