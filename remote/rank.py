"""One rank of a multi-GPU run: ``torchrun --nproc_per_node N -m loraburst.remote.rank WORKDIR``.

The agent starts torchrun when the instance has more than one GPU; every rank runs the trainer
(:func:`..trainer.run`). Rank 0 reports (``state.json``, ``events.jsonl``); the others are
silent. A rank stops at the next step when the agent writes its stop reason
(:data:`~.protocol.RANK_STOP_FILE`) or when the agent itself is gone; torchrun ends every rank
when one fails. Standard library only until the trainer runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .agent import Reporter
from .protocol import ENV_AGENT_PID, RANK_STOP_FILE, error_dict, pid_alive

__all__ = ["QuietReporter", "leave", "main"]


class QuietReporter(Reporter):
    """A rank other than 0: asked whether to stop like rank 0, but writes nothing."""

    def update(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self.state, key, value)

    def event(self, kind: str, **fields: Any) -> None:
        return None


def stop_source(workdir: Path) -> Any:
    """Why to stop: the agent's reason in its stop file, or that the agent is gone."""
    agent = int(os.environ.get(ENV_AGENT_PID, "0") or 0)
    path = workdir / RANK_STOP_FILE

    def reason() -> str | None:
        try:
            return path.read_text().strip() or "stop requested"
        except FileNotFoundError:
            pass
        if agent and not pid_alive(agent):
            return "agent gone"
        return None

    return reason


def main(argv: list[str] | None = None) -> int:
    """Run this rank's share of the job in ``WORKDIR``; 0 on success, 1 on failure."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun ... -m loraburst.remote.rank WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(args[0]).resolve()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    kind = Reporter if main_rank else QuietReporter
    reporter = kind(workdir, stop_source=stop_source(workdir))
    code = 0
    try:
        from .trainer import run as train

        train(workdir, reporter)
        _leave_group()  # only after success: a failed rank's peers may be gone
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        if main_rank:
            reporter.update(phase="failed", error=error_dict(exc))
            reporter.event("failed", error=error_dict(exc))
        code = 1
    finally:
        sys.stdout.flush()
    return code


def _leave_group() -> None:
    """Destroy the process group (torch prints a warning at exit otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End the rank's process with ``code``, skipping the interpreter's teardown.

    A rank that finished has its work on disk (rank 0 sealed it; the others' share went through
    the collectives) and its process group destroyed; one that failed is ended with the rest by
    torchrun either way. What teardown would still run are the destructors of the collective
    backend's C++ objects that Python still references (FSDP's device mesh holds its groups): a
    gloo worker thread freeing a tensor after the interpreter is gone aborts the rank ("terminate called without an active exception", SIGABRT), and
    torchrun then ends every rank and fails a job that had finished. ``os._exit`` skips it;
    only buffered output is flushed first, which is all it would lose.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to keep
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
