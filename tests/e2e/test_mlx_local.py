"""The same job on the MLX backend through the local provider: LoRA and 4-bit QLoRA train, the
loss falls, and the adapter that comes back loads with PeftModel and computes what MLX did.

MLX's CPU build runs these on Linux; on a Mac the same code runs on Metal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from loraburst import ConfigError, Job
from loraburst._state.home import runs_dir
from loraburst.providers.local import LocalProvider
from loraburst.remote.protocol import verify_manifest

from tests.conftest import SAMPLE_DATA, sample_job

IDS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 300, 11]]


def _job(model: Path, out: Path, method: str = "qlora", **train: Any) -> Job:
    more = {"max_steps": 12, "save_every_steps": 6, "max_seq_len": 128, **train}
    return sample_job(model, out, "mlx", method=method, **more)


def _mlx_trained(model: Path, adapter: Path, method: str) -> Any:
    """The trained model as MLX computes it: base (quantised as in training) + the adapter."""
    from loraburst.remote.mlx_trainer import load_model

    spec = json.loads(Job(str(model), SAMPLE_DATA, method=method).spec.model_dump_json())  # type: ignore[arg-type]
    trained, _ = load_model(spec, str(model))
    weights = mx.load(str(adapter / "mlx" / "adapters.safetensors"))
    trained.load_weights(list(weights.items()), strict=False)
    return trained


def _torch_base(model: Path, mlx_model: Any) -> Any:
    """The HF model with each linear layer MLX quantised replaced by its dequantised weights:
    the base MLX trained against, so the adapter alone accounts for any difference."""
    import mlx.nn as nn
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    state = base.state_dict()
    replaced = 0
    for path, module in mlx_model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = mx.dequantize(
                module.weight,
                module.scales,
                module.biases,
                group_size=module.group_size,
                bits=module.bits,
            )
            # Inside a LoRA layer the base is its ".linear" child; HF has it at the layer's path.
            key = f"{path.removesuffix('.linear')}.weight"
            state[key] = torch.from_numpy(np.array(w.astype(mx.float32)))
            replaced += 1
    base.load_state_dict(state)
    base.replaced = replaced
    return base


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_mlx_job_trains_and_its_peft_adapter_matches_mlx(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    import torch
    from peft import PeftModel

    result = _job(tiny_model, tmp_path / "out", method, backend="mlx").run(
        provider="local", progress=False
    )
    assert result.status == "succeeded", result
    m = result.metrics
    assert (m["backend"], m["device"], m["steps"], m["method"]) == ("mlx", "cpu", 12, method)
    assert m["quantized_bits"] == (4 if method == "qlora" else None)
    assert m["final_loss"] < m["first_loss"] - 1.0, m["losses"]  # the loss falls, clearly
    adapter = result.adapter_path
    assert adapter is not None
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    assert verify_manifest(adapter.parent, manifest) == []
    # The same progress events as the torch recipe.
    events = [
        json.loads(line)
        for line in (runs_dir() / result.job_id / "events.jsonl").read_text().splitlines()
    ]
    kinds = [e["kind"] for e in events]
    for kind in ("loading", "data", "settings", "training", "step", "checkpoint", "done"):
        assert kind in kinds, kind
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert all({"loss", "tokens", "tokens_per_s", "total"} <= set(e) for e in steps)

    mlx_model = _mlx_trained(tiny_model, adapter, method)
    expected = np.array(mlx_model(mx.array(IDS)).astype(mx.float32))
    base = _torch_base(tiny_model, mlx_model)
    assert base.replaced == (14 if method == "qlora" else 0)  # every decoder linear, 4-bit
    peft = PeftModel.from_pretrained(base, adapter).eval()
    lora_b = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 14 and all(torch.count_nonzero(p) > 0 for p in lora_b.values())
    with torch.no_grad():
        got = peft(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)
    if method == "lora":
        # adapter/mlx is mlx-lm's own layout: mlx_lm.generate --adapter-path loads it as is.
        from mlx_lm.utils import load_adapters, load_model

        native, _ = load_model(tiny_model)
        load_adapters(native, str(adapter / "mlx"))
        got_native = np.array(native(mx.array(IDS)).astype(mx.float32))
        np.testing.assert_allclose(got_native, expected, atol=1e-5)


def test_missing_mlx_packages_are_named_before_the_agent_starts(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraburst import AgentError
    from loraburst.remote import backends

    monkeypatch.setattr(backends, "MLX_REQUIREMENTS", ("mlx>=0.1", "no-such-mlx-lm>=1"))
    with pytest.raises(AgentError, match="no-such-mlx-lm") as err:
        _job(tiny_model, tmp_path / "out", backend="mlx", max_steps=1).run(
            provider="local", progress=False
        )
    assert "pip install 'loraburst[mlx]'" in str(err.value)
    assert not list(runs_dir().glob("*/events.jsonl"))  # no agent ever ran


def test_explicit_mlx_refuses_what_it_cannot_do_before_anything_runs(tiny_model: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _job(tiny_model, Path("out"), "dora", backend="mlx", optim="paged_adamw_8bit")
    text = str(err.value)
    assert "method: dora" in text and "use method: qlora or lora" in text
    assert "train.optim: 'paged_adamw_8bit'" in text and "adamw_torch" in text


def test_auto_on_apple_silicon_trains_with_mlx(tiny_model: Path, tmp_path: Path) -> None:
    """The local provider on a Mac resolves ``auto`` to MLX, and tells the agent so."""
    mac = LocalProvider(apple_silicon=True)
    assert (
        mac.capabilities.backend == "mlx"
        and LocalProvider(apple_silicon=False).capabilities.backend == "torch"
    )
    result = _job(tiny_model, tmp_path / "out", max_steps=2).run(provider=mac, progress=False)
    assert result.status == "succeeded" and result.metrics["backend"] == "mlx"


def test_auto_on_apple_silicon_refuses_an_mlx_gap_before_bundling(
    tiny_model: Path, tmp_path: Path
) -> None:
    job = _job(tiny_model, tmp_path / "out", "qlora", max_steps=2, packing=True)
    with pytest.raises(ConfigError, match="train.packing: true") as err:
        job.run(provider=LocalProvider(apple_silicon=True), progress=False)
    assert "Apple Silicon" in str(err.value)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())  # nothing started
