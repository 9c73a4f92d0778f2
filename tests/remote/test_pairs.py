"""Pairs on the instance: tokenised with the prompt off the loss, batched as two-row units, and
each sequence's log-probability the same padding-free, padded, or computed alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from loraburst.remote._data import IGNORE_INDEX, DataError, ensure_chat_template
from loraburst.remote.pairs import encode_pairs

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "The capital of France is Rome."},
    {"prompt": "Name the capital of Japan.", "chosen": "Tokyo.", "rejected": "It is Osaka, I think."},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_chat_template(tok)
    return tok


def test_pairs_share_the_prompt_and_learn_only_the_answers(tokenizer: Any) -> None:
    rows, stats = encode_pairs(PAIRS, tokenizer, max_seq_len=64)
    assert stats["rows"] == 2 and len(rows) == 4 and stats["dropped"] == 0
    for chosen, rejected in zip(rows[::2], rows[1::2], strict=True):
        n = sum(1 for t in chosen["labels"] if t == IGNORE_INDEX)
        assert n > 0 and chosen["input_ids"][:n] == rejected["input_ids"][:n]
        for row in (chosen, rejected):
            assert row["labels"][n:] == row["input_ids"][n:]  # the answer, all of it
            assert row["input_ids"][-1] == tokenizer.eos_token_id
    # Conversations (DPO Mix 7K's shape) go through the chat template: answer ends its turn.
    chat = [{"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}]  # fmt: skip
    rows, _ = encode_pairs(chat, tokenizer, max_seq_len=64)
    answer = [t for t in rows[0]["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(answer).strip().startswith("Hello.")


def test_lengths_are_cut_prompt_from_the_front(tokenizer: Any) -> None:
    full, _ = encode_pairs(PAIRS[:1], tokenizer, max_seq_len=64)
    rows, stats = encode_pairs(PAIRS[:1], tokenizer, max_seq_len=64, max_prompt_len=3)
    prompt = [t for t, lab in zip(full[0]["input_ids"], full[0]["labels"], strict=True)
              if lab == IGNORE_INDEX]  # fmt: skip
    assert rows[0]["input_ids"][:3] == prompt[-3:] and stats["truncated"] == 1
    # Cut so short that both answers read the same: the pair teaches nothing and is dropped.
    with pytest.raises(DataError, match="no pair is left"):
        encode_pairs(PAIRS[:1], tokenizer, max_seq_len=12, max_prompt_len=9)


def test_a_hub_row_that_is_not_a_pair_names_its_row(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"hub/x row 2: 'rejected' is missing"):
        encode_pairs([PAIRS[0], {"prompt": "Q", "chosen": "A"}], tokenizer, max_seq_len=64,
                     source="hub/x")  # fmt: skip


def test_sequence_logps_flat_padded_and_alone_agree(tiny_model: Path, tokenizer: Any) -> None:
    import torch
    from loraburst.remote.attention import register
    from loraburst.remote.protocol import ObjectiveSpec
    from loraburst.remote.training.preference import (
        pair_collate,
        precompute_reference,
        preference_loss,
        sequence_logps,
    )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows, _ = encode_pairs(PAIRS, tokenizer, max_seq_len=64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    units = [rows[0:2], rows[2:4]]
    # Each sequence alone, through the ordinary forward.
    alone = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            labels = torch.tensor(row["labels"][1:])
            keep = labels != IGNORE_INDEX
            alone.append(logits[keep].gather(1, labels[keep][:, None]).sum().item())
        padded = sequence_logps(model, pair_collate(units, layout="padded", pad_id=0))
        base.config._attn_implementation = register()
        flat = sequence_logps(model, pair_collate(units, layout="flat", pad_id=0))
    assert padded.tolist() == pytest.approx(alone, abs=1e-4)
    assert flat.tolist() == pytest.approx(alone, abs=1e-4)
    # Before training the policy is its reference: DPO's loss is log 2, and a precomputed
    # reference holds the same numbers as the live one.
    batch = pair_collate(units, layout="flat", pad_id=0)
    loss, metrics = preference_loss(model, batch, ObjectiveSpec(type="dpo"))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and metrics[0].item() == 0.0
    plan: Any = type("Plan", (), {"units": [[0, 1], [2, 3]], "micro_batch": 2})()
    precompute_reference(model, rows, plan, layout="flat", pad_id=0)
    assert [r["ref_logp"] for r in rows] == pytest.approx(alone, abs=1e-4)
    assert "ref_logps" in pair_collate(units, layout="flat", pad_id=0)
