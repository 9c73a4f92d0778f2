"""The public datasets' row layouts (OpenHermes 2.5's ShareGPT conversations, Magicoder's
instruction/response) mixed in one job and trained through the local provider on the tiny
base model, with a chat template named in the spec: the adapter carries the template and its
tokens, the run records them, and the data report lies in the run's folder."""

from __future__ import annotations

import json
from pathlib import Path

from loraburst import Job
from loraburst._state.home import runs_dir
from loraburst.remote.templates import TEMPLATES

from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"


def test_a_mix_of_public_layouts_trains_with_a_named_template(
    tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = Job(
        str(tiny_model),
        [
            {"path": str(DATA / "openhermes_sample.jsonl"), "weight": 1},
            {"path": str(DATA / "magicoder_sample.jsonl"), "weight": 1},
        ],
        chat_template="llama-3",
        system_prompt="You are a helpful assistant.",
        train={
            "max_steps": 3,
            "micro_batch_size": 2,
            "max_seq_len": 128,
            "learning_rate": 3e-3,
            "save_every_steps": None,
        },  # fmt: skip
        output_dir=tmp_path / "out",
        name="mix",
    )
    train, _ = job.prepare()
    assert train.stats.rows == 12  # 6 + 6: the 1:1 weights, Magicoder's 6 rows all used
    result = job.run(provider="local", progress=False)

    assert result.status == "succeeded"
    data = result.metrics["data"]
    assert [s["taken"] for s in data["sources"]] == [6, 6] and data["rows"] == 12
    assert data["chat_template"] == "llama-3"
    # The adapter's tokenizer carries the template and the tokens it added.
    adapter = result.adapter_path
    assert adapter is not None
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template == TEMPLATES["llama-3"].jinja
    assert all(t in tok.get_vocab() for t in TEMPLATES["llama-3"].special_tokens)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The base, grown by the added tokens, loads the adapter with their trained rows.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.resize_token_embeddings(len(tok))
    assert PeftModel.from_pretrained(base, adapter) is not None
    # The data report travelled with the run.
    report = json.loads((runs_dir() / result.job_id / "data_report.json").read_text())
    assert [s["rows"] for s in report["sources"]] == [8, 6]
