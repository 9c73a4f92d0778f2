"""LoRA adapters between MLX and PEFT, both ways, on the tiny Llama: same logits as torch+PEFT.

Fresh LoRA B matrices are zero (the adapter would change nothing, and a transposed or mis-scaled
conversion would pass), so every test gives them random values first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from loraburst.remote.mlx_convert import (
    ADAPTER_CONFIG,
    AdapterFormatError,
    mlx_to_peft,
    peft_to_mlx,
)
from loraburst.remote.mlx_trainer import add_lora

IDS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 300, 11]]
ATOL = 1e-4  # fp32 on both sides: only summation order differs


def _mlx_model(path: Path) -> Any:
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    return model


def _torch_logits(model: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        out: np.ndarray = model(torch.tensor(IDS)).logits.float().numpy()
    return out


def _mlx_logits(model: Any) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def _randomise_lora(model: Any, seed: int) -> dict[str, Any]:
    """Give every LoRA tensor random values (B too); return the flat trainable tensors."""
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    weights = {
        k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())
    }
    model.load_weights(list(weights.items()), strict=False)
    return weights


def _lora_modules(model: Any, leaves: tuple[str, ...]) -> list[str]:
    import mlx.nn as nn

    return sorted(
        p
        for p, m in model.named_modules()
        if isinstance(m, nn.Linear) and p.rpartition(".")[2] in leaves
    )


def test_mlx_adapter_gives_peft_the_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _mlx_model(tiny_model)
    base_logits = _mlx_logits(model)
    targets = _lora_modules(model, ("q_proj", "v_proj", "down_proj"))
    add_lora(model, targets, r=4, scale=12.0 / 4, dropout=0.0)
    weights = _randomise_lora(model, seed=1)
    expected = _mlx_logits(model)
    assert np.abs(expected - base_logits).max() > 1e-2  # the adapter does change the model

    out = mlx_to_peft(weights, tmp_path / "peft", r=4, alpha=12.0, dropout=0.0,
                      base_model=str(tiny_model))  # fmt: skip
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 12.0, "LORA")

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    got = _torch_logits(peft.eval())
    np.testing.assert_allclose(got, expected, atol=ATOL)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_gives_mlx_the_same_logits(
    tiny_model: Path, tmp_path: Path, rslora: bool
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                        use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    peft.save_pretrained(tmp_path / "peft")
    expected = _torch_logits(peft.eval())

    weights, settings = peft_to_mlx(tmp_path / "peft")
    assert settings["scale"] == pytest.approx(16 / (8**0.5 if rslora else 8))
    model = _mlx_model(tiny_model)
    add_lora(model, settings["modules"], r=settings["r"], scale=settings["scale"], dropout=0.0)
    model.load_weights(list(weights.items()), strict=False)
    np.testing.assert_allclose(_mlx_logits(model), expected, atol=ATOL)


def test_round_trip_keeps_every_tensor(tiny_model: Path, tmp_path: Path) -> None:
    model = _mlx_model(tiny_model)
    add_lora(model, _lora_modules(model, ("gate_proj",)), r=2, scale=1.0, dropout=0.0)
    weights = _randomise_lora(model, seed=3)
    mlx_to_peft(weights, tmp_path / "a", r=2, alpha=2.0, dropout=0.1, base_model="org/model")
    back, settings = peft_to_mlx(tmp_path / "a")
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(np.array(back[name]), np.array(value))
    assert (settings["r"], settings["alpha"], settings["dropout"]) == (2, 2.0, 0.1)


def test_a_dora_adapter_is_refused_naming_the_field(tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(
        tmp_path / "dora"
    )
    with pytest.raises(AdapterFormatError, match="use_dora") as err:
        peft_to_mlx(tmp_path / "dora")
    assert str(tmp_path / "dora" / ADAPTER_CONFIG) in str(err.value)


def test_a_module_without_its_b_matrix_is_refused(tmp_path: Path) -> None:
    half = {"model.layers.0.self_attn.q_proj.lora_a": np.zeros((8, 2), np.float32)}
    with pytest.raises(AdapterFormatError, match="without both"):
        mlx_to_peft(half, tmp_path / "x", r=2, alpha=4, dropout=0.0, base_model="m")
