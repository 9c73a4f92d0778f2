"""Model shapes: a registry of popular bases (exact ``config.json`` numbers) or a local folder.

Each registry entry is the subset of the model's published ``config.json`` that the FLOPs and
VRAM model reads, keyed by a normalised name, so ``meta-llama/Meta-Llama-3-8B-Instruct``,
``llama-3-8b`` and ``unsloth/llama-3-8b-bnb-4bit`` all find the same shape.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

from loraburst.remote.memory import Shape, param_counts, shape_from_config

from .._exceptions import EstimateError

__all__ = ["REGISTRY", "ModelShape", "model_shape"]


def _cfg(
    mt: str,
    h: int,
    layers: int,
    heads: int,
    kv: int,
    inter: int,
    vocab: int,
    tied: bool,
    head_dim: int | None = None,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": mt,
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


_L3_8B = _cfg("llama", 4096, 32, 32, 8, 14336, 128256, False)
_L3_70B = _cfg("llama", 8192, 80, 64, 8, 28672, 128256, False)
# Every Gemma 2 soft-caps its attention logits (trained with eager attention, which keeps the
# scores) and its final logits (the loss keeps one more fp32 copy of its chunk).
_GEMMA2_SOFTCAP = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}

# name -> (hub id, config, aliases)
REGISTRY: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", _L3_8B, ("llama-3-8b", "llama3-8b")),
    "llama-3.2-1b": (
        "meta-llama/Llama-3.2-1B",
        _cfg("llama", 2048, 16, 32, 8, 8192, 128256, True, 64),
        (),
    ),
    "llama-3.2-3b": (
        "meta-llama/Llama-3.2-3B",
        _cfg("llama", 3072, 28, 24, 8, 8192, 128256, True, 128),
        (),
    ),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", _L3_70B, ("llama-3-70b", "llama-3.3-70b")),
    "mistral-7b-v0.1": (
        "mistralai/Mistral-7B-v0.1",
        _cfg("mistral", 4096, 32, 32, 8, 14336, 32000, False, 128),
        ("mistral-7b-v0.2",),
    ),
    "mistral-7b-v0.3": (
        "mistralai/Mistral-7B-v0.3",
        _cfg("mistral", 4096, 32, 32, 8, 14336, 32768, False, 128),
        ("mistral-7b",),
    ),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", _cfg("qwen2", 896, 24, 14, 2, 4864, 151936, True), ()),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", _cfg("qwen2", 1536, 28, 12, 2, 8960, 151936, True), ()),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B", _cfg("qwen2", 2048, 36, 16, 2, 11008, 151936, True), ()),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", _cfg("qwen2", 3584, 28, 28, 4, 18944, 152064, False), ()),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", _cfg("qwen2", 5120, 48, 40, 8, 13824, 152064, False), ()),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B", _cfg("qwen2", 5120, 64, 40, 8, 27648, 152064, False), ()),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", _cfg("qwen2", 8192, 80, 64, 8, 29568, 152064, False), ()),
    "gemma-2-2b": (
        "google/gemma-2-2b",
        _cfg("gemma2", 2304, 26, 8, 4, 9216, 256000, True, 256) | _GEMMA2_SOFTCAP,
        (),
    ),
    "gemma-2-9b": (
        "google/gemma-2-9b",
        _cfg("gemma2", 3584, 42, 16, 8, 14336, 256000, True, 256) | _GEMMA2_SOFTCAP,
        (),
    ),
    "gemma-2-27b": (
        "google/gemma-2-27b",
        _cfg("gemma2", 4608, 46, 32, 16, 36864, 256000, True, 128) | _GEMMA2_SOFTCAP,
        (),
    ),
    "phi-3-mini": (
        "microsoft/Phi-3-mini-4k-instruct",
        _cfg("phi3", 3072, 32, 32, 32, 8192, 32064, False),
        ("phi-3-mini-128k",),
    ),
    "phi-4-mini": (
        "microsoft/Phi-4-mini-instruct",
        _cfg("phi3", 3072, 32, 24, 8, 8192, 200064, True, 128),
        (),
    ),
}


def _norm(model: str) -> str:
    n = model.lower().strip().rstrip("/").rsplit("/", 1)[-1]
    n = n.removeprefix("meta-")
    n = re.sub(r"-(instruct|it|hf|chat|base|4k|bnb-4bit)(?=-|$)", "", n)
    n = re.sub(r"^llama(\d)", r"llama-\1", n)
    return re.sub(r"^qwen-?(\d)", r"qwen\1", n)


_INDEX: dict[str, str] = {}
for _name, (_hub, _c, _aliases) in REGISTRY.items():
    for _key in (_name, _hub, *_aliases):
        _INDEX[_norm(_key)] = _name


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's shape and where it came from (``registry:<name>`` or a config.json path)."""

    name: str
    source: str
    config: dict[str, Any]
    shape: Shape

    @property
    def params(self) -> int:
        return int(param_counts(self.shape)["total"])

    @property
    def download_bytes(self) -> float:
        """Size of the bf16 checkpoint that the instance downloads."""
        return 2.0 * self.params


