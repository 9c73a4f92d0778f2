"""A sweep over LoRA rank as one batch under a dollar budget; prints the results table.

    export RUNPOD_API_KEY=...
    python examples/batch.py --model Qwen/Qwen2.5-0.5B-Instruct --budget 0.5
    python examples/batch.py --model examples/outputs/tiny-model --provider local

Every job is placed on the cheapest feasible offer; its estimated upper cost bound is reserved
against the budget before it starts, and what it did not spend is released when it ends, so a
job that could break the budget is never started. The key (and ``LORABURST_RUNPOD_BASE_URL``
for another endpoint) comes from the environment. The CLI twin of this program is
``loraburst batch examples/batch.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraburst import Batch, Job
from rich.console import Console

DATA = Path(__file__).resolve().parent / "data" / "chat.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--provider", default="runpod", help="runpod, lambda, local, ...")
    parser.add_argument("--budget", type=float, default=0.5, help="dollars for the whole batch")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args()

    job = Job(
        args.model,
        DATA,
        output_dir=Path(args.output_dir) / "batch",
        name="rank",
        train={"max_steps": args.max_steps, "micro_batch_size": 4, "max_seq_len": 128},
    )
    batch = Batch.sweep(
        job,
        lora={"r": [8, 16, 32]},
        budget=args.budget,
        max_concurrent=args.max_concurrent,
        provider=args.provider,
    )
    result = batch.run()
    Console(width=140).print(result.table())
    return 0 if result.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
