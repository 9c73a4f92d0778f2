"""Fixtures for the agent's tests: a fake cloud API (real HTTP) and a moto S3 server."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tests.remote._cloud import Cloud


@pytest.fixture
def cloud() -> Iterator[Cloud]:
    """RunPod/Lambda terminate endpoints on 127.0.0.1, recording each call."""
    c = Cloud()
    yield c
    c.close()


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 endpoint (moto's server on 127.0.0.1) with one bucket; returns s3://bucket/job."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: start every test from empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="ckpts")
    yield "s3://ckpts/jobs/j1"
    server.stop()
