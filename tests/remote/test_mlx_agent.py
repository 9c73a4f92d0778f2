"""The MLX recipe under the real agent: stop and resume replay the uninterrupted run exactly,
and what MLX cannot do is refused on the instance before a model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from loraburst.remote.protocol import CONTROL_FILE, MANIFEST_FILE, METRICS_FILE, STATE_FILE

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

MLX = {**FAST, "backend": "mlx"}
STEPS = 40  # long enough that a stop written at step 3 lands before the end


def _adapter(workdir: Path) -> dict[str, np.ndarray]:
    loaded = mx.load(str(workdir / "adapter" / "mlx" / "adapters.safetensors"))
    return {k: np.array(v) for k, v in loaded.items()}


@pytest.mark.slow
def test_stopped_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    train = {**MLX, "max_steps": STEPS, "save_every_steps": 100, "grad_accum": 2}
    whole = make_workdir(tmp_path / "whole", tiny_model, train=train)
    assert run_agent(whole) == 0, log(whole)

    parted = make_workdir(tmp_path / "parted", tiny_model, train=train)
    proc = start_agent(parted)
    started = parted / STATE_FILE
    wait_for(
        lambda: (started.is_file() and state(parted).step >= 3) or proc.poll() is not None,
        120,
        "step 3",
    )
    (parted / CONTROL_FILE).write_text(json.dumps({"stop": "budget"}))
    assert proc.wait(timeout=120) == 0, log(parted)
    st = state(parted)
    assert (st.phase, st.stop_reason) == ("stopped", "budget"), log(parted)
    stopped_at = st.step
    assert 3 <= stopped_at < STEPS
    # A stop saves a checkpoint at the step it stopped on, and a partial adapter.
    assert (parted / "checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
    assert (parted / MANIFEST_FILE).is_file()
    first_run = len(events(parted))

    assert run_agent(parted) == 0, log(parted)
    st = state(parted)
    assert (st.phase, st.step, st.total_steps) == ("done", STEPS, STEPS)
    second = events(parted)[first_run:]
    assert [e["step"] for e in second if e["kind"] == "step"] == list(
        range(stopped_at + 1, STEPS + 1)
    )
    metrics = json.loads((parted / METRICS_FILE).read_text())
    assert metrics["resumed_from_step"] == stopped_at and metrics["loss_steps"] == list(
        range(1, STEPS + 1)
    )
    # Same batches in the same order, same optimizer moments and learning rates: same adapter.
    expected, got = _adapter(whole), _adapter(parted)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    whole_metrics = json.loads((whole / METRICS_FILE).read_text())
    np.testing.assert_allclose(metrics["losses"], whole_metrics["losses"], rtol=1e-5)


def _spec_with(workdir: Path, **changes: object) -> None:
    """Edit bundle/spec.json by hand: a client-side check would refuse these jobs first."""
    path = workdir / "bundle" / "spec.json"
    doc = json.loads(path.read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        doc["spec"][section][key] = value
    path.write_text(json.dumps(doc))


def test_the_instance_refuses_what_mlx_cannot_do_before_loading(
    tiny_model: Path, tmp_path: Path
) -> None:
    workdir = make_workdir(tmp_path, tiny_model, train={**MLX, "max_steps": 1})
    _spec_with(workdir, quant__bits=8, train__gradient_checkpointing="offload")
    assert run_agent(workdir, timeout=120) == 1
    st = state(workdir)
    assert st.phase == "failed" and st.error is not None
    assert st.error["type"] == "UnsupportedSetting"
    message = st.error["message"]
    assert "quant.bits: 8" in message and "quant.bits: 4" in message
    assert 'gradient_checkpointing: "offload"' in message
    assert not any(e["kind"] == "data" for e in events(workdir))  # refused before any work


def test_a_torch_checkpoint_is_not_resumed_with_mlx(tiny_model: Path, tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path, tiny_model, train={**MLX, "max_steps": 4})
    ckpt = workdir / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert run_agent(workdir, timeout=120) == 1
    error = state(workdir).error
    assert error is not None and "checkpoint-2" in error["message"]
    assert "train.backend: torch" in error["message"]
