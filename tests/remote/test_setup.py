"""The setup's clock and the work it runs beside the model load."""

from __future__ import annotations

import threading

import pytest
from loraburst.remote.training import setup


def test_beside_runs_on_another_thread_and_returns_value_and_seconds() -> None:
    started = threading.Event()
    release = threading.Event()

    def work(a: int, b: int) -> tuple[int, str]:
        started.set()
        assert release.wait(10)
        return a + b, threading.current_thread().name

    with setup.beside(work, 2, 3) as pending:
        # The caller goes on while the call is held: it really runs beside the block.
        assert started.wait(10)
        release.set()
        (total, thread), took = pending.result()
    assert total == 5 and thread != threading.current_thread().name
    assert took >= 0.0


def test_beside_raises_the_calls_error_where_the_result_is_collected() -> None:
    def bad() -> None:
        raise ValueError("data/train.jsonl row 7: no text")

    with setup.beside(bad) as pending, pytest.raises(ValueError, match="row 7"):
        pending.result()


def test_beside_waits_for_the_thread_when_the_block_fails_and_the_blocks_error_wins() -> None:
    finished = threading.Event()
    release = threading.Event()

    def slow() -> None:
        assert release.wait(10)
        finished.set()
        raise ValueError("the call's own error")

    with pytest.raises(RuntimeError, match="model load failed"), setup.beside(slow):
        release.set()
        raise RuntimeError("model load failed")
    assert finished.is_set()  # nothing outlives the block


def test_clock_spans_are_consecutive_and_total_covers_them() -> None:
    clock = setup.Clock()
    clock.mark("imports")
    clock.mark("model")
    clock.spans["encode"] = 1.234
    report = clock.report()
    assert list(report) == ["imports", "model", "encode", "total"]
    assert report["encode"] == 1.23
    assert report["total"] >= report["imports"] + report["model"] - 0.02
