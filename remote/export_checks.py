"""The checks every export passes before the instance is torn down.

Each check is a dict ``{"name", "ok", "value", "limit", "detail"}`` recorded in the export's
report; ``ok`` None marks a measurement that is reported but not judged.

* merged: logits equal base + adapter (the unmerged PEFT model on the same base weights) within
  a tolerance set by the dtype; greedy generation from the job's own prompt stops at an
  end-of-sequence id within the token limit; with a QLoRA job, how far the merged model's logits
  are from the training-time (4-bit base) model is measured and stated.
* gguf: read back with gguf's reader (architecture, tensors, tokens in id order, special ids,
  chat template); every tensor dequantised and compared with the merged weights; generation
  with llama.cpp (or, without it, transformers' GGUF loader) stops at the file's own
  end-of-generation ids within the limit.

Heavy imports are inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["Check", "check_gguf", "check_merged", "job_prompt"]

Check = dict[str, Any]

# max |logit difference| / max |logit|, by the merged weights' dtype.
_LOGIT_TOL = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}
# max |weight difference| / max |weight| of a dequantised GGUF tensor, by file type.
_WEIGHT_TOL = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2, "q6_k": 5e-2, "q5_k_m": 1e-1,
               "q5_0": 1e-1, "q4_k_m": 2e-1, "q4_0": 2e-1, "q3_k_m": 3e-1, "q2_k": 5e-1}  # fmt: skip
DEFAULT_PROMPT = "Hello! Who are you?"


def _check(name: str, ok: bool | None, detail: str, value: Any = None, limit: Any = None) -> Check:
    return {"name": name, "ok": ok, "value": value, "limit": limit, "detail": detail}


def job_prompt(workdir: Path, doc: dict[str, Any], tokenizer: Any) -> tuple[str, int, str]:
    """A prompt in the job's own format, its token limit, and where it came from.

    The first training row: a chat's turns up to its first assistant reply rendered with the
    chat template (generation prompt added), a prompt/completion row's prompt. The limit is
    twice the reference reply's length plus 16 tokens (at most 256), so a model that learned to
    answer and stop has room, and one that never stops is caught.
    """
    path = workdir / "bundle" / "data" / "train.jsonl"
    row: dict[str, Any] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    break
    reply = ""
    if row.get("messages"):
        turns = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                reply = m["content"]
                break
            turns.append({"role": m["role"], "content": m["content"]})
        source = f"{path.name} row 1 (chat)"
    elif "chosen" in row:  # a preference pair (remote/pairs.py): its prompt, the chosen answer
        prompt, chosen = row["prompt"], row["chosen"]
        reply = chosen if isinstance(chosen, str) else str(chosen[-1]["content"])
        source = f"{path.name} row 1 (preference)"
        if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
            return prompt, _limit(tokenizer, reply), source
        turns = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    elif "prompt" in row:
        turns, reply, source = [], str(row.get("completion", "")), f"{path.name} row 1 (prompt)"
        if not getattr(tokenizer, "chat_template", None):
            return str(row["prompt"]), _limit(tokenizer, reply), source
        turns = [{"role": "user", "content": str(row["prompt"])}]
    else:
        turns, source = [{"role": "user", "content": DEFAULT_PROMPT}], "default prompt"
    if not turns:
        turns = [{"role": "user", "content": DEFAULT_PROMPT}]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return str(text), _limit(tokenizer, reply), source


def _limit(tokenizer: Any, reply: str) -> int:
    n = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else 64
    return min(256, 2 * n + 16)


def _rel(a: Any, b: Any) -> float:
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / max(scale, 1e-6)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


def _generate(
    model: Any, ids: Any, eos: list[int], limit: int, pad: int | None
) -> tuple[list[int], bool]:
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            max_new_tokens=limit,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos[0],
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, bool(new) and new[-1] in eos


def _stop_check(tokenizer: Any, new: list[int], stopped: bool, limit: int, runtime: str) -> Check:
    text = tokenizer.decode(new, skip_special_tokens=True)[:200]
    detail = (
        f"{runtime}: stopped at end-of-sequence after {len(new)} tokens: {text!r}"
        if stopped
        else f"{runtime}: no end-of-sequence within {limit} tokens (a model that never stops): "
        f"{text!r}"
    )
    return _check("generates_and_stops", stopped, detail, len(new), limit)


def check_merged(
    merged: Path,
    base: Path,
    adapter: Path,
    *,
    into: str,
    quant: dict[str, Any],
    quantized_job: bool,
    prompt: str,
    limit: int,
) -> list[Check]:
    """Logits against base + adapter, generation that stops, and the drift from training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged, device_map={"": device})
    model.eval()  # type: ignore[no-untyped-call]
    dtype = str(model.dtype).removeprefix("torch.")
    merged_logits = _logits(model, ids)
    eos = _eos_ids(merged, tokenizer)
    new, stopped = _generate(model, ids, eos, limit, tokenizer.pad_token_id)
    del model
    checks = [_stop_check(tokenizer, new, stopped, limit, "transformers")]

    def reference(four_bit: bool) -> Any:
        bnb = None
        if four_bit:
            bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=quant.get("double_quant", True),
                bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
            )
        kwargs: dict[str, Any] = {"quantization_config": bnb} if bnb else {"dtype": merged_dtype}
        base_model = AutoModelForCausalLM.from_pretrained(base, device_map={"": device}, **kwargs)
        embeddings: Any = base_model.get_input_embeddings()
        if embeddings.weight.shape[0] < len(tokenizer):
            base_model.resize_token_embeddings(len(tokenizer))
        peft = PeftModel.from_pretrained(base_model, adapter)
        peft.eval()
        return _logits(peft, ids)

    merged_dtype = getattr(torch, dtype)
    ref = reference(four_bit=into == "dequantized")
    err = _rel(ref, merged_logits)
    tol = _LOGIT_TOL.get(dtype, 6e-2)
    if into == "dequantized":
        tol = max(tol, 6e-2)  # the reference runs bitsandbytes' 4-bit kernels (bf16 inside)
    agree = float((ref.argmax(-1) == merged_logits.argmax(-1)).float().mean())
    checks.insert(0, _check(
        "logits_match", err <= tol,
        f"merged vs base ({'4-bit, as trained' if into == 'dequantized' else 'original weights'})"
        f" + adapter: max |diff| / max |logit| = {err:.2e} (limit {tol:.0e}); next-token "
        f"agreement {agree:.0%} over {ids.shape[1]} positions",
        round(err, 8), tol,
    ))  # fmt: skip
    if quantized_job and into == "original" and int(quant.get("bits", 4)) == 4:
        drift = _rel(reference(four_bit=True), merged_logits)
        checks.append(_check(
            "drift_from_training_model", None,
            f"the adapter was trained on 4-bit base weights; merged into the original weights "
            f"the logits differ from the training-time model by {drift:.2e} (max |diff| / max "
            f"|logit|); export with merged base 'dequantized' to keep the training-time model",
            round(drift, 8),
        ))  # fmt: skip
    return checks


