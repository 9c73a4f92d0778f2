"""Fine-tune on RunPod, fall back to Lambda, then to this machine; see the price first.

    export RUNPOD_API_KEY=...        # and LAMBDA_API_KEY for the fallback
    python examples/runpod.py --model Qwen/Qwen2.5-0.5B-Instruct --max-cost 2

Keys (and, to reach another endpoint, ``LORABURST_RUNPOD_BASE_URL`` /
``LORABURST_LAMBDA_BASE_URL``) come from the environment; nothing here names a secret.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loraburst import Job

DATA = Path(__file__).resolve().parent / "data" / "chat.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--max-cost", type=float, default=2.0, help="dollar cap for the run")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args()

    if not any(os.environ.get(k) for k in ("LORABURST_RUNPOD_API_KEY", "RUNPOD_API_KEY")):
        print(
            "RUNPOD_API_KEY is not set: nothing can be rented. Set it (and LAMBDA_API_KEY "
            "for the fallback) and run again."
        )
        return 2

    job = Job(
        args.model,
        args.dataset,
        output_dir=args.output_dir,
        name="runpod-example",
        train={"max_steps": args.max_steps, "micro_batch_size": 4, "max_seq_len": 256},
    )
    has_lambda = any(os.environ.get(k) for k in ("LORABURST_LAMBDA_API_KEY", "LAMBDA_API_KEY"))
    chain = ["runpod", "lambda", "local"] if has_lambda else ["runpod", "local"]
    print(job.validate().stats.describe())
    print(job.estimate(providers=chain))

    result = job.run(provider=chain, max_cost=args.max_cost)
    print(f"{result.status} on {result.provider} {result.gpu}: ${result.cost_usd:.4f}")
    print(f"adapter: {result.adapter_path and result.adapter_path.resolve()}")
    for attempt in result.attempts:
        print(f"  tried {attempt.provider} {attempt.gpu}: {attempt.outcome}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
