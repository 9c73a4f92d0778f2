"""A sweep over LoRA rank as one batch under a dollar budget; prints the results table.

    python examples/batch.py                 # against in-process emulators (the default)
    python examples/batch.py --local         # on this machine's GPU or CPU instead
    python examples/batch.py --budget 0.08   # room for one job's bound: one after another
    python examples/batch.py --budget 0.05   # no room for any: all three are skipped

``--emulators`` (the default) starts an emulator of the RunPod API in this process
(``tests.fakes``; run from a source checkout) and points the ``runpod`` provider at it through
the same environment variables a user sets for the real API. Its "GPUs" are real ``sshd``
processes on this machine with a running billing clock: every job is placed on the cheapest
feasible offer, its estimated upper cost bound is reserved against the budget before it starts,
and what it did not spend is released when it ends. The model is a tiny random Llama built on
the spot, so no hub is needed. The CLI twin of this program is ``loraburst batch
examples/batch.yaml`` (local provider).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "chat.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--emulators", action="store_true", help="RunPod emulator (default)")
    where.add_argument("--local", action="store_true", help="this machine instead")
    parser.add_argument("--budget", type=float, default=0.5, help="dollars for the whole batch")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args()

    out = Path(args.output_dir).resolve()
    with contextlib.nullcontext(None) if args.local else _emulators() as fake:
        from loraburst import Batch, Job
        from rich.console import Console

        job = Job(
            str(_tiny_model(out / "tiny-model")),
            DATA,
            output_dir=out / "batch",
            name="rank",
            train={"max_steps": args.max_steps, "micro_batch_size": 4, "max_seq_len": 128},
        )
        batch = Batch.sweep(
            job,
            lora={"r": [8, 16, 32]},
            budget=args.budget,
            max_concurrent=args.max_concurrent,
            provider="local" if args.local else "runpod",
        )
        result = batch.run()
        Console(width=140).print(result.table())
        if fake is not None:
            billed = sum(fake.cost(p.id) for p in fake.pods.values())
            print(
                f"emulators: {len(fake.pods)} pods, {len(fake.running())} running, "
                f"billed ${billed:.4f} of the ${args.budget:.2f} budget"
            )
        return 0 if result.all_ok else 1


def _tiny_model(folder: Path) -> Path:
    """A tiny real Llama with a tokenizer trained on the sample data (built once)."""
    if (folder / "config.json").is_file():
        return folder
    from loraburst.testing import make_tiny_model

    lines = DATA.read_text(encoding="utf-8").splitlines()
    texts = [m["content"] for line in lines if line.strip() for m in json.loads(line)["messages"]]
    return Path(make_tiny_model(folder, texts))


@contextlib.contextmanager
def _emulators() -> Iterator[Any]:
    """Start the RunPod emulator here and point the ``runpod`` provider at it via the
    environment (key and base URL), as a user would for the real API."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.runpod import RunPodFake

    with tempfile.TemporaryDirectory(prefix="lb-emulators-") as tmp:
        fake = RunPodFake(api_key="rpa_" + secrets.token_hex(16), folder=Path(tmp))
        fake.start()
        os.environ.update(LORABURST_RUNPOD_API_KEY=fake.api_key, LORABURST_RUNPOD_BASE_URL=fake.url)
        try:
            yield fake
        finally:
            fake.stop()


if __name__ == "__main__":
    sys.exit(main())
