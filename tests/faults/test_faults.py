"""Fault injection: never leak a GPU, never lose an adapter.

Every case runs the tiny model for real over SSH against the RunPod emulator (and Lambda for
failover), injects one fault, and asserts: the emulators hold 0 running instances at the end,
and the adapter exists and verifies (or the case's stated outcome).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loraburst import (
    HostKeyMismatchError,
    Job,
    LocalStorageError,
    LoraburstError,
    TeardownError,
)
from loraburst._lifecycle.attempt import Attempt
from loraburst._lifecycle.cleanup import cleanup
from loraburst._state.home import runs_dir
from loraburst._state.ledger import Ledger
from loraburst.providers.runpod import RunPodProvider
from loraburst.remote.protocol import State, verify_manifest

from tests.conftest import ROOT, sample_job
from tests.fakes.disk import fill

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner's waits are tunables; the tests shorten them so faults resolve in seconds.
    monkeypatch.setattr(Attempt, "poll_s", 0.3)
    monkeypatch.setattr(Attempt, "status_check_s", 1.0)


def _job(model: Path, out: Path, steps: int = 12, name: str = "fault") -> Job:
    return sample_job(model, out, name, max_steps=steps, save_every_steps=5)


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _verified(adapter: Path | None) -> bool:
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        return False
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    return verify_manifest(adapter.parent, manifest) == []


def _job_id() -> str | None:
    jobs = Ledger().jobs()
    return jobs[0].id if jobs else None


def _remote_state(fake: Any, job_id: str) -> State | None:
    """The agent's state.json as it lies on the emulated instance's disk."""
    for pod in fake.pods.values():
        if pod.sshd is None:
            continue
        p = pod.sshd.root / "runs" / job_id / "state.json"
        if p.is_file():
            try:
                return State.from_json(p.read_text())
            except ValueError:
                return None
    return None


def _training_at(fake: Any, step: int) -> Callable[[], bool]:
    def check() -> bool:
        jid = _job_id()
        st = _remote_state(fake, jid) if jid else None
        return bool(st and st.phase == "training" and st.step >= step)

    return check


def _signal_agent(fake: Any, job_id: str, sig: int = signal.SIGSTOP) -> None:
    """Signal the agent on the emulated pod (its process group: the agent and the trainer in
    it). SIGSTOP holds training at the step it reached until SIGCONT or the pod is preempted
    (SIGKILL ends stopped processes too); a stopped process is alive to the client's checks, as
    a slow one would be. This is the gate that keeps a case's fault inside the run, however
    fast or loaded the machine, instead of racing the remaining steps against wall time."""
    for pod in fake.pods.values():
        pid_file = pod.sshd.root / "runs" / job_id / "agent.pid" if pod.sshd else None
        if pid_file is not None and pid_file.is_file():
            os.killpg(int(pid_file.read_text()), sig)
            return
    raise AssertionError(f"no agent of job {job_id} on the emulator")


def _training_past_a_checkpoint(fake: Any) -> Callable[[], bool]:
    """Training is at step 6 or later: checkpoint-5 (save_every_steps=5) is complete, and the
    client pulls a checkpoint once training has moved past it."""
    return _training_at(fake, 6)


def _record_result(record: Any, case: str, fault: str, result: Any, *fakes: Any) -> None:
    """The summary row of a case that ended with ``result``: completed when it succeeded,
    leaked = what the emulators still run, lost unless its adapter verifies."""
    record(
        case,
        fault,
        completed=result.status == "succeeded",
        leaked=sum(len(f.running()) for f in fakes),
        lost=0 if _verified(result.adapter_path) else 1,
    )


def _client_env(fake: Any) -> dict[str, str]:
    return {
        **os.environ,
        "LORABURST_RUNPOD_BASE_URL": fake.url,
        "RUNPOD_API_KEY": fake.api_key,
        "PYTHONUNBUFFERED": "1",
    }


def _spawn(fake: Any, module: str, *args: str) -> subprocess.Popen[str]:
    """``python -m module args`` against the emulator ``fake``; stdout and stderr as one."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=_client_env(fake),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _start_client(
    fake: Any, model: Path, out: Path, steps: int, grace: float | None = None
) -> subprocess.Popen[str]:
    more = [] if grace is None else [str(grace)]
    return _spawn(fake, "tests.faults._client", str(model), str(out), str(steps), *more)


