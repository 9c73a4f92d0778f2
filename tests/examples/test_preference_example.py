"""The preference example runs as a user runs it (`python examples/preference.py`): its pairs
are checked, DPO trains, and the tuned model prefers the right answer."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_preference_example_learns_the_preference(tmp_path: Path) -> None:
    ex = tmp_path / "examples"
    ex.mkdir()
    for name in ("preference.py", "preference.yaml"):
        shutil.copy(ROOT / "examples" / name, ex / name)
    shutil.copytree(ROOT / "examples" / "data", ex / "data")
    proc = subprocess.run(
        [sys.executable, str(ex / "preference.py")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "data: 64 pairs (preference)" in out
    margin = re.search(r"margin: ([-\d.]+) -> ([-\d.]+) \(accuracy [\d.]+ -> ([\d.]+)\)", out)
    assert margin, out
    assert float(margin[1]) == 0.0 and float(margin[2]) > 1.0 and float(margin[3]) >= 0.75
    assert str(ex / "outputs" / "preference") in out
    assert "prefers: right answer" in out
