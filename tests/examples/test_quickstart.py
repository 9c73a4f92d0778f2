"""The quickstart runs as a user runs it (`python examples/quickstart.py`) and learns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.examples._copy import run_copy


@pytest.mark.slow
def test_quickstart_trains_and_answers(tmp_path: Path) -> None:
    ex, out = run_copy(tmp_path, "quickstart.py", "quickstart.yaml")
    loss = re.search(r"loss:\s+([\d.]+) -> ([\d.]+) over (\d+) steps", out)
    assert loss, out
    first, final, steps = float(loss[1]), float(loss[2]), int(loss[3])
    assert steps == 300 and final < first / 4  # the loss visibly falls
    assert str(ex / "outputs" / "quickstart") in out  # the verified adapter's folder
    evals = re.search(r"eval loss: base ([\d.]+) -> tuned ([\d.]+)", out)
    assert evals and float(evals[2]) < float(evals[1])  # it helped, measured before teardown
    report = re.search(r"report:\s+(\S+)", out)
    assert report and Path(report[1]).is_file() and Path(report[1]).name == "report.html"
    assert "Tokyo" in out.split("A:", 1)[1]
