"""Build a run's WORKDIR by hand (as the bundler would) and run the real agent in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loraburst import JobSpec
from loraburst.remote.protocol import EVENTS_FILE, STATE_FILE, State, read_events

from tests.conftest import ROOT, SAMPLE_DATA

EVAL_DATA = ROOT / "examples" / "data" / "chat_eval.jsonl"
FAST = {"micro_batch_size": 4, "learning_rate": 3e-3, "max_seq_len": 128, "warmup_ratio": 0.0}


def make_workdir(
    root: Path,
    model: Path | str,
    *,
    data: Path = SAMPLE_DATA,
    eval_data: Path | None = None,
    data_format: str = "messages",
    ship_model: bool = True,
    **spec: Any,
) -> Path:
    """A WORKDIR with bundle/spec.json, bundle/data/, bundle/model/ and the agent's code."""
    workdir = root / "run"
    bundle = workdir / "bundle"
    (bundle / "data").mkdir(parents=True)
    shutil.copy(data, bundle / "data" / "train.jsonl")
    if eval_data is not None:
        shutil.copy(eval_data, bundle / "data" / "eval.jsonl")
    if ship_model:
        shutil.copytree(model, bundle / "model")
    dumped = JobSpec(
        model=str(model),
        dataset="data/train.jsonl",
        eval_dataset="data/eval.jsonl" if eval_data is not None else None,
        **spec,
    ).model_dump(mode="json")
    if ship_model:
        dumped["model"] = "model"
    doc = {"protocol_version": 1, "job_id": "t", "data_format": data_format, "spec": dumped}
    (bundle / "spec.json").write_text(json.dumps(doc, indent=2))
    # Only the remote package travels, under a stub `loraburst`: the agent must not need the SDK.
    code = bundle / "code" / "loraburst"
    shutil.copytree(ROOT / "remote", code / "remote", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "__init__.py").write_text('"""Bundled loraburst agent code."""\n')
    return workdir


def agent_env(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = str(workdir / "bundle" / "code")
    return env


def start_agent(workdir: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(
        [sys.executable, "-m", "loraburst.remote.agent", str(workdir)],
        env=agent_env(workdir, env),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )


def run_agent(workdir: Path, env: Mapping[str, str] | None = None, timeout: float = 240) -> int:
    proc = start_agent(workdir, env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def state(workdir: Path) -> State:
    return State.from_json((workdir / STATE_FILE).read_text())


def events(workdir: Path) -> list[dict[str, Any]]:
    return list(read_events((workdir / EVENTS_FILE).read_text()))


def log(workdir: Path) -> str:
    return (workdir / "agent.log").read_text(errors="replace")[-3000:]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
