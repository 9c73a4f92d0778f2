"""The streamed merge: logits equal base + adapter, host memory bounded, files carried over."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from loraburst.remote.merge import MergeError, merge
from loraburst.remote.protocol import DEFAULT_CHAT_TEMPLATE


def make_adapter(model_dir: Path, out: Path, *, dora: bool = False, seed: int = 1) -> Path:
    """A LoRA (or DoRA) adapter with random non-zero weights on every linear layer, saved with
    the trainer's ChatML template (so merged logits differ visibly from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora,
                        init_lora_weights=False)  # fmt: skip
    peft = get_peft_model(model, config)
    peft.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _logits(model: object, ids: object) -> object:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[operator]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_logits_equal_base_plus_adapter(
    tiny_model: Path, tmp_path: Path, dora: bool
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model, tmp_path / "adapter", dora=dora)
    report = merge(tiny_model, adapter, tmp_path / "merged")
    assert report.into == "original" and report.merged_modules == 14
    ids = torch.tensor([[5, 17, 99, 230, 7, 64, 300]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = _logits(PeftModel.from_pretrained(base, adapter), ids)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    assert float((merged - reference).abs().max()) < 1e-4
    assert float((merged - plain).abs().max()) > 1e-2  # the adapter did change the model


def test_merge_carries_tokenizer_template_and_stop_ids(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    report = merge(tiny_model, adapter, tmp_path / "merged", dtype="bfloat16")
    out = tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert report.end_of_turn_ids == [im_end] and report.dtype == "bfloat16"
    # The training-only {% generation %} markers are gone; rendering is unchanged.
    assert "{% generation %}" not in tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert im_end in gen["eos_token_id"] and tokenizer.eos_token_id in gen["eos_token_id"]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    from loraburst.remote.merge import read_header

    header = read_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_dequantized_merge_equals_the_training_time_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Merged into the NF4 rounding of the base: each linear weight is exactly what the 4-bit
    model held in training (bitsandbytes' own dequantisation) plus the adapter's delta."""
    import torch
    from bitsandbytes import functional as bnbf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    merge(tiny_model, adapter, tmp_path / "merged", into="dequantized", quant=quant)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    trained = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=nf4)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    checked = 0
    for name, module in trained.named_modules():
        if not hasattr(module.weight if hasattr(module, "weight") else None, "quant_state"):
            continue
        held = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        a, b = (lora[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        assert torch.allclose(merged[f"{name}.weight"], held + b @ a * 2.0, atol=1e-6), name
        checked += 1
    assert checked == 14
    original = load_file(tiny_model / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], original["lm_head.weight"])  # never 4-bit


def test_an_adapter_of_another_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = {k.replace("layers.1.", "layers.9."): v for k, v in load_file(weights).items()}
    save_file(state, weights)
    with pytest.raises(MergeError, match=r"no weight in the base checkpoint.*layers\.9"):
        merge(tiny_model, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


_MAKE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file

    root = Path(sys.argv[1])
    base, adapter = root / "base", root / "adapter"
    base.mkdir(); adapter.mkdir()
    n, shards, per = 2048, 8, 2  # 16 MiB per tensor, 32 MiB per shard, 256 MiB in all
    index = {}
    for s in range(shards):
        tensors = {}
        for t in range(per):
            name = f"model.layers.{s * per + t}.mlp.down_proj.weight"
            tensors[name] = torch.randn(n, n)
            index[name] = f"model-{s:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, base / index[name], metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    lora = {}
    for name in index:
        module = name.removesuffix(".weight")
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, n)
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n, 8)
    save_file(lora, adapter / "adapter_model.safetensors")
    config = {"r": 8, "lora_alpha": 16, "peft_type": "LORA"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    """
)
# A fresh process: its high-water mark before the merge is the imports', after it the merge's.
_MERGE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, safetensors.torch, transformers  # what the agent has loaded anyway
    from loraburst.remote.merge import merge

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    root = Path(sys.argv[1])
    before = hwm()
    report = merge(root / "base", root / "adapter", root / "merged")
    print(json.dumps({"before": before, "after": hwm(), "modules": report.merged_modules}))
    """
)


@pytest.mark.slow
def test_merge_memory_stays_bounded_whatever_the_model_size(tmp_path: Path) -> None:
    """A 256 MiB model merges in a process whose peak memory grows by less than half of it:
    about one shard mapped and one tensor's merge in flight, never the model."""
    run = [sys.executable, "-c"]
    subprocess.run([*run, _MAKE, str(tmp_path)], check=True, timeout=600)
    out = subprocess.run([*run, _MERGE, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, check=True)  # fmt: skip
    m = json.loads(out.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in (tmp_path / "base").glob("*.safetensors"))
    limit = 128 * 2**20
    assert m["modules"] == 16 and size > 2 * limit
    assert m["after"] - m["before"] < limit, m
    merged = sorted((tmp_path / "merged").glob("*.safetensors"))
    assert len(merged) == 8
    assert abs(sum(p.stat().st_size for p in merged) - size) < 8 * 4096  # same data, new headers
