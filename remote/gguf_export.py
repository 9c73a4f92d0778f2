"""GGUF files written in pure Python with the ``gguf`` package (f16, bf16, q8_0).

What llama.cpp's loader needs from a merged Hugging Face folder, for the architectures whose
layout we write ourselves (Llama and Mistral as ``llama``, Qwen2 as ``qwen2``): hyperparameters,
the tokenizer (tokens, types, merges, the pre-tokenizer's name, special ids including the chat
template's end-of-turn token) and the chat template, then every tensor under its GGUF name,
with Llama's q/k rows permuted to GGML's rotary layout. Tensors are streamed one at a time
(header and tensor table first, sizes known from the safetensors headers), so memory stays
at about one tensor.

Anything else (another architecture, an unknown pre-tokenizer, rope scaling we do not write)
raises :class:`Unsupported` with the reason; the export then uses llama.cpp's own converter
(:mod:`.llama_cpp`), which is also what the K-quants always use.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from .merge import read_header

__all__ = ["GGUF_REQUIREMENT", "PURE_QUANTS", "Unsupported", "inspect", "write"]

# The gguf package version the pure-Python writer and the checks are tested with (also in
# pyproject's `train` extra; tests/unit/test_exports_spec.py keeps the two equal).
GGUF_REQUIREMENT = "gguf==0.19.0"
PURE_QUANTS = ("f16", "bf16", "q8_0")

_ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Pre-tokenizer split patterns (tokenizer.json) -> llama.cpp's name for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class Unsupported(Exception):
    """This model cannot be written by the pure-Python writer; the message says why."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise Unsupported(
            f"the gguf package is not installed (pip install '{GGUF_REQUIREMENT}')"
        ) from exc
    return gguf


