"""Token counts through ``tokenizer.json`` alone are the counts transformers gives, and
transformers is used wherever that is not certain.

Each folder is a tokenizer saved the way a model's is; the counts of ``_exact`` through
``tokenizer_file.load`` must equal those through ``AutoTokenizer`` on text that holds special
tokens, accents, empty strings and rows long enough to be counted in pieces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loraburst._data import tokenizer_file, tokens
from loraburst._data.dataset import prepare_dataset

from tests.unit.test_dataset import SENTENCES, build_tokenizer

TEXTS = [
    *SENTENCES,
    "",
    " ",
    "the cat</s>",
    "<s> the <s>cat sat</s> on",
    "Paris — café, naïve; 東京 😀 the\tcat\nsat",
    "unknown words everywhere " * 30,
    "the cat sat on the mat " * 30_000,  # over _CHUNK_CHARS: counted in pieces
]


def _bpe(folder: Path, config: dict[str, Any] | None = None, **tokenizer_config: Any) -> Path:
    """A byte-level BPE with a BOS post-processor, its config, and settings in
    ``tokenizer_config.json`` (merged over what ``save_pretrained`` wrote)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator(SENTENCES * 20 + ["café naïve 東京"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **tokenizer_config}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _counts(tok: Any, kind: str) -> list[int]:
    if kind == "text":
        rows = [{"text": t} for t in TEXTS]
    else:
        rows = [{"prompt": t, "completion": " " + t[::-1]} for t in TEXTS]
    return tokens._exact(rows, kind, tok)


def _same_as_transformers(folder: Path) -> None:
    from transformers import AutoTokenizer

    plain = tokenizer_file.load(str(folder))
    assert plain is not None, "expected the tokenizer.json path"
    full = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert plain.eos_token == full.eos_token
    for kind in ("text", "prompt_completion"):
        assert _counts(plain, kind) == _counts(full, kind)


def test_word_level_with_a_bos_post_processor(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)  # the data tests' tokenizer: "<s> $A", no config.json
    _same_as_transformers(tmp_path)


def test_byte_level_bpe_in_a_llama_folder(tmp_path: Path) -> None:
    _same_as_transformers(_bpe(tmp_path, {"model_type": "llama", "transformers_version": "5.0.0"}))


def test_add_bos_and_eos_settings_follow_transformers(tmp_path: Path) -> None:
    # transformers 5 drops these when tokenizer.json is there: the file's post-processor rules.
    folder = _bpe(tmp_path, {"model_type": "llama"}, add_bos_token=False, add_eos_token=True)
    _same_as_transformers(folder)


def test_padding_and_truncation_in_the_file_are_off(tmp_path: Path) -> None:
    folder = _bpe(tmp_path, {"model_type": "llama"})
    data = json.loads((folder / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                          "stride": 0}  # fmt: skip
    data["padding"] = {"direction": "Right", "pad_id": 2, "pad_type_id": 0, "pad_token": "<|pad|>",
                       "strategy": "BatchLongest", "pad_to_multiple_of": None}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(data))
    _same_as_transformers(folder)


def _decoder_flag(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = {
        "0": {"content": "<|begin|>", "lstrip": True, "normalized": False, "rstrip": False,
              "single_word": False, "special": True},
    }  # fmt: skip
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda f: _set(f, tokenizer_class="LlamaTokenizer"), "a model-specific class"),
        (lambda f: _set(f, auto_map={"AutoTokenizer": ["x.Tok", None]}), "remote code"),
        (lambda f: _set(f, split_special_tokens=True), "special tokens split"),
        (lambda f: _set(f, add_prefix_space=True), "prefix space"),
        (lambda f: _set(f, extra_special_tokens=["<|new|>"]), "a token the file lacks"),
        (lambda f: _set(f, eos_token=None), "no EOS"),
        (lambda f: _model(f, {"model_type": "qwen2"}), "a model type with its own class"),
        (lambda f: (f / "added_tokens.json").write_text("{}"), "legacy added tokens"),
        (_decoder_flag, "an added token whose flags differ"),
    ],
)
def test_falls_back_to_transformers(tmp_path: Path, change: Any, why: str) -> None:
    folder = _bpe(tmp_path, {"model_type": "llama"})
    assert tokenizer_file.load(str(folder)) is not None
    change(folder)
    assert tokenizer_file.load(str(folder)) is None, why


def _set(folder: Path, **settings: Any) -> None:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))


def _model(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def test_model_types_keep_the_generic_class() -> None:
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    for model_type in tokenizer_file.PLAIN_MODEL_TYPES:
        assert model_type not in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
        assert TOKENIZER_MAPPING_NAMES.get(model_type) != "MistralCommonBackend"


def test_chat_rows_use_transformers(tmp_path: Path) -> None:
    folder = _bpe(tmp_path, {"model_type": "llama"})
    assert isinstance(tokens.load_tokenizer(str(folder), chat=False), tokenizer_file.FileTokenizer)
    assert not isinstance(tokens.load_tokenizer(str(folder)), tokenizer_file.FileTokenizer)


def test_text_rows_count_exactly_without_transformers(tmp_path: Path) -> None:
    folder = _bpe(tmp_path / "model", {"model_type": "llama"})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    probe = (
        "import json, sys\n"
        "from loraburst._data.dataset import prepare_dataset\n"
        "ds = prepare_dataset(sys.argv[1], tokenizer=sys.argv[2])\n"
        "print(json.dumps([ds.stats.tokens_exact, list(ds.stats.lengths),\n"
        "                  [m for m in ('transformers', 'torch') if m in sys.modules]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(data), str(folder)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    exact, lengths, imported = json.loads(out.stdout)
    assert exact and imported == []
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(str(folder))
    assert lengths == [len(full(t + full.eos_token)["input_ids"]) for t in SENTENCES]
    assert list(prepare_dataset(str(data), tokenizer=str(folder)).stats.lengths or []) == lengths
