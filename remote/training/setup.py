"""The time before the first step: where it goes, and work done side by side to shorten it.

:class:`Clock` splits the setup into named spans (imports, tokenizer, model, plan, ...) that the
``settings`` event carries as ``setup_s``, so a user who waits for the first step can see what
they wait for. :func:`beside` runs one call on a thread while the caller does something else
(the rows are tokenised while the model loads).

Tried and taken out: compiling the fast path's kernels in a helper process while the model
loads, to fill inductor's on-disk caches before the memory probe needs them. On the H200
(Llama-3-8B, cold machine) the first step came 71 s after ``Job.run`` instead of 45 s: the
helper needed 41 s (its own torch import, compile workers, twelve graphs) and slowed the load it
ran beside (model 15 s instead of 9); the probe saved only 5 s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Clock", "Pending", "beside"]

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
