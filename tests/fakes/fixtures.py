"""Pytest fixtures that start the emulators and sshd instances (owned by the providers work).

* ``runpod_fake`` / ``lambda_fake``: an emulator serving on ``127.0.0.1:<free port>`` from a
  thread, with a fresh random API key; every sshd it started is killed at teardown.
* ``runpod_provider`` / ``lambda_provider``: a provider pointed at that emulator with short
  timeouts and fast retries (tests may build their own with different options).
* ``sshd_host`` / ``ssh_provider``: a plain sshd (bring-your-own host) and the provider for it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ._server import FakeCloud
from .hub import HubFake
from .lambdalabs import LambdaFake
from .runpod import RunPodFake
from .sshd import SSHD, ed25519_key

FakeT = TypeVar("FakeT", bound="FakeCloud | HubFake")


def _serving(fake: FakeT) -> Iterator[FakeT]:
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def runpod_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunPodFake]:
    key = "rpa_" + secrets.token_hex(16)
    yield from _serving(RunPodFake(api_key=key, folder=tmp_path_factory.mktemp("runpod")))


@pytest.fixture
def lambda_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LambdaFake]:
    key = "secret_" + secrets.token_hex(16)
    yield from _serving(LambdaFake(api_key=key, folder=tmp_path_factory.mktemp("lambda")))


@pytest.fixture
def runpod_provider(runpod_fake: RunPodFake):  # type: ignore[no-untyped-def]
    from loraburst.providers.runpod import RunPodProvider

    return RunPodProvider(
        runpod_fake.api_key,
        base_url=runpod_fake.url,
        connect_timeout_s=15,
        max_attempts=4,
        backoff_s=0.05,
    )


@pytest.fixture
def lambda_provider(lambda_fake: LambdaFake):  # type: ignore[no-untyped-def]
    from loraburst.providers.lambdalabs import LambdaProvider

    return LambdaProvider(
        lambda_fake.api_key,
        base_url=f"{lambda_fake.url}/api/v1",
        ssh_user="root",
        ssh_port=lambda_fake.ssh_port,
        launch_interval_s=lambda_fake.launch_interval_s,
        connect_timeout_s=15,
        max_attempts=4,
        backoff_s=0.05,
    )


@dataclasses.dataclass
class SSHDHost:
    """A plain sshd: log in as ``target`` with ``key_path``; ``root`` is its remote root."""

    sshd: SSHD
    key_path: Path
    public_key: str

    @property
    def target(self) -> str:
        return f"root@{self.sshd.host}:{self.sshd.port}"

    @property
    def root(self) -> Path:
        return self.sshd.root


@pytest.fixture
def sshd_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDHost]:
    folder = tmp_path_factory.mktemp("sshd")
    key = folder / "client_key"
    public = ed25519_key(key)
    sshd = SSHD(folder / "host", public)
    sshd.start()
    try:
        yield SSHDHost(sshd=sshd, key_path=key, public_key=public)
    finally:
        sshd.stop()


@pytest.fixture
def ssh_provider(sshd_host: SSHDHost):  # type: ignore[no-untyped-def]
    from loraburst.providers.ssh import SSHProvider

    return SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=15)


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 endpoint (moto's server on 127.0.0.1) with one bucket; returns s3://bucket/job.

    The AWS_* variables point boto3 at it for the test process (and its agents).
    """
    import urllib.request

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
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto-secret-" + secrets.token_hex(8))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="ckpts")
    yield "s3://ckpts/jobs/j1"
    server.stop()


@pytest.fixture
def hub_fake() -> Iterator[HubFake]:
    """The Hugging Face Hub emulator on 127.0.0.1 with a fresh random token."""
    yield from _serving(HubFake(token="hf_" + secrets.token_hex(16)))
