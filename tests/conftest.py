"""Shared fixtures: an isolated LORABURST_HOME and no credentials leaking in from the shell."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from loraburst import Job

pytest_plugins = ["tests.fakes.fixtures", "tests.fakes.disk", "tests.faults.summary"]


# Thread pools that torch (OpenMP, MKL) and the tokenizers size from the machine's cores.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch (and every agent it starts, on this machine or
    behind an emulated instance's sshd) gets its share of the cores: two workers each training
    with one thread per core would oversubscribe the machine and spin-wait on each other.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in THREAD_VARS:
        os.environ.setdefault(var, threads)
    if "torch" in sys.modules:  # read OMP_NUM_THREADS when it was imported
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own LORABURST_HOME and sees no provider keys from the environment."""
    for key in list(os.environ):
        if key.startswith(("LORABURST_", "RUNPOD_", "LAMBDA_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LORABURST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "examples" / "data" / "chat.jsonl"


def sample_job(
    model: Path, out: Path, name: str = "test", *, method: str = "qlora", **train: Any
) -> Job:
    """A job on the sample data that the tiny model trains in seconds: six steps, a checkpoint
    every three, rows cut at 96 tokens (``train`` overrides any of it)."""
    from loraburst import Job

    settings = {
        "max_steps": 6,
        "micro_batch_size": 4,
        "learning_rate": 3e-3,
        "save_every_steps": 3,
        "max_seq_len": 96,
        **train,
    }
    return Job(str(model), SAMPLE_DATA, method=method, output_dir=out, name=name, train=settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Llama (random weights) with a tokenizer trained on the sample data."""
    import json

    from loraburst.testing import make_tiny_model

    texts = []
    for line in SAMPLE_DATA.read_text().splitlines():
        if line.strip():
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts)