def _qtype(gguf: Any, quant: str) -> Any:
    q = gguf.GGMLQuantizationType
    return {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[quant]


def _file_type(gguf: Any, quant: str) -> int:
    f = gguf.LlamaFileType
    return int({"f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}[quant])


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [p.get("pattern", {}).get("Regex") for p in items if p.get("type") == "Split"]
    byte_level = [p for p in items if p.get("type") == "ByteLevel"]
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and byte_level and splits[0] in _PRE_BY_SPLIT:
        return _PRE_BY_SPLIT[splits[0]]
    raise Unsupported(
        "its pre-tokenizer is not one the pure-Python writer knows (GPT-2, Llama-3, Qwen2)"
    )


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _special_ids(folder: Path, tokens: dict[str, int]) -> dict[str, int]:
    """bos/eos/pad/unk ids from tokenizer_config.json, and the end-of-turn id (from the
    merged generation config: the eos ids beyond the tokenizer's own)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    out: dict[str, int] = {}
    for key in ("bos", "eos", "pad", "unk"):
        value = config.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in tokens:
            out[key] = tokens[value]
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    extra = [i for i in ([eos] if isinstance(eos, int) else eos or []) if i != out.get("eos")]
    if "eos" not in out and isinstance(eos, (int, list)) and (eos if isinstance(eos, int) else eos):
        out["eos"] = eos if isinstance(eos, int) else eos[0]
        extra = [i for i in extra if i != out["eos"]]
    if extra:
        out["eot"] = int(extra[0])
    return out


def _tokenizer(gguf: Any, writer: Any, folder: Path, n_vocab: int) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise Unsupported("it has no tokenizer.json (fast tokenizer)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    types = gguf.TokenType
    if model.get("type") != "BPE":
        raise Unsupported(f"its tokenizer model is {model.get('type')!r}, not BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    size = max(n_vocab, max(vocab.values()) + 1)
    if model.get("byte_fallback"):
        # SentencePiece-style BPE (Llama-2, Mistral): scores and types from gguf's own reader.
        spm = gguf.LlamaHfVocab(folder)
        tokens, scores, toktypes = [], [], []
        for text, score, kind in spm.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(kind)
        while len(tokens) < size:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            toktypes.append(types.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(toktypes)
        kind_name = "llama"
    else:
        pre = _pre_tokenizer(tj)
        token_list = [f"[PAD{i}]" for i in range(size)]
        toktypes = [types.UNUSED] * size
        for text, i in model["vocab"].items():
            token_list[i], toktypes[i] = text, types.NORMAL
        for t in tj.get("added_tokens", []):
            token_list[t["id"]] = t["content"]
            toktypes[t["id"]] = types.CONTROL if t.get("special") else types.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(token_list)
        writer.add_token_types(toktypes)
        writer.add_token_merges(merges)
        kind_name = f"gpt2/{pre}"
    ids = _special_ids(folder, vocab)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id,
              "eot": writer.add_eot_token_id}  # fmt: skip
    for key, value in ids.items():
        adders[key](value)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    template = _chat_template(folder)
    if template:
        writer.add_chat_template(template)
    return {"tokenizer": kind_name, "vocab": size, "special_ids": ids}


def _hparams(gguf: Any, writer: Any, config: dict[str, Any], quant: str, name: str) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(_file_type(gguf, quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default", "llama3"):
        raise Unsupported(f"its rope scaling {kind!r} is not written by the pure-Python writer")


def _llama3_rope_factors(config: dict[str, Any]) -> Any:
    """Per-frequency divisors of Llama-3.1's rope scaling (llama.cpp's ``rope_freqs``)."""
    import numpy as np

    scaling = config["rope_scaling"]
    heads = int(config["num_attention_heads"])
    dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    base = float(config.get("rope_theta", 10000.0))
    factor = float(scaling.get("factor", 8.0))
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    old = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _permute(weight: Any, heads: int) -> Any:
    # HF stores rotary halves per head ([re..., im...]); GGML's llama rope wants them
    # interleaved, so each head's rows are reordered (the inverse of HF's own conversion).
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tensor_plan(
    gguf: Any, folder: Path, arch: str, config: dict[str, Any], quant: str
) -> list[tuple[str, Path, str, list[int], Any]]:
    """``(gguf name, shard, hf name, shape, ggml type)`` for every tensor, in file order."""
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    q = gguf.GGMLQuantizationType
    plan = []
    for shard in sorted(folder.glob("*.safetensors")):
        for hf_name, info in read_header(shard).items():
            if hf_name == "__metadata__" or hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise Unsupported(f"tensor {hf_name} has no GGUF name for {arch}")
            shape = list(info["shape"])
            qtype = _qtype(gguf, quant)
            if len(shape) == 1:
                qtype = q.F32  # norms and biases stay float32, as llama.cpp expects
            elif qtype == q.Q8_0 and shape[-1] % 32:
                qtype = q.F16  # Q8_0 blocks are 32 wide; odd rows fall back to f16
            plan.append((name, shard, hf_name, shape, qtype))
    return plan


def write(merged_dir: Path, out: Path, quant: str, *, name: str = "model") -> dict[str, Any]:
    """Write ``merged_dir`` (a merged HF model folder) as one GGUF file.

    Args:
        merged_dir: Output of :func:`loraburst.remote.merge.merge`.
        out: The ``.gguf`` file to write (replaced).
        quant: One of :data:`PURE_QUANTS`.
        name: ``general.name`` in the file.

    Returns:
        What was written: tool, architecture, tokenizer kind, special ids, tensor count.

    Raises:
        Unsupported: the model needs llama.cpp's converter (the message says why).
    """
    import numpy as np
    import torch
    from safetensors import safe_open

    gguf = _gguf()
    config = json.loads((merged_dir / "config.json").read_text())
    arch_name = (config.get("architectures") or ["?"])[0]
    arch = _ARCHES.get(arch_name)
    if arch is None:
        raise Unsupported(f"architecture {arch_name} is not written by the pure-Python writer")
    plan = _tensor_plan(gguf, merged_dir, arch, config, quant)
    tmp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[
        {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]])  # fmt: skip
    _hparams(gguf, writer, config, quant, name)
    n_vocab = next(s[0] for n, _, _, s, _ in plan if n == "token_embd.weight")
    tok = _tokenizer(gguf, writer, merged_dir, n_vocab)
    scaling = config.get("rope_scaling") or {}
    extra: list[tuple[str, Any]] = []
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        extra.append(("rope_freqs.weight", _llama3_rope_factors(config)))
    q = gguf.GGMLQuantizationType
    for gname, data in extra:
        writer.add_tensor_info(gname, data.shape, np.float32, data.nbytes)
    for gname, _, _, shape, qtype in plan:
        if qtype in (q.F32, q.F16):
            dtype = np.float32 if qtype == q.F32 else np.float16
            writer.add_tensor_info(
                gname, shape, np.dtype(dtype), math.prod(shape) * (4 if qtype == q.F32 else 2)
            )
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(tuple(shape), qtype)
            writer.add_tensor_info(
                gname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype
            )
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in extra:
        writer.write_tensor_data(data)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    try:
        # One shard open at a time; the plan lists tensors shard by shard.
        for shard, group in itertools.groupby(plan, key=lambda item: item[1]):
            with safe_open(str(shard), framework="pt") as f:
                for gname, _, hf_name, _, qtype in group:
                    data = f.get_tensor(hf_name).to(torch.float32).numpy()
                    if arch == "llama" and gname.endswith("attn_q.weight"):
                        data = _permute(data, heads)
                    elif arch == "llama" and gname.endswith("attn_k.weight"):
                        data = _permute(data, kv_heads)
                    if qtype == q.F32:
                        data = data.astype(np.float32)
                    elif qtype == q.F16:
                        data = data.astype(np.float16)
                    else:
                        data = gguf.quants.quantize(data, qtype)
                    writer.write_tensor_data(np.ascontiguousarray(data))
                    del data
    finally:
        writer.close()
    tmp.replace(out)
    return {
        "tool": f"gguf-py ({GGUF_REQUIREMENT})",
        "arch": arch,
        "tensors": len(plan) + len(extra),
        **tok,
    }


def inspect(path: Path) -> dict[str, Any]:
    """What a GGUF file says about itself (read back with gguf's reader): architecture,
    tensors and their types, tokenizer and special ids, chat template."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    return {
        "arch": arch,
        "file_type": value("general.file_type"),
        "tensors": {
            t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors
        },
        "tokens": value("tokenizer.ggml.tokens"),
        "tokenizer_model": value("tokenizer.ggml.model"),
        "pre": value("tokenizer.ggml.pre"),
        "eos": value("tokenizer.ggml.eos_token_id"),
        "eot": value("tokenizer.ggml.eot_token_id"),
        "bos": value("tokenizer.ggml.bos_token_id"),
        "chat_template": value("tokenizer.chat_template"),
        "context_length": value(f"{arch}.context_length"),
        "block_count": value(f"{arch}.block_count"),
    }