def _client_killed_mid_training(
    fake: Any, model: Path, out: Path, steps: int, grace: float | None = None
) -> str:
    """Start a client, SIGKILL it (no handler, no teardown) once training runs on the pod;
    returns its job id."""
    client = _start_client(fake, model, out, steps, grace)
    _wait(_training_at(fake, 2), 120, "training to start on the pod")
    client.kill()
    client.wait()
    job_id = _job_id()
    assert job_id is not None
    return job_id


def test_client_sigkilled_then_attach_finishes(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, record: Any
) -> None:
    out = tmp_path / "out"
    job_id = _client_killed_mid_training(runpod_fake, tiny_model, out, steps=30)
    assert len(runpod_fake.running()) == 1  # the pod is still up (and still training)
    attach = _spawn(runpod_fake, "loraburst._cli", "attach", job_id)
    text, _ = attach.communicate(timeout=300)
    assert attach.returncode == 0, text[-2000:]
    adapter = out / job_id / "adapter"
    record(
        "1 client SIGKILL -> attach",
        "SIGKILL of the client mid-training",
        completed=_verified(adapter),
        leaked=len(runpod_fake.running()),
        lost=0 if _verified(adapter) else 1,
    )
    assert runpod_fake.running() == []
    assert _verified(adapter)
    assert json.loads((out / job_id / "metrics.json").read_text())["steps"] == 30


def _drop_sshd(sshd: Any) -> None:
    """Kill sshd and its live connections, but not the detached agent."""
    listener = sshd.proc.pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == listener:
                os.kill(int(entry.name), signal.SIGKILL)
    os.kill(listener, signal.SIGKILL)
    sshd.proc.wait()
    sshd.proc = None


