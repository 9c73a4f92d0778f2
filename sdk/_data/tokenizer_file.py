"""A model folder's ``tokenizer.json`` through the ``tokenizers`` library alone, where
transformers would tokenise with it unchanged: exact counts of text and prompt/completion rows
without importing transformers (2+ s, and torch with ``AutoTokenizer``).

``AutoTokenizer`` (transformers 5) builds a ``TokenizersBackend`` straight from
``tokenizer.json`` when ``tokenizer_config.json`` names a generic class and the model type does
not force its own; it then adds the special tokens the config names (a no-op when
``tokenizer.json`` already holds them, special and unstripped), drops ``add_bos_token`` and
``add_eos_token`` (the file's post-processor decides), and calls ``encode_batch`` with
truncation and padding off. ``load`` returns None, so that the caller uses transformers, for
anything else: another transformers major version, a model-specific or remote tokenizer class,
tokens the config adds or changes, a vocabulary transformers may patch (Mistral's regex), a
legacy ``added_tokens.json``. Chat rows are not counted here: their template is rendered by
transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLAIN_CLASSES", "PLAIN_MODEL_TYPES", "FileTokenizer", "load"]

# tokenizer_config.json classes that AutoTokenizer loads as TokenizersBackend from the file.
PLAIN_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# config.json model types for which AutoTokenizer keeps such a class (not in transformers'
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, not MistralCommonBackend; a test checks).
PLAIN_MODEL_TYPES = frozenset({
    "llama", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen3", "qwen3_moe", "olmo2",
    "granite", "smollm3", "phi", "falcon", "gpt_neox", "starcoder2",
})  # fmt: skip
_NAMED = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Files or settings that make transformers add or alter tokens or the pipeline.
_LEGACY_FILES = ("added_tokens.json", "tekken.json")
_ALTERING_KEYS = ("auto_map", "split_special_tokens", "add_prefix_space", "fix_mistral_regex")
_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")
# Over this many tokens transformers may patch a Mistral pre-tokenizer's regex.
_PATCHED_VOCAB = 100_000


@dataclasses.dataclass
class FileTokenizer:
    """What ``tokens._exact`` uses of a transformers tokenizer, for text rows: ``eos_token`` and
    a call that returns ``input_ids`` per text (``Encoding`` objects: their ``len`` is their
    number of ids)."""

    backend: Any  # tokenizers.Tokenizer
    eos_token: str | None

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": encodings}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _content(value: Any) -> tuple[str, dict[str, Any]] | None:
    """A special token's text and its explicit flags (a string, or an AddedToken's dict)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], {k: value[k] for k in _FLAGS if k in value}
    return None


def _transformers_major() -> int | None:
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _special_tokens(config: dict[str, Any]) -> list[Any] | None:
    """Every token the config makes special (None: one we cannot read)."""
    values: list[Any] = []
    for key, value in config.items():
        named = key in _NAMED and value is not None
        if named or (key.endswith("_token") and isinstance(value, (str, dict))):
            values.append(value)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            extra = list(extra.values())
        if extra is None:
            continue
        if not isinstance(extra, list):
            return None
        values += extra
    return values


def _plain(folder: Path, config: dict[str, Any], file: dict[str, Any]) -> bool:
    """Whether transformers 5 would tokenise with ``tokenizer.json`` as it is (see above)."""
    if _transformers_major() != 5 or config.get("tokenizer_class") not in PLAIN_CLASSES:
        return False
    if any(config.get(k) for k in _ALTERING_KEYS) or "add_prefix_space" in config:
        return False
    if config.get("backend", "tokenizers") != "tokenizers":
        return False
    if any((folder / f).exists() for f in _LEGACY_FILES):
        return False
    decoder = config.get("added_tokens_decoder")
    if decoder is None and (folder / "special_tokens_map.json").exists():
        return False  # read only without added_tokens_decoder; not worth following
    model = _json(folder / "config.json") if (folder / "config.json").exists() else {}
    if model is None or (model and model.get("model_type") not in PLAIN_MODEL_TYPES):
        return False
    added = file.get("added_tokens")
    if not isinstance(added, list):
        return False
    by_content = {t.get("content"): t for t in added if isinstance(t, dict)}
    # The config's added tokens must be the file's, flag for flag.
    if decoder is not None:
        if not isinstance(decoder, dict):
            return False
        for idx, tok in decoder.items():
            have = by_content.get(tok.get("content")) if isinstance(tok, dict) else None
            if have is None or str(have.get("id")) != str(idx):
                return False
            if any(
                bool(tok.get(k, False)) != bool(have.get(k, False)) for k in (*_FLAGS, "special")
            ):
                return False
    # Each special token is already in the file, special, matched as written: adding it again
    # (transformers does) changes nothing.
    specials = _special_tokens(config)
    if specials is None:
        return False
    for value in specials:
        parsed = _content(value)
        if parsed is None:
            return False
        text, flags = parsed
        have = by_content.get(text)
        if have is None or not have.get("special") or any(have.get(k) for k in _FLAGS):
            return False
        if any(flags.values()):
            return False
    return isinstance(config.get("eos_token"), (str, dict))


def load(name: str) -> FileTokenizer | None:
    """The folder's ``tokenizer.json`` as transformers would use it, or None (use
    transformers: see the module's docstring for when)."""
    folder = Path(name).expanduser()
    path = folder / "tokenizer.json"
    if not folder.is_dir() or not path.is_file():
        return None
    config = _json(folder / "tokenizer_config.json")
    file = _json(path)
    if config is None or file is None or not _plain(folder, config, file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception:  # a file tokenizers cannot read: let transformers report it
        return None
    if backend.get_vocab_size(with_added_tokens=True) > _PATCHED_VOCAB and backend.pre_tokenizer:
        model = _json(folder / "config.json") if (folder / "config.json").exists() else {}
        if model and not model.get("transformers_version"):
            return None  # transformers would check for a Mistral regex to patch
    backend.no_truncation()
    backend.no_padding()
    eos = _content(config["eos_token"])
    return FileTokenizer(backend, eos[0] if eos else None)
