"""artifacts="s3://...": the agent on an emulated pod writes checkpoints and the final adapter
to an S3-compatible bucket (moto's real server); credentials travel only as SSH environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
from loraburst import Job
from loraburst._state.home import home

from tests.conftest import SAMPLE_DATA


def test_checkpoints_and_adapter_land_in_s3(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any, s3_url: str
) -> None:
    job = Job(
        str(tiny_model),
        SAMPLE_DATA,
        output_dir=tmp_path / "out",
        name="s3",
        artifacts="s3://ckpts/runs",
        train={"max_steps": 6, "micro_batch_size": 4, "save_every_steps": 3, "max_seq_len": 96},
    )
    result = job.run(provider=runpod_provider, progress=False)
    assert result.status == "succeeded"
    keys = [
        o["Key"]
        for o in boto3.client("s3").list_objects_v2(
            Bucket="ckpts", Prefix=f"runs/{result.job_id}/"
        )["Contents"]
    ]
    assert any("/checkpoints/checkpoint-3/" in k for k in keys)
    assert any(k.endswith("adapter_config.json") for k in keys)
    assert runpod_fake.running() == []
    # The secret went to the agent over SSH only: not into the ledger, bundles or run folders,
    # and not into the provider's API (the pod's env as RunPod stores it).
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for p in home().rglob("*"):
        assert not (p.is_file() and secret in p.read_bytes()), p
    (pod,) = runpod_fake.pods.values()
    assert secret.decode() not in str(pod.data)
