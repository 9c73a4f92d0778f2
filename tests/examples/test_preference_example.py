"""The preference example runs as a user runs it (`python examples/preference.py`): its pairs
are checked, DPO trains, and the tuned model prefers the right answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.examples._copy import run_copy


@pytest.mark.slow
def test_preference_example_learns_the_preference(tmp_path: Path) -> None:
    # quickstart.py beside it: the preference example tunes the quickstart's tiny model.
    ex, stdout = run_copy(tmp_path, "preference.py", "preference.yaml", "quickstart.py")
    out = " ".join(stdout.split())
    assert "data: 64 pairs (preference)" in out
    margin = re.search(r"margin: ([-\d.]+) -> ([-\d.]+) \(accuracy [\d.]+ -> ([\d.]+)\)", out)
    assert margin, out
    assert float(margin[1]) == 0.0 and float(margin[2]) > 1.0 and float(margin[3]) >= 0.75
    assert str(ex / "outputs" / "preference") in out
    assert "prefers: right answer" in out
