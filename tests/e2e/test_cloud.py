"""The quickstart job end to end over real SSH against the RunPod and Lambda emulators, and on
a bring-your-own sshd host: the adapter comes back verified and nothing is left running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loraburst import Job
from loraburst._state.home import home, keys_dir
from loraburst._state.ledger import Ledger
from loraburst.remote.protocol import verify_manifest

from tests.conftest import SAMPLE_DATA, sample_job


def _check_adapter(adapter: Path | None) -> None:
    assert adapter is not None and (adapter / "adapter_config.json").is_file()
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    assert manifest["files"] and verify_manifest(adapter.parent, manifest) == []


def _grep_tree(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


def test_runpod_end_to_end(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    result = sample_job(tiny_model, tmp_path / "out", "rp").run(
        provider=runpod_provider, progress=False
    )
    assert result.status == "succeeded" and result.provider == "runpod"
    _check_adapter(result.adapter_path)
    assert result.metrics["steps"] == 6
    # The emulator holds no running pod; the one pod billed seconds (per-second billing).
    assert runpod_fake.running() == []
    (pod_id,) = runpod_fake.pods
    assert runpod_fake.billed_seconds(pod_id) > 0
    assert result.cost_usd > 0
    rows = Ledger().instances(job_id=result.job_id)
    assert [r.state for r in rows] == ["terminated"] and rows[0].provider_id == pod_id
    # The estimate its offer was chosen on and what it measured, phase by phase, side by side
    # in the ledger (what the next estimate learns from), and the report beside the adapter.
    job = Ledger().job(result.job_id)
    assert job is not None and job.estimate["provider"] == "runpod"
    assert job.estimate["gpu"] == result.gpu and job.estimate["cost_usd"] > 0
    phases = job.actual["phases"]
    assert {"boot", "upload", "load", "train", "pull", "teardown"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and job.actual["cost_usd"] == result.cost_usd
    assert result.report_path is not None and result.report_path.is_file()
    # The per-job private key is gone after teardown.
    assert list(keys_dir().iterdir()) == []
    # No secret reached the ledger, bundles, run folders, the output, or the instance's files.
    hits = _grep_tree(home(), [runpod_fake.api_key]) + _grep_tree(
        tmp_path / "out", [runpod_fake.api_key]
    )
    hits += _grep_tree(runpod_fake.folder, [runpod_fake.api_key])
    assert hits == []


def test_lambda_end_to_end(
    tiny_model: Path, tmp_path: Path, lambda_fake: Any, lambda_provider: Any
) -> None:
    result = sample_job(tiny_model, tmp_path / "out", "lam").run(
        provider=lambda_provider, progress=False
    )
    assert result.status == "succeeded" and result.provider == "lambda"
    _check_adapter(result.adapter_path)
    assert lambda_fake.running() == []
    (inst_id,) = lambda_fake.instances
    # Lambda bills whole minutes.
    assert lambda_fake.billed_seconds(inst_id) % 60 == 0 and lambda_fake.billed_seconds(inst_id)
    assert lambda_fake.ssh_keys == {}  # the per-job key was deleted
    assert _grep_tree(home(), [lambda_fake.api_key]) == []


def test_ssh_provider_end_to_end(
    tiny_model: Path, tmp_path: Path, sshd_host: Any, ssh_provider: Any
) -> None:
    result = sample_job(tiny_model, tmp_path / "out", "byo").run(
        provider=ssh_provider, progress=False
    )
    assert result.status == "succeeded" and result.provider == "ssh"
    _check_adapter(result.adapter_path)
    assert sshd_host.sshd.alive  # our own box is never terminated


def test_a_local_model_is_uploaded_once_per_instance(
    tiny_model: Path, tmp_path: Path, sshd_host: Any, ssh_provider: Any
) -> None:
    """The weights travel beside the bundle, once: a second job on the same box finds them by
    their content hash and sends none again."""
    first = sample_job(tiny_model, tmp_path / "a", "once").run(
        provider=ssh_provider, progress=False
    )
    assert first.status == "succeeded"
    placed = list(sshd_host.root.rglob("models/*/config.json"))
    assert len(placed) == 1
    folder = placed[0].parent
    weights = sorted(folder.glob("*.safetensors"))
    assert weights and not folder.name.endswith(".part")
    stamps = [p.stat().st_mtime_ns for p in weights]
    # A different job (other settings) on the same box and the same model.
    second = Job(
        str(tiny_model),
        SAMPLE_DATA,
        output_dir=tmp_path / "b",
        name="twice",
        train={"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 96},
    ).run(provider=ssh_provider, progress=False)
    assert second.status == "succeeded"
    assert list(sshd_host.root.rglob("models/*/config.json")) == placed
    assert [p.stat().st_mtime_ns for p in weights] == stamps
    assert not list(sshd_host.root.rglob("bundle/model"))


def test_two_gpu_pod_end_to_end_under_torchrun(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    """A 2-GPU offer is rented, the agent runs the trainer as two ranks under torchrun over
    SSH (gloo on this CPU), the adapter comes back verified and the pod is gone, billed for
    both GPUs."""
    job = sample_job(tiny_model, tmp_path / "out", "rp2")
    result = job.run(provider=runpod_provider, gpu="2x RTX 3090", progress=False)
    assert result.status == "succeeded" and result.provider == "runpod"
    _check_adapter(result.adapter_path)
    assert result.metrics["steps"] == 6
    assert runpod_fake.running() == []
    (pod_id,) = runpod_fake.pods
    pod = runpod_fake.pods[pod_id]
    assert pod.data["input"]["gpuCount"] == 2
    assert pod.price_per_hour == pytest.approx(2 * pod.data["gpu"][3])
    assert runpod_fake.billed_seconds(pod_id) > 0
    rows = Ledger().instances(job_id=result.job_id)
    assert [r.state for r in rows] == ["terminated"]
    # The agent on the pod started two ranks; rank 0 alone reported.
    (log_file,) = runpod_fake.folder.glob(f"{pod_id}/root/runs/{result.job_id}/events.jsonl")
    log = log_file.read_text()  # on the pod's disk
    kinds = [json.loads(line) for line in log.splitlines() if line.strip()]
    (launch,) = [e for e in kinds if e["kind"] == "launching"]
    assert launch["processes"] == 2
    (plan,) = [e for e in kinds if e["kind"] == "distributed"]
    assert plan["strategy"] == "ddp" and plan["gpus"] == 2
    assert sum(e["kind"] == "done" for e in kinds) == 1
