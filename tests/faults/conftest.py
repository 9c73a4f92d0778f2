"""The fault suite's summary: faults injected, jobs completed, instances leaked, adapters lost.

Each case calls ``record(...)``; at the end of the session the table is printed and its last
line is ``leaked=N lost=M`` (``leaked=0 lost=0`` when every promise held).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: str
    fault: str
    completed: bool
    leaked: int
    lost: int


RESULTS: list[Outcome] = []


@pytest.fixture
def record() -> Callable[..., None]:
    def add(case: str, fault: str, *, completed: bool, leaked: int, lost: int) -> None:
        RESULTS.append(Outcome(case, fault, completed, leaked, lost))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault injection summary")
    tr.write_line(f"{'case':<34} {'fault':<44} {'completed':>9} {'leaked':>6} {'lost':>4}")
    for r in RESULTS:
        tr.write_line(f"{r.case:<34} {r.fault:<44} {str(r.completed):>9} {r.leaked:>6} {r.lost:>4}")
    tr.write_line(
        f"faults injected={len(RESULTS)} jobs completed={sum(r.completed for r in RESULTS)}"
    )
    tr.write_line(f"leaked={sum(r.leaked for r in RESULTS)} lost={sum(r.lost for r in RESULTS)}")
