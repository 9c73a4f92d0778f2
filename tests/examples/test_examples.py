"""Every example program runs, as a user would run it, against the emulators.

The examples read their keys and endpoints from the environment, as a user's script does; the
tests start the emulators (``tests.fakes``) and hand their keys and URLs to the program in its
environment. The quickstart and preference examples have their own tests; every other program
in ``examples/`` must have a case here, so a new example without a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loraburst.remote.protocol import verify_manifest

from tests.conftest import ROOT
from tests.fakes.lambdalabs import LambdaFake
from tests.fakes.runpod import RunPodFake

EXAMPLES = ROOT / "examples"
TESTED_ELSEWHERE = {"quickstart.py", "preference.py"}
TESTED_HERE = {"runpod.py", "batch.py"}


def _run(
    args: list[str],
    cwd: Path,
    *,
    runpod: RunPodFake | None = None,
    lam: LambdaFake | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python examples/<args>`` with the emulators' keys and URLs in its environment."""
    env = dict(os.environ)
    if runpod is not None:
        env.update(LORABURST_RUNPOD_API_KEY=runpod.api_key, LORABURST_RUNPOD_BASE_URL=runpod.url)
    if lam is not None:
        # The emulator's instances take SSH as root on one loopback port, not ubuntu on 22.
        env.update(
            LORABURST_LAMBDA_API_KEY=lam.api_key,
            LORABURST_LAMBDA_BASE_URL=f"{lam.url}/api/v1",
            LORABURST_LAMBDA_SSH_USER="root",
            LORABURST_LAMBDA_SSH_PORT=str(lam.ssh_port),
        )
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _adapter_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("adapter: "))
    return Path(line.removeprefix("adapter: "))


def test_every_example_program_has_a_test() -> None:
    programs = {p.name for p in EXAMPLES.glob("*.py")}
    assert programs - TESTED_ELSEWHERE == TESTED_HERE


def test_examples_use_only_the_public_api() -> None:
    for program in EXAMPLES.rglob("*.py"):
        text = program.read_text(encoding="utf-8")
        assert "tests." not in text and "loraburst._" not in text, program


def test_runpod_example_without_a_key_says_so(tmp_path: Path) -> None:
    proc = _run([str(EXAMPLES / "runpod.py")], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "RUNPOD_API_KEY is not set" in proc.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_runpod_example_on_the_emulators(
    tmp_path: Path, tiny_model: Path, runpod_fake: RunPodFake, lambda_fake: LambdaFake
) -> None:
    args = ["--model", str(tiny_model), "--max-steps", "3", "--max-cost", "1"]
    proc = _run([str(EXAMPLES / "runpod.py"), *args], tmp_path, runpod=runpod_fake, lam=lambda_fake)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "succeeded on runpod" in proc.stdout
    # The estimate table was printed before anything was rented.
    assert proc.stdout.index("provider  gpu") < proc.stdout.index("succeeded on runpod")
    assert len(runpod_fake.pods) == 1 and not lambda_fake.instances
    assert runpod_fake.running() == [] and lambda_fake.running() == []
    adapter = _adapter_of(proc.stdout)
    assert adapter.is_relative_to(tmp_path / "outputs")
    assert (adapter / "adapter_config.json").is_file()
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    assert verify_manifest(adapter.parent, manifest) == []


@pytest.mark.slow
def test_runpod_example_falls_back_to_lambda(
    tmp_path: Path, tiny_model: Path, runpod_fake: RunPodFake, lambda_fake: LambdaFake
) -> None:
    runpod_fake.faults.capacity = True
    args = [str(EXAMPLES / "runpod.py"), "--model", str(tiny_model), "--max-steps", "2"]
    proc = _run(args, tmp_path, runpod=runpod_fake, lam=lambda_fake)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "succeeded on lambda" in proc.stdout
    assert "tried runpod" in proc.stdout and "capacity" in proc.stdout
    assert not runpod_fake.pods and len(lambda_fake.instances) == 1
    assert runpod_fake.running() == [] and lambda_fake.running() == []
    assert (_adapter_of(proc.stdout) / "adapter_config.json").is_file()


@pytest.mark.slow
def test_batch_example_on_the_emulators(
    tmp_path: Path, tiny_model: Path, runpod_fake: RunPodFake
) -> None:
    args = [str(EXAMPLES / "batch.py"), "--model", str(tiny_model), "--max-steps", "3"]
    proc = _run(args, tmp_path, runpod=runpod_fake)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("succeeded") == 3
    # Three pods rented on the emulator, every one torn down, all within the batch's budget.
    assert len(runpod_fake.pods) == 3 and runpod_fake.running() == []
    assert 0 < sum(runpod_fake.cost(p) for p in runpod_fake.pods) <= 0.5
