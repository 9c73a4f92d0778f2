"""Which trainer runs a job (``train.backend``), what each needs, and what MLX cannot do.

Two recipes train the same job spec: ``torch`` (:mod:`.trainer`: transformers + peft +
bitsandbytes, CUDA or CPU) and ``mlx`` (:mod:`.mlx_trainer`: Apple's MLX + mlx-lm, Metal on
Apple Silicon, or MLX's CPU build elsewhere). ``auto`` resolves on the machine that trains:
MLX on Apple Silicon (macOS on arm64, where CUDA does not exist and torch's CPU path is far too
slow for a 7B model), torch everywhere else.

The MLX recipe cannot honour every setting the torch one can. :func:`mlx_refusals` names each
such setting with the alternative, so the client refuses the job before anything runs (where
it knows the backend will be MLX) and the instance refuses it again before loading a model.

Standard library only: the client, the agent's ``--check`` and both recipes import it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

from .protocol import ENV_BACKEND

__all__ = [
    "BACKENDS",
    "MLX_REQUIREMENTS",
    "is_apple_silicon",
    "mlx_refusals",
    "requirements",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "mlx")

# What the MLX recipe imports on the instance (the tokenizer and data path are transformers',
# so masking is byte-for-byte the torch recipe's). Floors are the versions it was tested with.
MLX_REQUIREMENTS = (
    "mlx>=0.29",
    "mlx-lm>=0.28",
    "transformers>=4.56",
    "safetensors>=0.4",
    "datasets>=3",  # hub datasets, read as the torch recipe reads them
)

# transformers optimizer names that mean "AdamW" to the torch recipe; MLX has one AdamW.
_MLX_OPTIMIZERS = frozenset(
    {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_torch_xla", "sgd"}
)


def is_apple_silicon(system: str | None = None, machine: str | None = None) -> bool:
    """Whether this is macOS on an Apple M-series chip (``arm64``)."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    return system == "Darwin" and machine == "arm64"


def resolve_backend(requested: str | None, *, apple_silicon: bool | None = None) -> str:
    """``train.backend`` as this machine will run it: ``"torch"`` or ``"mlx"``.

    Args:
        requested: ``"auto"`` (or None, a spec from before the key existed), ``"torch"`` or
            ``"mlx"``.
        apple_silicon: override the platform check (the client resolving for another machine).
            Without it, ``LORABURST_BACKEND`` (set by the client when it already resolved
            "auto" for this machine) comes first.

    Raises:
        ValueError: an unknown backend name.
    """
    name = requested or "auto"
    if name not in BACKENDS:
        raise ValueError(f"train.backend={name!r}: use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    chosen = os.environ.get(ENV_BACKEND) if apple_silicon is None else None
    if chosen in ("torch", "mlx"):
        return chosen  # the client resolved "auto" for this machine (see protocol.ENV_BACKEND)
    apple = is_apple_silicon() if apple_silicon is None else apple_silicon
    return "mlx" if apple else "torch"


def mlx_refusals(spec: Mapping[str, Any]) -> list[str]:
    """Settings of ``spec`` (``JobSpec.model_dump(mode="json")``) the MLX recipe cannot honour.

    Each entry names the field, why, and what to use instead; an empty list means the job can
    train with MLX. Defaults never appear here: a spec written for the torch recipe with
    default settings trains on a Mac unchanged.
    """
    out: list[str] = []
    method, quant, train = spec.get("method", "qlora"), spec.get("quant", {}), spec.get("train", {})
    torch_alt = "or train.backend: torch on a CUDA GPU"
    if method == "dora":
        out.append(
            "method: dora is not available with the MLX backend (its adapter would not convert "
            f"to PEFT's DoRA layout); use method: qlora or lora, {torch_alt}"
        )
    quantized = method != "lora" and quant.get("bits", 4) in (4, 8)
    if quantized and quant.get("bits") == 8:
        out.append(
            "quant.bits: 8 means bitsandbytes LLM.int8, which MLX does not have; use quant.bits: "
            f"4 (MLX's 4-bit quantisation) or 16 (no quantisation), {torch_alt}"
        )
    if quantized and quant.get("bits") == 4 and quant.get("quant_type", "nf4") == "fp4":
        out.append(
            "quant.quant_type: fp4 (bitsandbytes FP4) has no MLX equivalent; use quant_type: nf4 "
            f"(trained as MLX's 4-bit affine quantisation, groups of 64), {torch_alt}"
        )
    if train.get("gradient_checkpointing") == "offload":
        out.append(
            'train.gradient_checkpointing: "offload" needs separate host memory, which Apple '
            "Silicon's unified memory does not have; use true (recompute every layer) or "
            f'"auto", {torch_alt}'
        )
    if train.get("packing") is True:
        out.append(
            "train.packing: true needs per-row attention masks that mlx-lm's models do not "
            'take; use packing: "auto" or false (rows are batched by length instead), '
            f"{torch_alt}"
        )
    ev = spec.get("evaluation") or {}
    if ev.get("enabled") is True or ev.get("tasks") or ev.get("min_loss_drop") is not None:
        out.append(  # evaluation hook: remote/evaluate.py runs in the torch recipe only
            "evaluation: base-against-tuned evaluation (enabled: true, tasks, min_loss_drop) "
            f'runs in the torch recipe only; use evaluation.enabled: "auto", {torch_alt}'
        )
    optim = str(train.get("optim", "adamw_torch"))
    if optim not in _MLX_OPTIMIZERS:
        out.append(
            f"train.optim: {optim!r} has no MLX equivalent (8-bit and paged optimizers are "
            f"bitsandbytes'); use optim: adamw_torch (MLX's AdamW) or sgd, {torch_alt}"
        )
    objective = spec.get("objective") or {}
    kind = objective.get("type", "sft") if isinstance(objective, dict) else objective
    if kind != "sft":
        out.append(f"objective: {kind} is trained by the torch recipe only; {torch_alt}")
    if spec.get("init_adapter"):
        out.append(f"init_adapter: the MLX recipe starts from a fresh adapter; {torch_alt}")
    return out


def requirements(backend: str) -> tuple[str, ...]:
    """The packages a backend's recipe needs on the training machine (``name>=floor``)."""
    from . import protocol  # read at call time: tests swap the list

    return MLX_REQUIREMENTS if backend == "mlx" else protocol.TRAINER_REQUIREMENTS
