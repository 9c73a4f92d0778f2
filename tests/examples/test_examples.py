"""Every example program runs, as a user would run it, against the emulators.

The quickstart and batch examples have their own tests (owned elsewhere); every other program in
``examples/`` must have a case here, so a new example without a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from loraburst.remote.protocol import verify_manifest

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"
TESTED_ELSEWHERE = {"quickstart.py", "batch.py", "preference.py"}
TESTED_HERE = {"runpod.py"}


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _emulator_summary(stdout: str) -> dict[str, object]:
    line = next(x for x in stdout.splitlines() if x.startswith("emulators: "))
    summary: dict[str, object] = json.loads(line.removeprefix("emulators: "))
    return summary


def _adapter_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("adapter: "))
    return Path(line.removeprefix("adapter: "))


def test_every_example_program_has_a_test() -> None:
    programs = {p.name for p in EXAMPLES.glob("*.py")}
    assert programs - TESTED_ELSEWHERE == TESTED_HERE


def test_runpod_example_without_a_key_says_so(tmp_path: Path) -> None:
    proc = _run([str(EXAMPLES / "runpod.py")], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "RUNPOD_API_KEY is not set" in proc.stdout and "--emulators" in proc.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_runpod_example_on_the_emulators(tmp_path: Path) -> None:
    args = [str(EXAMPLES / "runpod.py"), "--emulators", "--max-steps", "3", "--max-cost", "1"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "succeeded on runpod" in proc.stdout
    # The estimate table was printed before anything was rented.
    assert proc.stdout.index("provider  gpu") < proc.stdout.index("succeeded on runpod")
    assert _emulator_summary(proc.stdout) == {
        "lambda_instances": 0,
        "lambda_running": [],
        "runpod_pods": 1,
        "runpod_running": [],
    }
    adapter = _adapter_of(proc.stdout)
    assert adapter.is_relative_to(tmp_path / "outputs")
    assert (adapter / "adapter_config.json").is_file()
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    assert verify_manifest(adapter.parent, manifest) == []


@pytest.mark.slow
def test_runpod_example_falls_back_to_lambda(tmp_path: Path) -> None:
    args = [str(EXAMPLES / "runpod.py"), "--emulators", "--runpod-sold-out", "--max-steps", "2"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "succeeded on lambda" in proc.stdout
    assert "tried runpod" in proc.stdout and "capacity" in proc.stdout
    summary = _emulator_summary(proc.stdout)
    assert summary["runpod_pods"] == 0 and summary["lambda_instances"] == 1
    assert summary["lambda_running"] == [] and summary["runpod_running"] == []
    assert (_adapter_of(proc.stdout) / "adapter_config.json").is_file()
