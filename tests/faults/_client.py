"""A client process the fault tests can SIGKILL or SIGINT: runs one job on the RunPod emulator.

Usage: python -m tests.faults._client MODEL_DIR OUT_DIR MAX_STEPS [GRACE_S]
(``LORABURST_HOME``, ``LORABURST_RUNPOD_BASE_URL`` and ``RUNPOD_API_KEY`` come from the env.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from loraburst import JobCancelledError
from loraburst._lifecycle.attempt import Attempt

from tests.conftest import sample_job


def main(argv: list[str]) -> int:
    model, out, steps = argv[0], argv[1], int(argv[2])
    if len(argv) > 3:
        Attempt.heartbeat_grace_s = float(argv[3])
    Attempt.poll_s = 0.3
    job = sample_job(Path(model), Path(out), "victim", max_steps=steps, save_every_steps=5)
    try:
        result = job.run(provider="runpod", progress=False)
    except JobCancelledError as exc:
        print(f"CANCELLED {exc}", flush=True)
        return 130
    print(f"DONE {result.job_id} {result.status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
