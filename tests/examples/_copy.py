"""Run an example program from a copy of ``examples/`` in a temporary folder, as a user runs
it, so that what it writes (``outputs/``) lands there and not in the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run_copy(tmp_path: Path, program: str, *files: str) -> tuple[Path, str]:
    """``python examples/<program>`` from a copy holding it, ``files`` and ``data/``; returns
    the copy's folder and the program's stdout (it must exit 0)."""
    ex = tmp_path / "examples"
    ex.mkdir()
    for name in (program, *files):
        shutil.copy(ROOT / "examples" / name, ex / name)
    shutil.copytree(ROOT / "examples" / "data", ex / "data")
    proc = subprocess.run(
        [sys.executable, str(ex / program)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ex, proc.stdout
