"""One real job through the whole local flow on a CUDA GPU: bundle -> agent -> trainer with the
fast path (plan + optimize) -> adapter pulled back and verified.

Run on the H200 (see RESULTS.md): ``python benchmarks/gpu_smoke.py OUT.json``. It builds a small
random-weight Llama with a tokenizer trained on the sample data (no hub), trains it with NF4 QLoRA,
and records the agent's fast-path report, the losses and tokens/s.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> int:
    import os

    os.environ.setdefault("LORABURST_HOME", tempfile.mkdtemp(prefix="lb-home-"))
    from loraburst import Job
    from loraburst.testing import make_tiny_model

    data = ROOT / "examples" / "data" / "chat.jsonl"
    texts = [
        m["content"]
        for line in data.read_text().splitlines()
        if line.strip()
        for m in json.loads(line)["messages"]
    ]
    model = make_tiny_model(
        Path(tempfile.mkdtemp()) / "m",
        texts,
        hidden_size=512,
        layers=8,
        heads=8,
        kv_heads=4,
        intermediate=1536,
        vocab_size=2048,
    )
    t0 = time.time()
    job = Job(
        str(model),
        data,
        output_dir=Path(tempfile.mkdtemp()) / "out",
        name="gpu-smoke",
        train={"max_steps": 60, "learning_rate": 2e-3, "max_seq_len": 256, "save_every_steps": 30},
    )
    result = job.run(provider="local", progress=False)
    run_dir = Path(os.environ["LORABURST_HOME"]) / "runs" / result.job_id
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    fast = next((e for e in events if e["kind"] == "fastpath"), None)
    settings = next((e for e in events if e["kind"] == "settings"), None)
    m = result.metrics
    report = {
        "status": result.status,
        "wall_s": round(time.time() - t0, 1),
        "first_loss": m["first_loss"],
        "final_loss": m["final_loss"],
        "steps": m["steps"],
        "tokens_per_s": m["tokens_per_s"],
        "peak_vram_gb": m.get("peak_vram_gb"),
        "device": m.get("device"),
        "fastpath": fast,
        "settings": settings,
    }
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if result.status == "succeeded" and m["final_loss"] < m["first_loss"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
