"""Text from users, providers and instances is shown verbatim, never parsed as rich markup.

``[/x]`` in a path or a message used to crash the CLI with a MarkupError (after training, and
then `loraburst ls` failed for that home every time), and ``[a-z0-9]`` vanished from messages.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from loraburst import Job
from loraburst._cost.estimate import Estimate, EstimateRow
from loraburst._progress import ProgressView
from loraburst._state.ledger import Ledger
from loraburst.remote.protocol import State
from rich.console import Console

from tests.conftest import ROOT, SAMPLE_DATA

TRICKY = "[/x][bold]b[/bold][red"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # COLUMNS: wide enough that rich does not wrap the paths the tests look for.
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "loraburst._cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def _bracketed_dir(root: Path) -> Path:
    # A path holding "[/x]" is a folder "a[" with an entry "x]..." inside.
    folder = root / "a[" / "x][bold]b[" / "bold][red"
    folder.mkdir(parents=True)
    return folder


def test_validate_prints_a_bracketed_job_path_verbatim(tmp_path: Path) -> None:
    folder = _bracketed_dir(tmp_path)
    job = folder / "job.yaml"
    job.write_text(f"model: org/model\ndataset: {SAMPLE_DATA}\n")
    res = _cli("validate", str(job))
    assert res.returncode == 0, res.stderr
    assert f"valid: {job}:" in res.stdout
    missing = folder / "nope.yaml"
    res = _cli("validate", str(missing))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"cannot read job file {missing}" in res.stderr


def test_bracketed_text_in_an_error_is_shown_not_eaten(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: org/model\ndataset: {SAMPLE_DATA}\nname: Bad_Name\n")
    res = _cli("validate", str(job))
    assert res.returncode == 2
    assert "^[a-z0-9][a-z0-9-]{0,39}$" in res.stderr  # was shown as '^{0,39}$'


def test_ls_keeps_working_for_a_home_with_bracketed_rows() -> None:
    ledger = Ledger()
    ledger.create_job("j-1", name="j", spec_json="{}", cache_key=None, bundle_sha256=None)
    ledger.update_job("j-1", status="failed", adapter_path=f"/out/{TRICKY}/adapter", gpu=TRICKY)
    ledger.record_instance(
        "lb-j-1-1",
        job_id="j-1",
        attempt=1,
        provider="runpod",
        gpu=TRICKY,
        price_per_hour=1.0,
        billing_increment_s=1,
    )
    ledger.update_instance("lb-j-1-1", state="terminated", provider_id=TRICKY)
    for _ in range(2):  # it used to fail on every call, not only the first
        res = _cli("ls")
        assert res.returncode == 0, res.stderr
        assert f"/out/{TRICKY}/adapter" in res.stdout
        assert res.stdout.count(TRICKY) == 3  # job gpu, adapter, instance id


def test_run_prints_a_bracketed_adapter_path(tmp_path: Path) -> None:
    """The cache-hit path of `run`: the same print that crashed after a paid run."""
    out = _bracketed_dir(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"model: org/model\ndataset: {SAMPLE_DATA}\noutput_dir: {out}\n")
    job = Job.from_yaml(job_file)
    adapter = out / "j-1" / "adapter"
    adapter.mkdir(parents=True)
    ledger = Ledger()
    ledger.create_job(
        "j-1", name=None, spec_json="{}", cache_key=job.cache_key(), bundle_sha256=None
    )
    ledger.update_job("j-1", status="succeeded", adapter_path=str(adapter), metrics_json="{}")
    res = _cli("run", str(job_file))
    assert res.returncode == 0, res.stderr
    assert f"cached: adapter at {adapter}" in res.stdout


def test_progress_messages_and_the_agents_phase_are_plain_text() -> None:
    view = ProgressView("job", enabled=True)
    view._console = Console(file=io.StringIO(), width=400)
    with view:
        view.message(f"runpod API trouble, will retry: HTTP 500 {TRICKY}")
        view.update(State(phase=TRICKY, step=1, total_steps=2), 0.5)
    text = view._console.file.getvalue()  # type: ignore[attr-defined]
    assert f"HTTP 500 {TRICKY}" in text and f"step 1/2 {TRICKY}" in text


def test_estimate_table_shows_provider_text_verbatim() -> None:
    row = EstimateRow(
        provider="runpod",
        gpu=TRICKY,
        gpu_count=1,
        fits=True,
        peak_vram_gb=10.0,
        vram_gb=24.0,
        micro_batch_size=4,
        gradient_checkpointing=False,
        tokens_per_s=1000.0,
        train_s=60.0,
        setup_s=60.0,
        total_s=120.0,
        price_per_hour=1.0,
        price_source="api",
        billing_increment_s=1,
        cost_usd=0.1,
        cost_low_usd=0.05,
        cost_high_usd=0.2,
        note=f"offer {TRICKY}",
    )
    est = Estimate(
        rows=[row], model=f"org/{TRICKY}", tokens=10, tokens_exact=False, steps=1, notes=[TRICKY]
    )
    console = Console(file=io.StringIO(), width=400)
    console.print(est)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert text.count(TRICKY) == 4
