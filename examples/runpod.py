"""Fine-tune on RunPod, fall back to Lambda, then to this machine; see the price first.

With a key (``RUNPOD_API_KEY``, and ``LAMBDA_API_KEY`` for the fallback)::

    python examples/runpod.py --model Qwen/Qwen2.5-0.5B-Instruct --max-cost 2

Without one, ``--emulators`` runs the same program against in-process emulators of the RunPod
and Lambda APIs (``tests.fakes``; run from a source checkout). Their "GPUs" are real ``sshd``
processes on this machine, so everything but the GPU is real: SSH, SFTP, the detached agent,
the pull-back and the teardown. The model is then a tiny random Llama built on the spot, since
no model hub is needed or reached::

    python examples/runpod.py --emulators
    python examples/runpod.py --emulators --runpod-sold-out   # watch it fall back to Lambda
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
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--max-cost", type=float, default=2.0, help="dollar cap for the run")
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--emulators", action="store_true", help="no key? use tests.fakes")
    parser.add_argument("--runpod-sold-out", action="store_true", help="(emulators) no capacity")
    args = parser.parse_args()

    has_key = any(os.environ.get(k) for k in ("LORABURST_RUNPOD_API_KEY", "RUNPOD_API_KEY"))
    if not has_key and not args.emulators:
        print(
            "RUNPOD_API_KEY is not set: nothing can be rented. Set it (and LAMBDA_API_KEY for "
            "the fallback), or run with --emulators to try it against local emulators."
        )
        return 2

    with _emulators(args) if args.emulators else contextlib.nullcontext() as fakes:
        from loraburst import Job

        model = fakes["model"] if fakes else args.model
        chain = fakes["chain"] if fakes else ["runpod", "lambda", "local"]
        job = Job(
            model,
            args.dataset,
            output_dir=args.output_dir,
            name="runpod-example",
            train={"max_steps": args.max_steps, "micro_batch_size": 4, "max_seq_len": 256},
        )
        print(job.validate().stats.describe())
        print(job.estimate(providers=["runpod", "lambda", "local"]))

        result = job.run(provider=chain, max_cost=args.max_cost)
        print(f"{result.status} on {result.provider} {result.gpu}: ${result.cost_usd:.4f}")
        print(f"adapter: {result.adapter_path and result.adapter_path.resolve()}")
        for attempt in result.attempts:
            print(f"  tried {attempt.provider} {attempt.gpu}: {attempt.outcome}")
        if fakes:
            summary = {
                "runpod_running": fakes["runpod"].running(),
                "lambda_running": fakes["lambda"].running(),
                "runpod_pods": len(fakes["runpod"].pods),
                "lambda_instances": len(fakes["lambda"].instances),
            }
            print("emulators: " + json.dumps(summary, sort_keys=True))
        return 0 if result.ok else 1


@contextlib.contextmanager
def _emulators(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Start both emulators in this process and point the providers at them via the same
    environment variables a user would set (keys and base URLs)."""
    sys.path.insert(0, str(ROOT))
    from loraburst.testing import make_tiny_model

    from tests.fakes.lambdalabs import LambdaFake
    from tests.fakes.runpod import RunPodFake

    with tempfile.TemporaryDirectory(prefix="lb-emulators-") as tmp:
        folder = Path(tmp)
        runpod = RunPodFake(api_key="rpa_" + secrets.token_hex(16), folder=folder / "runpod")
        runpod.faults.capacity = args.runpod_sold_out
        lam = LambdaFake(api_key="secret_" + secrets.token_hex(16), folder=folder / "lambda")
        runpod.start()
        lam.start()
        os.environ.update(
            LORABURST_RUNPOD_API_KEY=runpod.api_key,
            LORABURST_RUNPOD_BASE_URL=runpod.url,
            LORABURST_LAMBDA_API_KEY=lam.api_key,
            LORABURST_LAMBDA_BASE_URL=f"{lam.url}/api/v1",
        )
        from loraburst.providers.lambdalabs import LambdaProvider

        # Lambda instances take SSH as ubuntu on port 22; the emulator's take it as root on
        # one loopback port, so its provider is built with those (the key and URL still come
        # from the environment above).
        lambda_provider = LambdaProvider(
            ssh_user="root", ssh_port=lam.ssh_port, launch_interval_s=lam.launch_interval_s
        )
        texts = [
            m["content"]
            for line in Path(args.dataset).read_text(encoding="utf-8").splitlines()
            if line.strip()
            for m in json.loads(line)["messages"]
        ]
        try:
            model = make_tiny_model(folder / "tiny-model", texts)
            chain = ["runpod", lambda_provider, "local"]
            yield {"runpod": runpod, "lambda": lam, "model": str(model), "chain": chain}
        finally:
            runpod.stop()
            lam.stop()


if __name__ == "__main__":
    sys.exit(main())
