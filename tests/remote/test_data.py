"""Tokenisation and loss masks with real tokenizers (the tiny model's, and one without ChatML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from loraburst.remote._data import (
    IGNORE_INDEX,
    DataError,
    encode_row,
    encode_rows,
    ensure_chat_template,
    normalise_row,
    read_jsonl,
)
from loraburst.remote.protocol import DEFAULT_CHAT_TEMPLATE

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
}


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert ensure_chat_template(tokenizer) == []  # the tiny vocabulary has the ChatML tokens
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _trained(tok: Any, enc: dict[str, list[int]]) -> str:
    return str(tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]))


def test_loss_only_on_assistant_turns_and_their_end_of_turn(tok: Any) -> None:
    enc = encode_row(CHAT, "messages", tok)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _trained(tok, enc) == "The capital of France is Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    # Masked positions are exactly the prompt's; unmasked labels equal the inputs.
    for i, label in zip(enc["input_ids"], enc["labels"], strict=True):
        assert label in (IGNORE_INDEX, i)

    everything = encode_row(CHAT, "messages", tok, loss_on="all")
    assert everything["labels"] == everything["input_ids"] == enc["input_ids"]


def test_prompt_completion_and_text(tok: Any) -> None:
    enc = encode_row(
        {"prompt": "Q: capital of Peru?\nA:", "completion": " Lima"}, "prompt_completion", tok
    )
    assert _trained(tok, enc) == " Lima<|endoftext|>"
    assert tok.decode(enc["input_ids"]) == "Q: capital of Peru?\nA: Lima<|endoftext|>"
    text = encode_row({"text": "Paris is in France."}, "text", tok)
    assert text["labels"] == text["input_ids"]
    assert tok.decode(text["input_ids"]) == "Paris is in France.<|endoftext|>"
    with pytest.raises(DataError, match="unknown data_format 'csv'"):
        encode_row({"text": "x"}, "csv", tok)


def test_tokenizer_without_chatml_gets_the_default_and_its_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["hello world", "the capital"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    size = len(tokenizer)
    assert ensure_chat_template(tokenizer) == ["<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == size + 2 and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    enc = encode_row(CHAT, "messages", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert enc["input_ids"].count(im_end) == 5  # one special token per turn, not pieces
    assert [t for t in enc["labels"] if t == im_end] == [im_end, im_end]  # the assistant's two


def test_template_that_rewrites_earlier_turns_falls_back_to_the_replies(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # Earlier assistant turns are rendered differently from the last one (as some "thinking"
    # templates do), so rendering a prefix does not give a prefix of the whole.
    tokenizer.chat_template = (
        "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{%- if m['role'] == 'assistant' and not loop.last %} (earlier){% endif -%}"
        "<|im_end|>\n{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )
    enc = encode_row(CHAT, "messages", tokenizer)
    assert _trained(tokenizer, enc).startswith("The capital of France is Paris.")
    assert _trained(tokenizer, enc).endswith("Madrid.<|im_end|>")


def test_truncation_and_rows_with_nothing_left_to_learn(tok: Any) -> None:
    long_prompt = {
        "messages": [
            {"role": "user", "content": "Tell me about France. " * 20},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    short = {"messages": CHAT["messages"][1:3]}
    rows, stats = encode_rows([short, long_prompt], "messages", tok, max_seq_len=40)
    assert all(len(r["input_ids"]) <= 40 for r in rows)
    assert stats["rows"] == 1 and stats["dropped"] == 1 and stats["truncated"] == 1
    assert stats["loss_tokens"] == sum(1 for t in rows[0]["labels"] if t != IGNORE_INDEX)
    with pytest.raises(DataError, match=r"data/train.jsonl: no row .* raise train.max_seq_len"):
        encode_rows([long_prompt], "messages", tok, max_seq_len=40, source="data/train.jsonl")
    with pytest.raises(DataError, match="data/train.jsonl row 2: "):
        encode_rows([short, {"oops": 1}], "hub", tok, max_seq_len=64, source="data/train.jsonl")


def test_hub_rows_are_detected_and_normalised() -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert normalise_row(sharegpt) == (
        "messages",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    )
    alpaca = {"instruction": "Add", "input": "1+1", "output": "2"}
    assert normalise_row(alpaca)[1]["messages"][0] == {"role": "user", "content": "Add\n\n1+1"}
    assert normalise_row({"prompt": "a", "completion": "b"})[0] == "prompt_completion"
    assert normalise_row({"text": "t", "meta": 1}) == ("text", {"text": "t"})
    with pytest.raises(DataError, match=r"keys \['foo'\]"):
        normalise_row({"foo": "bar"})


def test_read_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=f"{path}:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path)
