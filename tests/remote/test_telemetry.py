"""GPU telemetry on CPU: the real sampler and NVML reader over a fake NVML device."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loraburst.remote import telemetry
from loraburst.remote.agent import Reporter
from loraburst.remote.protocol import METRICS_FILE, State, read_events

from tests.fakes.nvml import FakeNvml


def _events(workdir: Path) -> list[dict[str, object]]:
    return list(read_events((workdir / "events.jsonl").read_text()))


def _sample_while_training(workdir: Path, nvml: FakeNvml, samples: int) -> Reporter:
    reporter = Reporter(workdir, echo=False)
    reporter.update(phase="training")
    reporter.event("training", step=0, total=10)
    tel = telemetry.Telemetry(telemetry.NvmlSource(nvml), reporter, interval_s=0.01)
    reporter.telemetry = tel.start()
    deadline = time.time() + 30
    while sum(e["kind"] == "gpu" for e in _events(workdir)) < samples and time.time() < deadline:
        time.sleep(0.01)
    reporter.update(phase="saving")
    tel.close()
    assert not nvml.initialised  # closed with the run
    return reporter


def test_samples_stream_as_events_and_ride_on_steps(tmp_path: Path) -> None:
    nvml = FakeNvml(utils=(80, 90, 100), devices=2, power_w=300.0)
    reporter = _sample_while_training(tmp_path, nvml, samples=8)
    gpu = [e for e in _events(tmp_path) if e["kind"] == "gpu"]
    assert len(gpu) >= 8
    first = gpu[0]
    assert len(first["gpus"]) == 2  # type: ignore[arg-type]
    assert first["gpu_power_w"] == 600.0  # two boards' power, summed
    assert all(80 <= float(e["gpu_util"]) <= 100 for e in gpu)  # type: ignore[arg-type]
    mems = [float(e["gpu_mem_gb"]) for e in gpu]  # type: ignore[arg-type]
    assert mems == sorted(mems) and mems[-1] > mems[0]
    # What a step event and state.json carry: the newest sample.
    latest = telemetry.latest(reporter)
    assert latest["gpu_util"] == gpu[-1]["gpu_util"]
    # A busy GPU gets no idle warning.
    assert not [e for e in _events(tmp_path) if e["kind"] == "warning"]
    # state.json round-trips the new fields.
    st = State(phase="training", gpu_util=87.5, gpu_mem_gb=12.0)
    assert State.from_json(st.to_json()).gpu_util == 87.5


def test_an_idle_gpu_is_called_out_and_summarised(tmp_path: Path) -> None:
    _sample_while_training(tmp_path, FakeNvml(utils=(5, 10), power_w=None), samples=8)
    warnings = [e for e in _events(tmp_path) if e["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["gpu_idle"] is True
    assert "mostly idle" in str(warnings[0]["message"])
    # The timeline and summary folded into metrics.json, as the recipe does before sealing.
    metrics: dict[str, object] = {"steps": 0}
    telemetry.record(tmp_path, metrics)
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["telemetry"]["idle"] is True and saved["telemetry"]["mean_power_w"] is None
    assert 5 <= saved["telemetry"]["mean_util_training"] <= 10
    line = saved["timeline"]
    assert len(line["gpu"]) >= 8 and line["gpu_fields"][1] == "util"
    assert {"training", "sealed"} <= set(line["phases"])
    assert "mostly idle" in line["warnings"][0]


def test_no_nvml_turns_telemetry_off_and_says_why(tmp_path: Path) -> None:
    reporter = Reporter(tmp_path, echo=False)
    assert telemetry.start(reporter) is None  # this CPU machine has no NVML
    (event,) = [e for e in _events(tmp_path) if e["kind"] == "telemetry"]
    assert event["off"]
    assert telemetry.latest(reporter) == {}
    assert telemetry.timeline(tmp_path)["off"] == event["off"]


def test_timeline_thins_long_runs(tmp_path: Path) -> None:
    reporter = Reporter(tmp_path, echo=False)
    for step in range(1, 5001):
        reporter.event("step", step=step, loss=1.0, t=float(step), tokens_per_s=10.0)
    steps = telemetry.timeline(tmp_path)["steps"]
    assert len(steps) == telemetry.MAX_POINTS and steps[-1][1] == 5000 and steps[0][1] == 1
