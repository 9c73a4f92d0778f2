"""The tokenizer and the model: the model folder found, the base quantised per the spec,
LoRA/DoRA adapters on top, seeded."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .._data import ensure_chat_template
from ..protocol import BUNDLE_DIR, ENV_MODEL_DIR, JobSpecData

__all__ = [
    "adapter_path",
    "compute_dtype",
    "load_model",
    "load_tokenizer",
    "model_path",
    "quiet",
]


def compute_dtype(name: str) -> Any:
    """The torch dtype for ``quant.compute_dtype``: "auto" = bf16 on a GPU that has it, else
    fp16 on a GPU, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _revision(spec: JobSpecData, path: str) -> str | None:
    return None if Path(path).is_dir() else spec.model_revision


def model_path(workdir: Path, spec: JobSpecData) -> str:
    """The model folder (checked), else the hub id as given.

    ``"model"`` is the bundled folder, or, for a model uploaded once per instance and found by
    its content hash, the folder the client named in ``LORABURST_MODEL_DIR``; an absolute path
    (the ``local`` provider uses a local folder in place) stays itself.

    Raises:
        FileNotFoundError: naming the folder, when it does not exist or has no config.json.
    """
    model = spec.model
    if model != "model" and not Path(model).is_absolute():
        return str(model)  # a hub id
    path = workdir / BUNDLE_DIR / model
    shared = os.environ.get(ENV_MODEL_DIR)
    if model == "model" and not path.exists() and shared:
        path = Path(shared)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"model folder {path} {what}; check the job's `model`")
    return str(path)


def adapter_path(workdir: Path, spec: JobSpecData) -> str | None:
    """The bundled starting adapter (``init_adapter``), checked; None for a fresh adapter.

    Raises:
        FileNotFoundError: naming the folder, when it holds no adapter_config.json.
    """
    if not spec.init_adapter:
        return None
    path = workdir / BUNDLE_DIR / spec.init_adapter
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"init_adapter {path} has no adapter_config.json")
    return str(path)


def quiet() -> None:
    """Keep agent.log to our events: no progress bars, no optional-kernel warnings."""
    # bitsandbytes looks for an optional hub kernel for CPU 4-bit matmuls and warns when it is
    # absent; the built-in path is the one we use, so the warning is noise in agent.log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The Rust tokenizer encodes each batch of rows on every core (nothing forks after it).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(spec: JobSpecData, path: str) -> tuple[Any, list[str]]:
    """The model's tokenizer with a chat template (the spec's, else its own, else ChatML) and a
    pad token; and the tokens we added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=_revision(spec, path))
    added = ensure_chat_template(tokenizer, spec.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def load_model(
    spec: JobSpecData,
    path: str,
    tokenizer: Any = None,
    added: list[str] | None = None,
    *,
    fast: bool = False,
    adapter: str | None = None,
    sharded: bool = False,
) -> tuple[Any, Any]:
    """Load the base model (quantised per ``spec``) and wrap it in fresh LoRA/DoRA adapters,
    or in ``adapter`` (a PEFT folder, trainable: :func:`adapter_path`).

    The adapters' initial values depend only on ``train.seed``. Special tokens added for the
    ChatML default get trainable embedding rows. With ``fast`` (CUDA, before
    :func:`loraburst.remote.fastpath.optimize`), embeddings and norms stay in bf16 instead of
    ``prepare_model_for_kbit_training``'s fp32 copies: the fast path computes norms in fp32
    internally, and recompute is its decision.

    With ``sharded`` (FSDP), 4-bit weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``) so that FSDP can flatten and shard them with the rest, and each
    rank quantises into host memory: FSDP then moves only its shard to its GPU, so a model larger
    than one card never has to fit one (accelerate's own RAM-efficient loading, rank 0 reading
    and the others on the meta device, is skipped for 4-bit weights). Otherwise, under torchrun,
    each rank loads onto its own GPU (``LOCAL_RANK``).

    Returns:
        ``(peft_model, tokenizer)``, ready to train, on CUDA when present, else CPU.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    if tokenizer is None:
        tokenizer, added = load_tokenizer(spec, path)
    quant, lora = spec.quant, spec.lora
    dtype = compute_dtype(quant.compute_dtype)
    bnb = None
    if spec.quantized and quant.bits == 4:
        bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
        )
    elif spec.quantized:
        bnb = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    device: Any = "cpu"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per rank
        torch.cuda.set_device(local)
        device = "cpu" if sharded else local
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=_revision(spec, path),
        quantization_config=bnb,
        dtype=dtype,
        device_map={"": device},
    )
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # a KV cache is dead weight in training
    if bnb is not None and not fast:
        # Recompute is the recipe's decision, not this helper's.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
    set_seed(spec.train.seed)
    if adapter is not None:
        # Continue a previous job's adapter: its own shape (r, targets, DoRA) is kept.
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter, is_trainable=True), tokenizer
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft takes any number
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=spec.method == "dora",
        task_type="CAUSAL_LM",
        trainable_token_indices=tokenizer.convert_tokens_to_ids(added) if added else None,
    )
    return get_peft_model(model, config), tokenizer
