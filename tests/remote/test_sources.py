"""The instance's side of data as users have it: hub sources read with their split expression,
row cap and columns (streamed where only their first rows are used), mixes drawn in their
proportions, and the named chat templates rendering, masking and adding their tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from loraburst.remote._data import IGNORE_INDEX, DataError, encode_row, ensure_chat_template
from loraburst.remote.protocol import JobSpecData, SourceSpec, TrainSpec
from loraburst.remote.templates import TEMPLATES
from loraburst.remote.training.sources import encode_sources, hub_rows, streams

from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]


@pytest.fixture
def hub_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dataset folder ``datasets.load_dataset`` reads as it reads a hub repo (offline), with
    Magicoder's rows under other column names."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hub"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for line in (DATA / "magicoder_sample.jsonl").read_text().splitlines():
            row = json.loads(line)
            f.write(json.dumps({"task": row["instruction"], "solution": row["response"]}) + "\n")
    return folder


def test_streaming_is_chosen_when_only_the_first_rows_are_used() -> None:
    assert streams(SourceSpec(path="o/d", max_rows=10))
    assert streams(SourceSpec(path="o/d", split="train[:100]"))
    assert not streams(SourceSpec(path="o/d"))
    assert not streams(SourceSpec(path="o/d", split="train[:10%]"))
    assert streams(SourceSpec(path="o/d", streaming=True))


def test_hub_rows_take_the_split_slice_and_the_cap(hub_folder: Path) -> None:
    streamed = hub_rows(SourceSpec(path=str(hub_folder), split="train[1:5]", max_rows=2))
    assert type(streamed).__name__ == "IterableDataset"
    tasks = [json.loads(line)["instruction"] for line in (DATA / "magicoder_sample.jsonl").open()]
    assert [r["task"] for r in streamed] == tasks[1:3]
    loaded = hub_rows(SourceSpec(path=str(hub_folder), split="train[50%:]", streaming=False))
    assert [r["task"] for r in loaded] == tasks[3:]
    with pytest.raises(DataError, match="cannot be streamed"):
        hub_rows(SourceSpec(path=str(hub_folder), split="train[-2:]", streaming=True))


def _spec(**train: Any) -> JobSpecData:
    return JobSpecData(model="m", train=TrainSpec(max_seq_len=256, **train))


def test_a_mix_of_a_bundled_file_and_a_hub_source_in_proportion(
    hub_folder: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_chat_template(tok)
    workdir = tmp_path / "run"
    (workdir / "bundle" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "data" / "chat.jsonl", workdir / "bundle/data/train-0.jsonl")
    n_chat = sum(1 for line in (ROOT / "examples/data/chat.jsonl").open() if line.strip())
    entries = [
        {"path": "data/train-0.jsonl", "kind": "messages", "weight": 3},
        {"path": str(hub_folder), "columns": {"prompt": "task", "response": "solution"},
         "weight": 1},
    ]  # fmt: skip
    rows, stats = encode_sources(workdir, entries, _spec(), tok)
    # 6 hub rows at a quarter of the mix: 18 chat rows (of n_chat) and all 6 hub rows.
    assert [s["taken"] for s in stats["sources"]] == [min(18, n_chat), 6]
    assert stats["rows"] == len(rows) == min(18, n_chat) + 6
    again, _ = encode_sources(workdir, entries, _spec(), tok)
    assert again == rows  # the same seed draws the same rows
    other, _ = encode_sources(workdir, entries, _spec(seed=7), tok)
    assert other != rows
    with pytest.raises(DataError, match="give every source a weight"):
        encode_sources(workdir, [entries[0], {**entries[1], "weight": None}], _spec(), tok)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_named_templates_render_mask_and_add_their_tokens(tiny_model: Path, name: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    before = set(tok.get_vocab())
    added = ensure_chat_template(tok, name)
    template = TEMPLATES[name]
    assert tok.chat_template == template.jinja
    assert added == [t for t in template.special_tokens if t not in before]
    assert all(t in tok.get_vocab() for t in template.special_tokens)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert "Be brief." in text and "Four." in text and "Six." in text
    enc = encode_row({"messages": CHAT}, "messages", tok)
    learned = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    # Only the replies (and their end of turn) carry the loss, never the questions.
    assert "Four." in learned and "Six." in learned
    assert "two plus two" not in learned and "Be brief" not in learned
    if template.end_of_turn:
        assert learned.count(template.end_of_turn) == 2


def test_a_jinja_template_from_the_spec_is_used_as_given(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert ensure_chat_template(tok, jinja) == []
    assert tok.apply_chat_template(CHAT[1:3], tokenize=False) == (
        "user: What is two plus two?\nassistant: Four.\n"
    )
