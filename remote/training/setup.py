"""The time before the first step: where it goes, and work done side by side to shorten it.

:class:`Clock` splits the setup into named spans (imports, tokenizer, model, plan, ...) that the
``settings`` event carries as ``setup_s``, so a user who waits for the first step can see what
they wait for. :func:`beside` runs one call on a thread while the caller does something else
(the rows are tokenised while the model loads). :class:`KernelWarmup` compiles the fast path's
kernels in a helper process meanwhile (``fastpath/warm.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["ENV_WARM", "Clock", "KernelWarmup", "Pending", "beside"]

T = TypeVar("T")


class Clock:
    """Consecutive named spans of wall time since the clock was made."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._start = self._last
        self.spans: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Close the span since the previous mark under ``name``."""
        now = time.perf_counter()
        self.spans[name] = now - self._last
        self._last = now

    def report(self) -> dict[str, float]:
        """The spans rounded to centiseconds, and ``total`` since the clock was made."""
        out = {k: round(v, 2) for k, v in self.spans.items()}
        out["total"] = round(time.perf_counter() - self._start, 2)
        return out


class Pending(Generic[T]):
    """A call running on its own thread; :meth:`result` waits for it."""

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args
        self._value: T | None = None
        self._error: BaseException | None = None
        self._took = 0.0
        self._thread = threading.Thread(target=self._run, name="loraburst-beside", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # re-raised on the caller's thread by result()
            self._error = exc
        finally:
            self._took = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the call has returned or raised."""
        self._thread.join()

    def result(self) -> tuple[T, float]:
        """The call's value and the seconds it ran; its exception, raised here.

        Raises:
            BaseException: whatever the call raised, with its own traceback.
        """
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value, round(self._took, 2)  # type: ignore[return-value]


@contextlib.contextmanager
def beside(fn: Callable[..., T], *args: Any) -> Iterator[Pending[T]]:
    """Run ``fn(*args)`` on a thread for the duration of the block.

    The block's own work goes on meanwhile; ``result()`` inside or after it collects the value.
    Leaving the block, by return or exception, waits for the thread, so nothing outlives the
    setup it belongs to. When the block raises, its exception wins over the call's.
    """
    pending = Pending(fn, args)
    try:
        yield pending
    finally:
        pending.wait()


# Set to 0 to compile the fast path's kernels in the trainer only (no helper process).
ENV_WARM = "LORABURST_WARM_KERNELS"


class KernelWarmup:
    """``python -m loraburst.remote.fastpath.warm`` for the model at ``model`` (a folder or a
    hub id), started now; :meth:`finish` waits for it before the memory probe needs the GPU.

    The helper's CUDA context (~0.5 GiB) exists only while the model loads: it has exited, or
    been stopped, before anything measures memory.
    """

    def __init__(self, model: str, dtype: str) -> None:
        self._start = time.perf_counter()
        # The child imports this very package, from where this process found it.
        remote = (__package__ or "loraburst.remote.training").rsplit(".", 1)[0]
        top = sys.modules[remote.split(".")[0]]
        root = str(Path(top.__file__ or ".").parent.parent)
        code = (
            f"import sys; sys.path.insert(0, {root!r}); "
            f"from {remote}.fastpath.warm import main; raise SystemExit(main(sys.argv[1:]))"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, model, dtype],
            # In our process group: whatever ends the trainer's group ends it too; if the trainer
            # fails first, the helper finishes its few seconds of compiling and exits.
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @classmethod
    def start(cls, model: str, dtype: str) -> KernelWarmup | None:
        """A warm-up, unless ``LORABURST_WARM_KERNELS=0`` or the helper cannot start."""
        if os.environ.get(ENV_WARM, "1") == "0":
            return None
        try:
            return cls(model, dtype)
        except OSError:
            return None

    def finish(self, timeout: float = 90.0) -> dict[str, Any]:
        """Wait for the helper (stopping it after ``timeout`` s); what it did, for the
        ``settings`` event: ``warmed`` (kernel names) or ``error``, and ``s`` it ran."""
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return {"error": f"still compiling after {timeout:.0f} s; stopped",
                    "s": round(time.perf_counter() - self._start, 2)}  # fmt: skip
        took = round(time.perf_counter() - self._start, 2)
        lines = out.strip().splitlines()
        if self._proc.returncode == 0 and lines:
            try:
                return {**json.loads(lines[-1]), "s": took}
            except ValueError:
                pass
        tail = (err.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"exit {self._proc.returncode}: {tail}", "s": took}