def _hf_tensor(merged: Path) -> dict[str, tuple[Path, str]]:
    from .merge import read_header

    out = {}
    for shard in sorted(merged.glob("*.safetensors")):
        for name in read_header(shard):
            if name != "__metadata__":
                out[name] = (shard, name)
    return out


def check_gguf(
    path: Path, merged: Path, quant: str, *, prompt: str, limit: int, tools: Any = None
) -> list[Check]:
    """Read the file back, compare its weights with the merged model's, and generate."""
    from transformers import AutoTokenizer

    from . import gguf_export

    info = gguf_export.inspect(path)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    checks: list[Check] = []
    problems = []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = info["tokens"] or []
    bad = [i for i, t in enumerate(vocab) if t is not None and (i >= len(tokens) or tokens[i] != t)]
    if bad:
        problems.append(f"{len(bad)} token(s) differ from the tokenizer's, e.g. id {bad[0]}")
    if info["eos"] != tokenizer.eos_token_id:
        problems.append(f"eos id {info['eos']} is not the tokenizer's {tokenizer.eos_token_id}")
    eos = _eos_ids(merged, tokenizer)
    stops = [i for i in (info["eos"], info["eot"]) if i is not None]
    # The tokenizer's eos and the chat template's end of turn (the first other generation-config
    # eos id) must both stop generation; llama.cpp finds further ones by their text.
    needed = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    needed += [i for i in eos if i != tokenizer.eos_token_id][:1]
    if any(i not in stops for i in needed):
        problems.append(f"stop ids {stops} miss the generation config's {needed}")
    if tokenizer.chat_template and not info["chat_template"]:
        problems.append("the chat template is missing")
    checks.append(_check(
        "reads_back", not problems,
        "; ".join(problems) or f"{info['arch']}, {len(info['tensors'])} tensors, "
        f"{len(tokens)} tokens ({info['tokenizer_model']}/{info['pre']}), eos {info['eos']}, "
        f"eot {info['eot']}, chat template {'kept' if info['chat_template'] else 'none'}",
    ))  # fmt: skip
    checks.append(_weights_check(path, merged, quant, info))
    checks.append(_generation_check(path, merged, tokenizer, prompt, limit, stops, tools))
    return checks


