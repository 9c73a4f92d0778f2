"""LoRA adapters between MLX's layout and PEFT's, both ways, with the same scaling.

mlx-lm's ``LoRALinear`` computes ``y = W x + scale * (x @ lora_a) @ lora_b`` with ``lora_a`` of
shape ``(in, r)`` and ``lora_b`` of shape ``(r, out)``. PEFT's LoRA layer computes
``y = W x + (lora_alpha / r) * B(A(x))`` with ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
``(out, r)``. So a module's tensors are each other's transposes, and ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA). Module paths are the Hugging Face names in both (mlx-lm
keeps them so it can load HF weights): ``model.layers.0.self_attn.q_proj`` in MLX is
``base_model.model.model.layers.0.self_attn.q_proj`` in a PEFT file.

The PEFT side is what ``PeftModel.from_pretrained`` loads: ``adapter_config.json`` and
``adapter_model.safetensors`` (metadata ``format: pt``). Writing needs numpy and safetensors
(both come with mlx-lm's transformers); reading into MLX needs mlx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFormatError",
    "mlx_to_peft",
    "peft_to_mlx",
    "scale_of",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_MLX_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


class AdapterFormatError(ValueError):
    """A PEFT adapter that cannot become an MLX one (the message names the file and field)."""


def scale_of(r: int, alpha: float, *, rslora: bool = False) -> float:
    """The factor both frameworks multiply the low-rank update by."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    if leaf not in _MLX_LEAVES or not module:
        raise AdapterFormatError(
            f"{name!r} is not an MLX LoRA tensor (a name ending in .lora_a or .lora_b)"
        )
    return module, leaf


def mlx_to_peft(
    weights: Mapping[str, Any],
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    dropout: float,
    base_model: str,
    revision: str | None = None,
) -> Path:
    """Write MLX LoRA tensors as a PEFT adapter folder.

    Args:
        weights: ``{"model.layers.0.self_attn.q_proj.lora_a": array, ...}`` (MLX or numpy
            arrays; every module needs both of its tensors).
        out_dir: the folder to write (created).
        r: LoRA rank; alpha: ``lora.alpha``; dropout: ``lora.dropout``.
        base_model: what ``base_model_name_or_path`` says (hub id or folder).
        revision: the base model's revision, when it came from the hub.

    Returns:
        ``out_dir``.

    Raises:
        AdapterFormatError: a tensor that is not a LoRA A/B matrix, or a module missing one.
    """
    import numpy as np
    from safetensors.numpy import save_file

    tensors: dict[str, Any] = {}
    modules: dict[str, set[str]] = {}
    for name, value in weights.items():
        module, leaf = _split(name)
        # fp32 whatever MLX trained in: the adapter is small, and torch loads fp32 everywhere.
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2:
            raise AdapterFormatError(f"{name}: expected a matrix, got shape {array.shape}")
        key = f"{_PEFT_PREFIX}{module}.{_MLX_LEAVES[leaf]}.weight"
        tensors[key] = np.ascontiguousarray(array.T)
        modules.setdefault(module, set()).add(leaf)
    incomplete = sorted(m for m, leaves in modules.items() if leaves != set(_MLX_LEAVES))
    if incomplete:
        raise AdapterFormatError(f"modules without both lora_a and lora_b: {incomplete[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # Leaf names, matched by suffix as PEFT does: the same set on every layer.
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def peft_to_mlx(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a PEFT LoRA adapter folder as MLX tensors and the settings to build its layers.

    Returns:
        ``(weights, settings)``: ``weights`` maps MLX parameter paths to ``mx.array``;
        ``settings`` has ``r``, ``alpha``, ``dropout``, ``scale``, ``target_modules`` (leaf
        names) and ``modules`` (the full module paths that carry an adapter).

    Raises:
        AdapterFormatError: naming the file and field of anything MLX's LoRA layer cannot
            express (DoRA, per-module ranks or alphas, extra trained modules, bias training).
    """
    import mlx.core as mx

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{config_path}: cannot read the adapter config ({exc})") from exc
    unsupported = {
        "peft_type": (config.get("peft_type") not in (None, "LORA"), "only LORA converts"),
        "use_dora": (bool(config.get("use_dora")), "DoRA has no MLX LoRA equivalent here"),
        "rank_pattern": (bool(config.get("rank_pattern")), "per-module ranks"),
        "alpha_pattern": (bool(config.get("alpha_pattern")), "per-module alphas"),
        "modules_to_save": (bool(config.get("modules_to_save")), "fully trained modules"),
        "trainable_token_indices": (
            bool(config.get("trainable_token_indices")),
            "trained embedding rows",
        ),
        "bias": (config.get("bias", "none") != "none", "trained biases"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "Conv1D-style (GPT-2) layers"),
    }
    for field, (bad, what) in unsupported.items():
        if bad:
            raise AdapterFormatError(
                f"{config_path}: {field}={config.get(field)!r} ({what}) cannot be converted to "
                "an MLX LoRA adapter; train it with train.backend: torch"
            )
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scale = scale_of(r, alpha, rslora=bool(config.get("use_rslora")))
    raw = cast(dict[str, Any], mx.load(str(adapter_dir / ADAPTER_WEIGHTS)))
    weights: dict[str, Any] = {}
    back = {v: k for k, v in _MLX_LEAVES.items()}
    for key, value in raw.items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith(".weight"):
            raise AdapterFormatError(f"{adapter_dir / ADAPTER_WEIGHTS}: unexpected tensor {key!r}")
        module, _, leaf = key[len(_PEFT_PREFIX) : -len(".weight")].rpartition(".")
        # PEFT names the default adapter in memory ("lora_A.default") but not on disk.
        if leaf not in back:
            raise AdapterFormatError(f"{adapter_dir / ADAPTER_WEIGHTS}: unexpected tensor {key!r}")
        weights[f"{module}.{back[leaf]}"] = value.T.astype(mx.float32)
    modules = sorted({k.rpartition(".")[0] for k in weights})
    settings = {
        "r": r,
        "alpha": alpha,
        "dropout": float(config.get("lora_dropout", 0.0)),
        "scale": scale,
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "modules": modules,
    }
    return weights, settings
