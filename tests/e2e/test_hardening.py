"""A careless user and a second terminal, against the RunPod emulator and the local provider,
without training: every output path is checked before anything is rented; a job has one
follower at a time and ``cleanup`` respects it; an instance held for ``attach`` is kept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from loraburst import ConfigError, Job, JobError, LocalStorageError
from loraburst._lifecycle.cleanup import cleanup
from loraburst._lifecycle.owner import claim, client_alive, release
from loraburst._state.home import runs_dir
from loraburst._state.ledger import Ledger
from loraburst.providers import LaunchRequest, Offer

from tests.conftest import SAMPLE_DATA
from tests.fakes.disk import SmallDisk, fill


def _job(model: str, out: Path | str) -> Job:
    return Job(model, SAMPLE_DATA, output_dir=out, name="careless", train={"max_steps": 2})


# --- item 4: every output path before renting ------------------------------------------------


@pytest.mark.parametrize("kind", ["a file", "under a file", "/proc", "read-only"])
def test_an_unusable_output_dir_is_refused_before_any_pod_is_created(
    tmp_path: Path, runpod_fake: Any, runpod_provider: Any, small_disk: SmallDisk, kind: str
) -> None:
    (tmp_path / "taken").write_text("not a folder")
    out = {
        "a file": lambda: tmp_path / "taken",
        "under a file": lambda: tmp_path / "taken" / "out",
        "/proc": lambda: Path("/proc/loraburst-out"),
        "read-only": lambda: small_disk(1 << 20, read_only=True) / "out",
    }[kind]()
    with pytest.raises(ConfigError) as e:
        _job("meta-llama/Llama-3.1-8B", out).run(provider=runpod_provider, progress=False)
    assert "output_dir" in str(e.value) and str(out).split("/out")[0] in str(e.value)
    assert runpod_fake.pods == {}  # nothing was rented
    assert Ledger().jobs() == []


def test_too_little_room_for_the_adapter_is_refused_before_renting(
    runpod_fake: Any, runpod_provider: Any, small_disk: SmallDisk
) -> None:
    out = small_disk(4 << 20)  # an 8B model's r=16 adapter alone is ~170 MB
    with pytest.raises(ConfigError, match=r"has 4\.2 MB free but this job's artifacts need"):
        _job("meta-llama/Llama-3.1-8B", out).run(provider=runpod_provider, progress=False)
    assert runpod_fake.pods == {} and list(out.iterdir()) == []


def test_a_full_home_is_a_local_storage_error_not_a_traceback(
    tmp_path: Path, small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = small_disk(2 << 20)
    monkeypatch.setenv("LORABURST_HOME", str(home))
    fill(home)
    with pytest.raises(LocalStorageError) as e:
        _job("org/model", tmp_path / "out").validate()  # the normalised rows spill to the home
    assert e.value.errno == errno.ENOSPC and "free space" in str(e.value)
    assert [p.name for p in (home / "datasets").iterdir()] == []  # no half-written spill


def test_a_full_disk_under_the_ledger_is_a_local_storage_error(
    small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = small_disk(2 << 20)
    monkeypatch.setenv("LORABURST_HOME", str(home))
    ledger = Ledger()
    ledger.create_job("j", name=None, spec_json="{}", cache_key=None, bundle_sha256=None)
    fill(home)
    with pytest.raises(LocalStorageError) as e:
        for i in range(200):  # until SQLite needs a page it cannot get
            ledger.update_job("j", error="x" * 4000 + str(i))
    assert "ledger" in str(e.value) and "free space" in str(e.value)


# --- item 2: one follower per job, and cleanup respects it ---------------------------------


def test_a_job_has_one_follower_at_a_time() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs_dir() / "j-1").mkdir(parents=True)
        (runs_dir() / "j-1" / "client.pid").write_text(str(sleeper.pid))
        assert client_alive("j-1")
        with pytest.raises(JobError, match=f"already followed by process {sleeper.pid}"):
            claim("j-1")
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    # A claim left by a dead client (SIGKILLed) is taken over, then released.
    claim("j-1")
    assert (runs_dir() / "j-1" / "client.pid").read_text() == str(os.getpid())
    release("j-1")
    assert not (runs_dir() / "j-1" / "client.pid").exists()


def _recorded_pod(job_id: str) -> Ledger:
    """A job with its first attempt's RunPod pod recorded in the ledger (tag lb-<job>-1)."""
    ledger = Ledger()
    ledger.create_job(job_id, name=None, spec_json="{}", cache_key=None, bundle_sha256=None)
    ledger.record_instance(
        f"lb-{job_id}-1",
        job_id=job_id,
        attempt=1,
        provider="runpod",
        gpu="RTX 4090",
        price_per_hour=0.69,
        billing_increment_s=1,
    )
    return ledger


def test_attach_refuses_a_job_another_live_client_follows(
    runpod_fake: Any, runpod_provider: Any
) -> None:
    _recorded_pod("j-2")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs_dir() / "j-2").mkdir(parents=True)
        (runs_dir() / "j-2" / "client.pid").write_text(str(sleeper.pid))
        with pytest.raises(JobError, match="already followed"):
            Job.attach("j-2", providers={"runpod": runpod_provider}, progress=False)
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    assert runpod_fake.pods == {}  # attach touched nothing