def _weights_check(path: Path, merged: Path, quant: str, info: dict[str, Any]) -> Check:
    import numpy as np
    import torch
    from gguf import GGUFReader, get_tensor_name_map
    from gguf.constants import MODEL_ARCH
    from gguf.quants import dequantize
    from safetensors import safe_open

    from .gguf_export import _permute

    config = json.loads((merged / "config.json").read_text())
    arch = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}.get(info["arch"])
    if arch is None:
        return _check("weights_match", None, f"not compared for architecture {info['arch']}")
    names = get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    by_gguf = {}
    for hf_name, where in _hf_tensor(merged).items():
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            by_gguf[g] = where
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    worst, worst_name, compared = 0.0, "", 0
    missing = sorted(set(by_gguf) - set(info["tensors"]))
    for t in GGUFReader(path).tensors:
        if t.name not in by_gguf:
            continue
        shard, hf_name = by_gguf[t.name]
        with safe_open(str(shard), framework="pt") as f:
            ref = f.get_tensor(hf_name).to(torch.float32).numpy()
        if info["arch"] == "llama" and t.name.endswith("attn_q.weight"):
            ref = _permute(ref, heads)
        elif info["arch"] == "llama" and t.name.endswith("attn_k.weight"):
            ref = _permute(ref, kv)
        got = dequantize(t.data, t.tensor_type).reshape(ref.shape)
        err = float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
        compared += 1
        if err > worst:
            worst, worst_name = err, t.name
    tol = _WEIGHT_TOL.get(quant, 0.5)
    ok = not missing and compared > 0 and worst <= tol
    detail = (f"{compared} tensors dequantised; worst max |diff| / max |w| = {worst:.2e} "
              f"({worst_name}, limit {tol:.0e})")  # fmt: skip
    if missing:
        detail += f"; missing from the file: {missing[:3]}"
    return _check("weights_match", ok, detail, round(worst, 8), tol)


def _generation_check(
    path: Path, merged: Path, tokenizer: Any, prompt: str, limit: int, stops: list[int], tools: Any
) -> Check:
    if tools is not None:
        gen = tools.generate(path, prompt, limit)
        runtime = f"llama.cpp {tools.version}"
        detail = (
            f"{runtime}: stopped at end-of-generation after {gen.tokens} tokens: {gen.text[:200]!r}"
            if gen.stopped
            else f"{runtime}: no end-of-generation within {limit} tokens: {gen.text[:200]!r}"
        )
        return _check("generates_and_stops", gen.stopped, detail, gen.tokens, limit)
    from transformers import AutoModelForCausalLM

    # Without llama.cpp: transformers dequantises the file itself (its own GGUF reader and
    # name mapping, independent of our writer) and generates with the file's stop ids.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, device_map={"": _device()}
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new, stopped = _generate(model, ids, stops, limit, tokenizer.pad_token_id)
    return _stop_check(tokenizer, new, stopped, limit, "transformers (GGUF dequantised)")