def model_shape(model: str, revision: str | None = None) -> ModelShape:
    """The shape of ``model``: a local folder with ``config.json``, the registry, or the hub.

    A hub id that is not in the registry has just its ``config.json`` fetched with
    ``huggingface_hub`` (cached; honours ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME`` and offline
    mode, ``HF_HUB_OFFLINE=1``).

    Raises:
        EstimateError: the folder has no usable config.json; or the hub has no such repo, it is
            gated, it has no config.json, or it cannot be reached and the file is not cached;
            the message says what to do.
    """
    path = Path(model).expanduser()
    if path.is_dir() or path.name == "config.json":
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise EstimateError(
                f"{path} has no config.json; put the model's config.json there (or name a "
                f"known model id: {', '.join(REGISTRY)})",
                model=model,
            )
        return _from_file(model, path.name, cfg_path)
    key = _INDEX.get(_norm(model))
    if key is not None:
        hub, config, _ = REGISTRY[key]
        return ModelShape(key, f"registry:{hub}", dict(config), shape_from_config(config))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return _from_file(model, model, _hub_config(model, revision))
    close = difflib.get_close_matches(_norm(model), list(_INDEX), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(sorted({_INDEX[c] for c in close}))}?" if close else ""
    raise EstimateError(
        f"unknown model {model!r}: not a local folder with a config.json, not a hub id "
        f"(owner/name) and not in the shape registry.{hint} Known: {', '.join(REGISTRY)}",
        model=model,
    )


def _from_file(model: str, name: str, cfg_path: Path) -> ModelShape:
    try:
        config = json.loads(cfg_path.read_text())
        shape = shape_from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EstimateError(f"{cfg_path}: not a usable config.json ({exc})", model=model) from exc
    return ModelShape(name, str(cfg_path), config, shape)


def _hub_config(model: str, revision: str | None) -> Path:
    """``config.json`` of a hub repo, from the local cache or downloaded (that file only)."""
    import os

    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise EstimateError(
            f"reading {model}'s config.json from the hub needs huggingface_hub: "
            "`pip install huggingface_hub`",
            model=model,
        ) from exc
    endpoint = os.environ.get("HF_ENDPOINT") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    site = endpoint or "https://huggingface.co"
    try:
        return Path(
            hf_hub_download(
                model, "config.json", revision=revision, endpoint=endpoint,
                local_files_only=offline, token=os.environ.get("HF_TOKEN") or None,
            )
        )  # fmt: skip
    except GatedRepoError as exc:
        raise EstimateError(
            f"{model} is a gated repo: accept its terms at {site}/{model} and set HF_TOKEN to a "
            "token of that account (or give a local folder with its config.json)",
            model=model,
        ) from exc
    except RepositoryNotFoundError as exc:
        raise EstimateError(
            f"no model repo {model!r} on {site} (a private repo needs HF_TOKEN); check the id",
            model=model,
        ) from exc
    except RevisionNotFoundError as exc:
        raise EstimateError(
            f"{model} has no revision {revision!r}; check model_revision", model=model
        ) from exc
    except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: first
        why = "offline mode (HF_HUB_OFFLINE=1) is on" if offline else f"{site} cannot be reached"
        raise EstimateError(
            f"{model}'s config.json is not in the local cache and {why}: go online once, or "
            f"`huggingface-cli download {model} config.json --local-dir ./{_norm(model)}` and "
            f"use ./{_norm(model)} as the model",
            model=model,
        ) from exc
    except EntryNotFoundError as exc:
        raise EstimateError(
            f"{model} has no config.json on {site}; is it a model repo? Give a local folder "
            "with its config.json instead",
            model=model,
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise EstimateError(f"reading {model}'s config.json from {site} failed: {exc}",
                            model=model) from exc  # fmt: skip