def test_sshd_killed_and_restarted_client_reconnects(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    dropped = threading.Event()

    def saboteur() -> None:
        _wait(_training_at(runpod_fake, 2), 120, "training")
        (pod,) = runpod_fake.pods.values()
        _drop_sshd(pod.sshd)
        dropped.set()
        time.sleep(3)
        pod.sshd.start()  # same port, same host key

    t = threading.Thread(target=saboteur, daemon=True)
    t.start()
    result = _job(tiny_model, tmp_path / "out", steps=30).run(
        provider=runpod_provider, progress=False
    )
    t.join(5)
    _record_result(
        record,
        "2 sshd killed + restarted",
        "sshd and its connections killed for 3 s",
        result,
        runpod_fake,
    )
    assert dropped.is_set()
    assert result.status == "succeeded" and result.metrics["steps"] == 30
    assert _verified(result.adapter_path)
    assert len(runpod_fake.pods) == 1 and runpod_fake.running() == []


def test_api_storms_complete_or_fail_cleanly(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    runpod_fake.faults.retry_after = 0.1
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            runpod_fake.faults.rate_limit = 2
            runpod_fake.faults.server_error = 1
            time.sleep(1.0)

    t = threading.Thread(target=storm, daemon=True)
    t.start()
    completed = False
    adapter = None
    try:
        result = _job(tiny_model, tmp_path / "out").run(provider=runpod_provider, progress=False)
        completed, adapter = result.status == "succeeded", result.adapter_path
    except LoraburstError as exc:  # failing cleanly, with our error, is an allowed outcome
        print(f"storm outcome: {exc}")
    finally:
        stop.set()
        t.join(5)
        runpod_fake.faults.rate_limit = runpod_fake.faults.server_error = 0
    leaked = len(runpod_fake.running())
    record(
        "3 429/500 storms",
        "429 x2 + 500 x1 every second, all calls",
        completed=completed,
        leaked=leaked,
        lost=0 if not completed or _verified(adapter) else 1,
    )
    assert leaked == 0
    assert not completed or _verified(adapter)


def test_capacity_errors_move_to_the_next_offer(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    lambda_fake: Any,
    lambda_provider: Any,
    record: Any,
) -> None:
    runpod_fake.faults.capacity = True
    result = _job(tiny_model, tmp_path / "out").run(
        provider=[runpod_provider, lambda_provider], progress=False
    )
    _record_result(
        record,
        "4 capacity on create",
        "RunPod: no capacity on every create",
        result,
        runpod_fake,
        lambda_fake,
    )
    assert result.provider == "lambda" and _verified(result.adapter_path)
    assert any(a.provider == "runpod" and a.outcome.startswith("capacity") for a in result.attempts)
    assert runpod_fake.pods == {} and lambda_fake.running() == []


def test_preempted_instance_resumes_elsewhere_with_exact_steps(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    preempted: list[str] = []

    def preempt_after_checkpoint() -> None:
        def pulled() -> bool:
            jid = _job_id()
            return bool(
                jid
                and list((runs_dir() / jid / "checkpoints").glob("checkpoint-*/trainer_state.json"))
            )

        _wait(_training_past_a_checkpoint(runpod_fake), 120, "training past checkpoint-5")
        jid = _job_id()
        assert jid is not None
        _signal_agent(runpod_fake, jid)  # the run cannot finish before the preemption
        _wait(pulled, 120, "a checkpoint pulled by the client")
        (pod_id,) = list(runpod_fake.pods)
        runpod_fake.preempt(pod_id)
        preempted.append(pod_id)

    t = threading.Thread(target=preempt_after_checkpoint, daemon=True)
    t.start()
    # The first pod is frozen past its first checkpoint, so the preemption lands mid-run on any
    # machine; the steps only need to outlast the few the gate may see before it freezes.
    result = _job(tiny_model, tmp_path / "out", steps=30).run(
        provider=runpod_provider, progress=False
    )
    t.join(5)
    _record_result(
        record, "5 preempted mid-run", "the pod's host dies after a checkpoint", result, runpod_fake
    )
    assert preempted and result.status == "succeeded"
    assert result.metrics["steps"] == 30  # exactly the planned number of steps
    assert len(runpod_fake.pods) == 2 and runpod_fake.running() == []
    assert any(a.outcome.startswith("lost") for a in result.attempts)
    # The second pod resumed from the pulled checkpoint instead of starting over.
    second = [p for pid, p in runpod_fake.pods.items() if pid not in preempted][0]
    events = (second.sshd.root / "runs" / result.job_id / "events.jsonl").read_text()
    assert '"kind": "resuming"' in events


def test_lost_create_response_creates_no_duplicate(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    runpod_fake.faults.lose_create = 1
    result = _job(tiny_model, tmp_path / "out").run(provider=runpod_provider, progress=False)
    _record_result(
        record,
        "6 create response lost",
        "the create happens, its reply is a 500",
        result,
        runpod_fake,
    )
    assert result.status == "succeeded" and _verified(result.adapter_path)
    assert len(runpod_fake.pods) == 1 and runpod_fake.running() == []


class _CorruptFirstAdapterFetch:
    """A transport whose first download of adapter/ arrives with one byte flipped."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self.adapter_fetches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def fetch_tree(self, rel: str, dest: Path) -> None:
        self._host.fetch_tree(rel, dest)
        if rel == "adapter":
            self.adapter_fetches += 1
            if self.adapter_fetches == 1:
                target = max(
                    (p for p in dest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
                )
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))


class _CorruptingRunPod(RunPodProvider):
    hosts: list[_CorruptFirstAdapterFetch]

    def connect(self, machine: Any, key_path: Any, workdir: str) -> Any:
        host = _CorruptFirstAdapterFetch(super().connect(machine, key_path, workdir))
        self.hosts = [*getattr(self, "hosts", []), host]
        return host


def test_corrupted_download_is_fetched_again(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, record: Any
) -> None:
    provider = _CorruptingRunPod(
        runpod_fake.api_key, base_url=runpod_fake.url, connect_timeout_s=15, backoff_s=0.05
    )
    result = _job(tiny_model, tmp_path / "out").run(provider=provider, progress=False)
    _record_result(
        record,
        "7 corrupted artifact download",
        "one byte flipped in the first adapter pull",
        result,
        runpod_fake,
    )
    assert provider.hosts[-1].adapter_fetches == 2
    assert result.status == "succeeded" and _verified(result.adapter_path)
    assert runpod_fake.running() == []


def test_client_gone_for_good_watchdog_terminates(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    job_id = _client_killed_mid_training(
        runpod_fake, tiny_model, tmp_path / "out", steps=15, grace=3
    )
    # Training finishes, the heartbeat is stale past the grace: the agent terminates its pod
    # with the pod-scoped key that every pod has.
    _wait(lambda: runpod_fake.running() == [], 180, "the watchdog to terminate the pod")
    (pod,) = runpod_fake.pods.values()
    workdir = pod.sshd.root / "runs" / job_id
    events = (workdir / "events.jsonl").read_text()
    adapter = workdir / "adapter"
    record(
        "8 client gone for good",
        "client SIGKILLed, never comes back",
        completed=_verified(adapter),
        leaked=len(runpod_fake.running()),
        lost=0 if _verified(adapter) else 1,
    )
    # The pod terminated itself with its pod-scoped key (the client was dead); the agent may be
    # killed inside that very call, so the fake's record is the evidence, not an event.
    assert pod.data["terminated_by"] == f"pod:{pod.id}"
    assert '"kind": "done"' in events
    assert _verified(adapter)  # the artifacts were kept: training had finished and saved
    report = cleanup(providers={"runpod": runpod_provider})
    assert report.ok and any(job_id in line for line in report.closed)
    assert Ledger().instances(open_only=True) == []


def test_ctrl_c_during_provisioning_leaks_nothing(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, record: Any
) -> None:
    runpod_fake.faults.ready_polls = 10**6  # the pod never becomes ready
    client = _start_client(runpod_fake, tiny_model, tmp_path / "out", steps=5)
    # The signal lands once the client has the pod's id and waits for it to boot (it has
    # polled its status), not while the create call or the interpreter's start-up is still in
    # flight: the fault is the same on an idle machine and a loaded one.
    _wait(lambda: any(p.polls >= 1 for p in runpod_fake.pods.values()), 60, "the pod to boot")
    client.send_signal(signal.SIGINT)
    out, _ = client.communicate(timeout=120)
    record(
        "9 Ctrl-C during provisioning",
        "SIGINT while the pod boots",
        completed=False,
        leaked=len(runpod_fake.running()),
        lost=0,
    )
    assert client.returncode == 130, out
    assert "CANCELLED" in out
    assert runpod_fake.running() == []
    assert Ledger().instances(open_only=True) == []


def test_teardown_failure_is_loud_and_cleanup_finishes_it(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    record: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Attempt, "teardown_timeout_s", 4.0)
    runpod_fake.faults.terminate_fails = 10**6
    with pytest.raises(TeardownError) as e:
        _job(tiny_model, tmp_path / "out").run(provider=runpod_provider, progress=False)
    assert "COULD NOT CONFIRM" in str(e.value) and "loraburst cleanup" in str(e.value)
    (pod_id,) = runpod_fake.running()
    (row,) = Ledger().instances(open_only=True)
    assert row.state == "teardown_failed" and row.provider_id == pod_id
    job_id = row.job_id
    adapter = tmp_path / "out" / job_id / "adapter"
    assert _verified(adapter)  # the adapter was pulled and verified before teardown
    runpod_fake.faults.terminate_fails = 0
    report = cleanup(providers={"runpod": runpod_provider})
    record(
        "10 teardown API failing",
        "every terminate answers 500, then cleanup",
        completed=_verified(adapter),
        leaked=len(runpod_fake.running()),
        lost=0 if _verified(adapter) else 1,
    )
    assert report.ok and report.terminated
    assert runpod_fake.running() == []
    assert Ledger().instances(open_only=True) == []


def test_disk_fills_mid_job_instance_kept_then_attach_finishes(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    lambda_fake: Any,
    lambda_provider: Any,
    small_disk: Any,
    record: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run folder and output_dir share a small disk that another program fills while the
    job trains: checkpoint copies fail quietly, the adapter pull stops at once, and the
    instance with the only copy of the adapter is kept (no next offer rented) until attach."""
    caplog.set_level(logging.INFO, logger="loraburst.providers.ssh")
    disk = small_disk(32 << 20)
    (disk / "runs").mkdir()
    home_dir = Path(os.environ["LORABURST_HOME"])
    home_dir.mkdir(parents=True, exist_ok=True)
    (home_dir / "runs").symlink_to(disk / "runs")
    out = disk / "out"
    fillers: list[Path] = []

    def filler() -> None:
        _wait(_training_at(runpod_fake, 2), 120, "training")
        # Training holds while the disk fills, so the rest of the run, its checkpoints and the
        # pull all meet a full disk (under load the run once finished before the fill landed).
        job_id = _job_id()
        assert job_id is not None
        _signal_agent(runpod_fake, job_id, signal.SIGSTOP)
        try:
            fillers.append(fill(disk))
        finally:
            _signal_agent(runpod_fake, job_id, signal.SIGCONT)

    t = threading.Thread(target=filler, daemon=True)
    t.start()
    with pytest.raises(LocalStorageError) as e:
        _job(tiny_model, out, steps=20).run(
            provider=[runpod_provider, lambda_provider], progress=False
        )
    t.join(5)
    job_id = e.value.context["job_id"]
    assert e.value.errno == errno.ENOSPC
    assert "KEPT" in str(e.value) and f"loraburst attach {job_id}" in str(e.value)
    # Kept, and the chain did not move on to Lambda: the disk would be just as full there.
    assert len(runpod_fake.running()) == 1 and lambda_fake.instances == {}
    (row,) = Ledger().instances(job_id=job_id)
    assert row.state == "held" and row.held_until and row.held_until > time.time()
    assert Ledger().job(job_id).status == "held"  # type: ignore[union-attr]
    assert "reconnecting" not in caplog.text  # a full disk is not a dropped connection
    assert list((runs_dir() / job_id).rglob(".partial-*")) == []
    assert not (out / job_id).exists() and list(out.glob(".partial-*")) == []

    fillers[0].unlink()  # the user frees space
    result = Job.attach(job_id, providers={"runpod": runpod_provider}, progress=False)
    _record_result(
        record,
        "11 disk fills mid-job",
        "local disk full from step 2 to after the pull",
        result,
        runpod_fake,
        lambda_fake,
    )
    assert result.status == "succeeded" and _verified(result.adapter_path)
    assert result.metrics["steps"] == 20 and result.cost_usd > 0
    assert runpod_fake.running() == [] and Ledger().instances(open_only=True) == []
    assert Ledger().job(job_id).status == "succeeded"  # type: ignore[union-attr]


def test_cleanup_leaves_a_job_attach_follows_and_a_lost_instance_resumes(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, record: Any
) -> None:
    out = tmp_path / "out"
    client = _start_client(runpod_fake, tiny_model, out, steps=30)
    _wait(_training_past_a_checkpoint(runpod_fake), 120, "training past checkpoint-5")
    job_id = _job_id()
    assert job_id is not None
    # Training holds here until the preemption below: attach always finds the job mid-run
    # (it once finished before attach connected on a loaded machine).
    _signal_agent(runpod_fake, job_id)
    client.kill()  # SIGKILL: no handler, no teardown
    client.wait()
    attach = _spawn(runpod_fake, "loraburst._cli", "attach", job_id)
    pid_file = runs_dir() / job_id / "client.pid"
    _wait(lambda: pid_file.is_file() and pid_file.read_text() == str(attach.pid), 60, "attach")
    # A second terminal runs cleanup while attach follows: the job is not an orphan.
    report = cleanup(providers={"runpod": runpod_provider})
    assert len(runpod_fake.running()) == 1 and report.kept, report.lines()
    # Then the pod dies under attach, after attach has pulled a checkpoint.
    (first,) = list(runpod_fake.pods)

    def pulled() -> bool:
        return bool(
            list((runs_dir() / job_id / "checkpoints").glob("checkpoint-*/trainer_state.json"))
        )

    _wait(pulled, 120, "a checkpoint pulled by attach")
    runpod_fake.preempt(first)
    text, _ = attach.communicate(timeout=400)
    adapter = out / job_id / "adapter"
    record(
        "12 cleanup + preemption under attach",
        "cleanup while attach follows, then preemption",
        completed=attach.returncode == 0 and _verified(adapter),
        leaked=len(runpod_fake.running()),
        lost=0 if _verified(adapter) else 1,
    )
    assert attach.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "Lost" not in text
    assert _verified(adapter)
    assert json.loads((out / job_id / "metrics.json").read_text())["steps"] == 30
    assert len(runpod_fake.pods) == 2 and runpod_fake.running() == []
    row = Ledger().job(job_id)
    assert row is not None and row.status == "succeeded" and row.cost_usd > 0
    second = next(p for pid, p in runpod_fake.pods.items() if pid != first)
    events = (second.sshd.root / "runs" / job_id / "events.jsonl").read_text()
    assert '"kind": "resuming"' in events


def test_host_key_changed_mid_job_stops_at_once_and_tears_down(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    lambda_fake: Any,
    lambda_provider: Any,
    record: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Attempt, "reconnect_timeout_s", 300.0)  # what a retry loop would use
    swapped: list[float] = []

    def impostor() -> None:
        _wait(_training_at(runpod_fake, 2), 120, "training")
        (pod,) = runpod_fake.pods.values()
        _drop_sshd(pod.sshd)
        pod.sshd.regenerate_host_key()  # another machine now answers at the pod's address
        pod.sshd.start()
        swapped.append(time.monotonic())

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    with pytest.raises(HostKeyMismatchError) as e:
        _job(tiny_model, tmp_path / "out", steps=200).run(
            provider=[runpod_provider, lambda_provider], progress=False
        )
    t.join(5)
    stopped_after = time.monotonic() - swapped[0]
    record(
        "13 host key changed mid-job",
        "sshd restarted with a new host key",
        completed=False,
        leaked=len(runpod_fake.running()) + len(lambda_fake.running()),
        lost=0,
    )
    assert "host key" in str(e.value)
    assert stopped_after < 60  # not the 300 s reconnect timeout
    assert runpod_fake.running() == [] and lambda_fake.instances == {}  # torn down, no failover
    assert Ledger().instances(open_only=True) == []