def _held_pod(runpod_provider: Any, held_until: float) -> tuple[str, str]:
    offer = Offer("runpod", "RTX 4090", 1, 24, 0.69, "NVIDIA GeForce RTX 4090")
    machine = runpod_provider.launch(LaunchRequest("lb-h-1-1", offer, ""))
    ledger = _recorded_pod("h-1")
    ledger.update_instance("lb-h-1-1", state="held", provider_id=machine.id, held_until=held_until)
    return machine.id, "lb-h-1-1"


def test_cleanup_keeps_an_instance_held_for_attach(runpod_fake: Any, runpod_provider: Any) -> None:
    pod, tag = _held_pod(runpod_provider, time.time() + 3600)
    report = cleanup(providers={"runpod": runpod_provider})
    assert runpod_fake.running() == [pod]
    assert any("held until" in k and "loraburst attach h-1" in k for k in report.kept)
    report = cleanup(providers={"runpod": runpod_provider}, release_held=True)
    assert runpod_fake.running() == [] and report.terminated


def test_cleanup_terminates_a_hold_that_has_ended(runpod_fake: Any, runpod_provider: Any) -> None:
    _held_pod(runpod_provider, time.time() - 1)
    cleanup(providers={"runpod": runpod_provider})
    assert runpod_fake.running() == []


def test_local_write_errors_name_the_errno() -> None:
    from loraburst._state.disk import storage_error

    err = storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "/x/y")
    assert isinstance(err, LocalStorageError) and err.errno == errno.EDQUOT
    assert "/x/y" in str(err) and "quota" in str(err)


@pytest.mark.slow
def test_a_local_job_whose_output_disk_fills_is_finished_by_attach(
    tiny_model: Path, small_disk: SmallDisk
) -> None:
    import json
    import threading

    out = small_disk(8 << 20)
    fillers: list[Path] = []

    def training() -> bool:
        for state in runs_dir().glob("*/state.json"):
            try:
                if json.loads(state.read_text()).get("step", 0) >= 1:
                    return True
            except ValueError:
                pass  # caught mid-write
        return False

    def filler() -> None:
        deadline = time.time() + 120
        while not training() and time.time() < deadline:
            time.sleep(0.1)
        fillers.append(fill(out))

    t = threading.Thread(target=filler, daemon=True)
    t.start()
    job = Job(
        str(tiny_model),
        SAMPLE_DATA,
        output_dir=out,
        name="full",
        train={"max_steps": 12, "micro_batch_size": 4, "max_seq_len": 64, "save_every_steps": 6},
    )
    with pytest.raises(LocalStorageError) as e:
        job.run(provider="local", progress=False)
    t.join(5)
    job_id = e.value.context["job_id"]
    assert f"loraburst attach {job_id}" in str(e.value)
    assert Ledger().job(job_id).status == "held"  # type: ignore[union-attr]
    assert [p.name for p in out.iterdir() if not p.name.startswith(".filler")] == []
    fillers[0].unlink()
    # The user attaches later, from another process, once the agent has exited: the local
    # "instance" is then only its run folder.
    from loraburst.providers.local import pid_alive

    agent = int((runs_dir() / job_id / "agent.pid").read_text())
    deadline = time.time() + 60
    while pid_alive(agent) and time.time() < deadline:
        time.sleep(0.2)
    res = subprocess.run(
        [sys.executable, "-m", "loraburst._cli", "attach", job_id],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "succeeded" in res.stdout
    assert (out / job_id / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / job_id / "metrics.json").read_text())["steps"] == 12
    assert Ledger().job(job_id).status == "succeeded"  # type: ignore[union-attr]
    # It pulled what the held run had finished: nothing was trained again.
    (row,) = Ledger().instances(job_id=job_id)
    assert row.state == "terminated"


def test_attach_never_leaves_a_job_running_and_never_reruns_a_failed_one(
    runpod_fake: Any, runpod_provider: Any
) -> None:
    from loraburst import InstanceLostError

    ledger = Ledger()
    # A client died before its instance was up, and the instance is gone: nothing to resume.
    ledger.create_job("r-1", name=None, spec_json="{}", cache_key=None, bundle_sha256="ab")
    ledger.update_job("r-1", status="running")
    with pytest.raises(InstanceLostError, match="cannot be resumed"):
        Job.attach("r-1", providers={"runpod": runpod_provider}, progress=False)
    assert Ledger().job("r-1").status == "failed"  # type: ignore[union-attr]
    # A job that failed on its own (a training error) has checkpoints, but is not rerun.
    ledger.create_job("f-1", name=None, spec_json="{}", cache_key=None, bundle_sha256="ab")
    ledger.update_job("f-1", status="failed", error="training failed: CUDA OOM")
    (runs_dir() / "f-1" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (runs_dir() / "f-1" / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with pytest.raises(JobError, match="ended failed .training failed: CUDA OOM."):
        Job.attach("f-1", providers={"runpod": runpod_provider}, progress=False)
    assert runpod_fake.pods == {}
