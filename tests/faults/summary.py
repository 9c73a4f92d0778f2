"""The fault injection summary's hooks (a pytest plugin, loaded by the root conftest).

``record`` (tests/faults/conftest.py) puts each case's outcome on its test report; this plugin
gathers them from the reports wherever pytest prints the terminal summary: the only process
without xdist, the controller with it (workers send their reports there).
"""

from __future__ import annotations

import dataclasses
import re

import pytest

PROPERTY = "fault_outcome"


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: str
    fault: str
    completed: bool
    leaked: int
    lost: int


RESULTS: list[Outcome] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == PROPERTY:
            RESULTS.append(Outcome(**value))


def _case_order(outcome: Outcome) -> tuple[int, str]:
    # Cases are numbered ("1 client SIGKILL -> attach"): workers finish them in any order.
    m = re.match(r"(\d+)\b", outcome.case)
    return (int(m.group(1)) if m else 10**9, outcome.case)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault injection summary")
    tr.write_line(f"{'case':<34} {'fault':<44} {'completed':>9} {'leaked':>6} {'lost':>4}")
    for r in sorted(RESULTS, key=_case_order):
        tr.write_line(f"{r.case:<34} {r.fault:<44} {str(r.completed):>9} {r.leaked:>6} {r.lost:>4}")
    tr.write_line(
        f"faults injected={len(RESULTS)} jobs completed={sum(r.completed for r in RESULTS)}"
    )
    tr.write_line(f"leaked={sum(r.leaked for r in RESULTS)} lost={sum(r.lost for r in RESULTS)}")
