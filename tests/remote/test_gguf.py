"""GGUF files: read back with gguf's reader (tensors, metadata, tokenizer) and, independently of
our writer, loaded by transformers' own GGUF reader with weights equal to the merged model's;
an export whose model never stops fails with the reason and leaves no file; llama.cpp, where
present, generates and stops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from loraburst.remote import export, gguf_export, llama_cpp
from loraburst.remote.merge import merge

from tests.remote.test_merge import make_adapter

_TOL = {"f16": 2e-3, "q8_0": 2e-2}


@pytest.fixture(scope="module")
def merged(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(tiny_model, root / "adapter")
    merge(tiny_model, adapter, root / "merged")
    return root / "merged"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_reads_back_with_tensors_metadata_and_tokenizer(
    merged: Path, tmp_path: Path, quant: str
) -> None:
    import gguf
    from transformers import AutoTokenizer

    path = tmp_path / f"m.{quant}.gguf"
    written = gguf_export.write(merged, path, quant, name="tiny")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    config = json.loads((merged / "config.json").read_text())
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert field("llama.block_count") == config["num_hidden_layers"]
    assert field("llama.embedding_length") == config["hidden_size"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"] == written["tensors"]
    expected = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == expected
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_weights_dequantise_to_the_merged_model(
    merged: Path, tmp_path: Path, quant: str
) -> None:
    """transformers' GGUF loader (its own name mapping and un-permutation of q/k) recovers the
    merged weights within the quantisation's error."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"m.{quant}.gguf"
    gguf_export.write(merged, path, quant)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert set(reference) <= set(loaded)
    for name, weight in reference.items():
        got = loaded[name].to(torch.float32)
        err = float((got - weight).abs().max()) / float(weight.abs().max())
        assert err < _TOL[quant], (name, err)


def _workdir(tmp_path: Path, tiny_model: Path, exports: list[str]) -> Path:
    work = tmp_path / "work"
    (work / "bundle").mkdir(parents=True)
    make_adapter(tiny_model, work / "adapter")
    spec = {"model": str(tiny_model), "name": "tiny", "method": "lora", "exports": exports,
            "quant": {"bits": 16}}  # fmt: skip
    (work / "bundle" / "spec.json").write_text(
        json.dumps({"spec": spec, "data_format": "messages"})
    )
    (work / "bundle" / "data").mkdir()
    first = Path("examples/data/chat.jsonl").read_text().splitlines()[1]  # the checks' prompt
    (work / "bundle" / "data" / "train.jsonl").write_text(first + "\n")
    return work


def test_a_model_that_never_stops_fails_its_export_with_the_reason(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A random adapter does not know where its answers end: the merged export fails its
    generation check, says so, and leaves nothing to pull; the GGUF made from it is skipped."""
    work = _workdir(tmp_path, tiny_model, ["adapter", "merged", "gguf:q8_0"])
    doc = json.loads((work / "bundle" / "spec.json").read_text())
    paths = export.run(work, doc, str(tiny_model))
    report = json.loads((work / export.REPORT_FILE).read_text())
    by_name = {r["name"]: r for r in report["exports"]}
    assert by_name["adapter"]["ok"]
    merged_result = by_name["merged"]
    assert not merged_result["ok"] and "generates_and_stops" in merged_result["error"]
    assert "no end-of-sequence within" in merged_result["error"]
    assert {c["name"]: c["ok"] for c in merged_result["checks"]}["logits_match"] is True
    assert by_name["gguf:q8_0"]["error"] == "skipped: the merge it is made from failed"
    assert paths == [export.REPORT_FILE]
    assert not (work / "exports" / "merged").exists() and not list(work.rglob("*.gguf"))


# Found at import: the autouse fixture clears LORABURST_* variables before each test.
_TOOLS = llama_cpp.find()


@pytest.mark.skipif(
    _TOOLS is None,
    reason=f"llama.cpp tools not found: set {llama_cpp.ENV_LLAMA_CPP} to a llama.cpp checkout "
    "built with `cmake -B build && cmake --build build --target llama-quantize llama-simple`, "
    "or let loraburst.remote.llama_cpp.install() fetch and build the pinned one",
)
def test_llama_cpp_generates_from_each_gguf_and_stops(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model trained to answer (and end its turn) exported as q8_0 and q4_k_m: llama.cpp loads
    both files, answers, and stops at the end-of-generation token."""
    from loraburst import Job

    assert _TOOLS is not None
    monkeypatch.setenv(llama_cpp.ENV_LLAMA_CPP, str(_TOOLS.root))
    rows = [json.loads(line) for line in Path("examples/data/chat.jsonl").read_text().splitlines()][
        :12
    ]
    result = Job(str(tiny_model), rows, method="lora", output_dir=tmp_path / "out", name="lc",
                 train={"max_steps": 60, "micro_batch_size": 4, "learning_rate": 1e-2,
                        "max_seq_len": 96, "save_every_steps": None, "warmup_ratio": 0.0},
                 exports=["gguf:q8_0", "gguf:q4_k_m"]).run(provider="local", progress=False)  # fmt: skip
    for name in ("gguf:q8_0", "gguf:q4_k_m"):
        checks = {c["name"]: c for c in result.export(name).checks}
        assert checks["generates_and_stops"]["ok"], checks
        assert checks["generates_and_stops"]["detail"].startswith("llama.cpp")
    shutil.rmtree(tmp_path / "out")
