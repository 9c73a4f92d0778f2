"""S3 checkpoints against moto's real S3 server: upload, completion markers, download, resume."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from loraburst.remote.artifacts import (
    ArtifactsError,
    download_latest_checkpoint,
    parse_url,
    upload_checkpoint,
)
from loraburst.remote.protocol import CONTROL_FILE, METRICS_FILE, verify_manifest

from tests.remote._workdir import (
    FAST,
    events,
    log,
    make_workdir,
    run_agent,
    start_agent,
    state,
    wait_for,
)


def _checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    (ckpt / "nested").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "nested" / "adapter.bin").write_bytes(bytes(range(256)) * step)
    return ckpt


def _keys(url: str) -> list[str]:
    bucket, prefix = parse_url(url)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_upload_then_download_the_latest_complete_checkpoint(s3_url: str, tmp_path: Path) -> None:
    assert download_latest_checkpoint(s3_url, tmp_path / "empty") is None
    src = tmp_path / "src"
    assert upload_checkpoint(s3_url, _checkpoint(src, 2)) == 2
    upload_checkpoint(s3_url, _checkpoint(src, 10))
    assert "jobs/j1/checkpoints/checkpoint-10/.complete" in _keys(s3_url)
    # A newer checkpoint whose upload never finished (no marker) is not a resume point.
    bucket, prefix = parse_url(s3_url)
    boto3.client("s3").put_object(
        Bucket=bucket, Key=f"{prefix}/checkpoints/checkpoint-12/trainer_state.json", Body=b"{}"
    )

    got = download_latest_checkpoint(s3_url, tmp_path / "dest")
    assert got == tmp_path / "dest" / "checkpoint-10"
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert files == ["nested/adapter.bin", "trainer_state.json"]
    assert (got / "nested" / "adapter.bin").read_bytes() == bytes(range(256)) * 10
    assert not any(p.name.startswith(".") for p in (tmp_path / "dest").iterdir())


def test_bad_url_and_unreachable_endpoint_name_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ArtifactsError, match="must look like s3://bucket/prefix"):
        parse_url("https://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ArtifactsError, match="s3://b/p"):
        upload_checkpoint("s3://b/p", _checkpoint(tmp_path, 1))


def test_stopped_run_resumes_on_a_new_instance_from_s3(
    tiny_model: Path, tmp_path: Path, s3_url: str
) -> None:
    # Enough steps that the stop request lands mid-run even on a fast, idle machine.
    total = 60
    spec = {"train": {**FAST, "max_steps": total, "save_every_steps": 1000}}
    env = {"LORABURST_ARTIFACTS": s3_url}
    first = make_workdir(tmp_path / "a", tiny_model, **spec)
    proc = start_agent(first, env)
    wait_for(
        lambda: (
            proc.poll() is not None or (first / "state.json").exists() and state(first).step >= 2
        ),
        180,
        "step 2",
    )
    (first / CONTROL_FILE).write_text(json.dumps({"stop": "user"}))
    assert proc.wait(timeout=120) == 0, log(first)

    # Stopped on request: checkpoint, partial adapter, metrics and manifest, all verified.
    st = state(first)
    assert (st.phase, st.stop_reason) == ("stopped", "user")
    stopped_at = st.step
    assert 2 <= stopped_at < total
    metrics = json.loads((first / METRICS_FILE).read_text())
    assert metrics["steps"] == stopped_at and metrics["stop_reason"] == "user"
    manifest = json.loads((first / "manifest.json").read_text())
    assert "adapter/adapter_model.safetensors" in manifest["files"]
    assert verify_manifest(first, manifest) == []
    keys = _keys(s3_url)
    assert f"jobs/j1/checkpoints/checkpoint-{stopped_at}/.complete" in keys
    assert "jobs/j1/final/manifest.json" in keys

    # A fresh instance: no local checkpoint, so it fetches the one in the bucket and finishes.
    second = make_workdir(tmp_path / "b", tiny_model, **spec)
    assert run_agent(second, env) == 0, log(second)
    st = state(second)
    assert (st.phase, st.step, st.stop_reason) == ("done", total, None)
    metrics = json.loads((second / METRICS_FILE).read_text())
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == total
    kinds = [e["kind"] for e in events(second)]
    assert kinds.index("checkpoint_downloaded") < kinds.index("resuming") < kinds.index("step")
    steps = [e["step"] for e in events(second) if e["kind"] == "step"]
    assert steps == list(range(stopped_at + 1, total + 1))
    assert metrics["loss_steps"] == list(range(1, total + 1))
