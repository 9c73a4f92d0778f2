"""Merge a LoRA/DoRA adapter into the base model's weights, one tensor at a time.

The base's own checkpoint is read tensor by tensor (safetensors, memory-mapped) and each merged
tensor is written straight into an output shard whose header was laid out up front from the
input headers, so host memory holds about one tensor (and its delta) whatever the model's size.
Output shards mirror the input shards.

Which weights the adapter is added to is the caller's choice, and the result says which:

* ``"original"`` (default): the checkpoint's own weights, in their stored precision. This is
  the model users deploy; a QLoRA adapter trained against NF4 weights then runs on slightly
  different base weights than in training, and the export reports by how much.
* ``"dequantized"``: the NF4 (or FP4) rounding of those weights that training saw, via
  bitsandbytes' own quantise/dequantise, so the merged model is the training-time model.

Torch, safetensors and bitsandbytes are imported inside the functions.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MergeError",
    "MergeReport",
    "base_files",
    "merge",
    "read_header",
]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PREFIX = "base_model.model."
# Sizes of the safetensors dtypes (https://github.com/huggingface/safetensors format spec).
_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ST_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_CARRIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


class MergeError(RuntimeError):
    """The adapter cannot be merged into this base; the message names the file and tensor."""


@dataclass
class MergeReport:
    """What a merge did: into which weights, in which dtype, and how many modules changed."""

    into: str
    base_dtype: str
    dtype: str
    merged_modules: int
    replaced_tensors: int
    shards: int
    bytes: int
    end_of_turn_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    return header


def base_files(model_dir: Path) -> list[Path]:
    """The base checkpoint's safetensors shards, in index order.

    Raises:
        MergeError: the folder has no safetensors weights (``.bin`` checkpoints cannot be
            streamed; convert them once with ``save_pretrained(safe_serialization=True)``).
    """
    index = model_dir / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if (model_dir / _SINGLE).is_file():
        return [model_dir / _SINGLE]
    raise MergeError(
        f"{model_dir} has no {_SINGLE} or {_INDEX}: merging streams safetensors weights only; "
        "save the base once with save_pretrained(safe_serialization=True)"
    )


@dataclass
class _Adapter:
    """The adapter's tensors by base weight name, and how to scale them."""

    lora: dict[str, dict[str, Any]]  # base weight name -> {"A", "B", "m" (DoRA), "scale"}
    replace: dict[str, Any]  # base weight name -> full tensor (saved embeddings, modules_to_save)
    rows: dict[str, tuple[list[int], Any]]  # base weight name -> (row indices, row values)
    fan_in_fan_out: bool


def _scale(config: dict[str, Any], module: str) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            r = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return float(alpha) / (float(r) ** 0.5 if config.get("use_rslora") else float(r))


def _load_adapter(adapter_dir: Path) -> _Adapter:
    from safetensors.torch import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise MergeError(f"{adapter_dir} has no adapter_config.json + adapter_model.safetensors")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LoRA")
    state = load_file(str(weights))  # an adapter is small: megabytes, not gigabytes
    out = _Adapter({}, {}, {}, bool(config.get("fan_in_fan_out")))
    token_indices = config.get("trainable_token_indices")
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        if m := re.fullmatch(r"(.+)\.lora_(A|B)(?:\.default)?\.weight", name):
            module, part = m.groups()
            entry = out.lora.setdefault(f"{module}.weight", {"scale": _scale(config, module)})
            entry[part] = tensor
        elif m := re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?", name):
            out.lora.setdefault(f"{m.group(1)}.weight", {"scale": _scale(config, m.group(1))})
            out.lora[f"{m.group(1)}.weight"]["m"] = tensor
        elif m := re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta(?:\.default)?", name):
            module = m.group(1)
            indices = token_indices
            if isinstance(indices, dict):
                indices = next(
                    (v for k, v in indices.items() if module == k or module.endswith(f".{k}")), None
                )
            if not indices or len(indices) != tensor.shape[0]:
                raise MergeError(
                    f"{weights}: {key} has {tensor.shape[0]} rows but adapter_config.json's "
                    f"trainable_token_indices does not list as many for {module}"
                )
            out.rows[f"{module}.weight"] = (list(indices), tensor)
        elif name.endswith((".weight", ".bias")):
            # modules_to_save / saved embedding layers: the whole tensor replaces the base's.
            out.replace[re.sub(r"\.modules_to_save(?:\.default)?", "", name)] = tensor
        else:
            raise MergeError(f"{weights}: tensor {key!r} is not a LoRA, DoRA or token weight")
    for name, entry in out.lora.items():
        if "A" not in entry or "B" not in entry:
            raise MergeError(f"{weights}: {name} lacks its lora_A or lora_B tensor")
    return out


def _merged_tensor(
    name: str, base: Any, adapter: _Adapter, into: str, quant: dict[str, Any]
) -> Any:
    """The merged value of one base tensor, in float32 (or the base tensor itself)."""
    import torch

    if name in adapter.replace:
        return adapter.replace[name].to(torch.float32)
    entry = adapter.lora.get(name)
    rows = adapter.rows.get(name)
    rounded = into == "dequantized" and _quantized_in_training(name, base)
    if entry is None and rows is None and not rounded:
        return base
    weight = base.to(torch.float32)
    if rounded:
        # Every linear layer was 4-bit in training, with or without an adapter on it.
        weight = _nf4_roundtrip(weight, quant)
    if entry is not None:
        delta = (entry["B"].to(torch.float32) @ entry["A"].to(torch.float32)) * entry["scale"]
        if adapter.fan_in_fan_out:
            delta = delta.T
        if delta.shape != weight.shape:
            raise MergeError(f"adapter delta for {name} has shape {tuple(delta.shape)}, "
                             f"the base weight {tuple(weight.shape)}")  # fmt: skip
        weight = weight + delta
        if "m" in entry:  # DoRA: rescale each output row to the learned magnitude
            norm = weight.norm(p=2, dim=1, keepdim=True)
            weight = weight * (entry["m"].to(torch.float32).reshape(-1, 1) / norm)
    if rows is not None:
        indices, values = rows
        if max(indices) >= weight.shape[0]:
            grown = torch.zeros(max(indices) + 1, *weight.shape[1:], dtype=torch.float32)
            grown[: weight.shape[0]] = weight
            weight = grown
        weight[torch.tensor(indices)] = values.to(torch.float32)
    return weight


def _quantized_in_training(name: str, tensor: Any) -> bool:
    """bitsandbytes quantises a model's linear layers, not its embeddings or output head."""
    return bool(tensor.dim() == 2 and name.endswith(".weight")
                and not re.search(r"(embed|lm_head|wte|wpe)", name))  # fmt: skip


def _nf4_roundtrip(weight: Any, quant: dict[str, Any]) -> Any:
    """The weight as the 4-bit base held it in training (bitsandbytes' own rounding)."""
    import torch

    if int(quant.get("bits", 4)) != 4:
        raise MergeError("base 'dequantized' needs a 4-bit (NF4/FP4) job; this one is "
                         f"{quant.get('bits')}-bit; use base 'original'")  # fmt: skip
    from bitsandbytes import functional as bnbf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(quant.get("compute_dtype")), torch.float32 if device == "cpu" else torch.bfloat16
    )
    packed, state = bnbf.quantize_4bit(
        weight.to(device=device, dtype=dtype),
        blocksize=64,
        compress_statistics=bool(quant.get("double_quant", True)),
        quant_type=str(quant.get("quant_type", "nf4")),
    )
    return bnbf.dequantize_4bit(packed, state).to("cpu", torch.float32)


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _out_dtype(stored: str, dtype: str) -> str:
    if stored not in _TORCH_NAME or dtype == "auto":
        return stored  # integer buffers and the "auto" choice keep their stored type
    return _ST_NAME[dtype]


def _write_shard(
    src: Path,
    dest: Path,
    adapter: _Adapter,
    *,
    into: str,
    dtype: str,
    quant: dict[str, Any],
    done: set[str],
) -> dict[str, int]:
    """Stream one shard: header first (sizes known from the input), then tensor by tensor."""
    import torch
    from safetensors import safe_open

    header = read_header(src)
    meta = header.pop("__metadata__", None) or {}
    layout: dict[str, Any] = {}
    offset = 0
    for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        info = header[name]
        shape = list(info["shape"])
        if name in adapter.replace:
            shape = list(adapter.replace[name].shape)
        elif name in adapter.rows:
            shape[0] = max(shape[0], max(adapter.rows[name][0]) + 1)
        out = _out_dtype(info["dtype"], dtype)
        size = _DTYPE_SIZE[out]
        for d in shape:
            size *= d
        layout[name] = {"dtype": out, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {**meta, "format": "pt"}, **layout}, separators=(",", ":"))
    raw = text.encode() + b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    sizes: dict[str, int] = {}
    with safe_open(str(src), framework="pt") as f, open(dest, "wb") as out_file:
        out_file.write(struct.pack("<Q", len(raw)) + raw)
        for name, info in layout.items():
            value = _merged_tensor(name, f.get_tensor(name), adapter, into, quant)
            if value.is_floating_point():
                value = value.to(getattr(torch, _TORCH_NAME[info["dtype"]]))
            data = _tensor_bytes(value)
            if len(data) != info["data_offsets"][1] - info["data_offsets"][0]:
                raise MergeError(f"{src}: {name} merged to {len(data)} bytes, expected "
                                 f"{info['data_offsets'][1] - info['data_offsets'][0]}")  # fmt: skip
            out_file.write(data)
            del value, data
            done.add(name)
            sizes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def _strip_generation_tags(template: str) -> str:
    # {% generation %} marks the loss span in training (transformers only); runtimes such as
    # llama.cpp and Ollama reject the unknown tag, and rendering is the same without it.
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that end an assistant turn in the chat template (``<|im_end|>``, ``<|eot_id|>``).

    Found by rendering a one-turn conversation and reading the special token right after the
    reply; empty when the template has none or the tokenizer has no template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "Zq9xReply"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # a template that needs other roles: no end-of-turn to report
        return []
    tail = text[text.find(marker) + len(marker) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return [ids[0]] if ids and ids[0] in special else []


def _carry_files(
    model_dir: Path, adapter_dir: Path, out: Path, dtype: str, vocab: int | None
) -> list[int]:
    """config, generation config, tokenizer and chat template; returns the end-of-turn ids."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if dtype != "auto":
        config["torch_dtype"] = config["dtype"] = dtype
    if vocab is not None and vocab > int(config.get("vocab_size", 0)):
        config["vocab_size"] = vocab
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _CARRIED:
        # The adapter folder holds the tokenizer the job trained with (its chat template too).
        src = adapter_dir / name if (adapter_dir / name).is_file() else model_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    if not any((out / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return []  # weights only (no tokenizer to carry): nothing to stop on to add
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template:
        tokenizer.chat_template = _strip_generation_tags(tokenizer.chat_template)
        tokenizer.save_pretrained(out)
    eot = end_of_turn_ids(tokenizer)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    ids += eot  # a chat model must stop at the end of its turn, not only at end-of-text
    gen["eos_token_id"] = list(dict.fromkeys(ids))
    if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = int(tokenizer.pad_token_id)
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return eot


def _map_large_buffers() -> None:
    """Make every buffer of 1 MiB or more its own memory mapping, returned when freed.

    glibc raises its mmap threshold the first time a large mapped buffer is freed, after which
    tensor-sized buffers come from the heap, fragment it, and the peak grows with every tensor
    (measured: +190 MiB over 16 tensors of 16 MiB). A fixed threshold turns that off.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own behaviour stands
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def merge(
    model_dir: Path,
    adapter_dir: Path,
    out: Path,
    *,
    into: str = "original",
    dtype: str = "auto",
    quant: dict[str, Any] | None = None,
) -> MergeReport:
    """Write ``base + adapter`` to ``out`` as a standalone HF model folder.

    Args:
        model_dir: The base model folder (config.json + safetensors shards).
        adapter_dir: The PEFT adapter folder (with the job's tokenizer and chat template).
        out: Output folder (replaced).
        into: ``"original"`` (the checkpoint's weights) or ``"dequantized"`` (their 4-bit
            rounding, as in training; needs bitsandbytes).
        dtype: ``"auto"`` keeps each tensor's stored dtype, else ``bfloat16``/``float16``/
            ``float32``.
        quant: The job's ``quant`` section (for ``"dequantized"``).

    Raises:
        MergeError: naming the file and tensor that cannot be merged.
    """
    if into not in ("original", "dequantized"):
        raise MergeError(f"merge base {into!r} is not 'original' or 'dequantized'")
    _map_large_buffers()
    adapter = _load_adapter(adapter_dir)
    shards = base_files(model_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    done: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    stored: set[str] = set()
    for src in shards:
        stored |= {v["dtype"] for k, v in read_header(src).items() if k != "__metadata__"}
        sizes = _write_shard(
            src, out / src.name, adapter, into=into, dtype=dtype, quant=quant or {}, done=done
        )
        weight_map.update(dict.fromkeys(sizes, src.name))
        total += sum(sizes.values())
    missing = sorted((set(adapter.lora) | set(adapter.rows) | set(adapter.replace)) - done)
    if missing:
        shutil.rmtree(out)
        raise MergeError(
            f"{adapter_dir}: {len(missing)} adapter module(s) have no weight in the base "
            f"checkpoint {model_dir}, e.g. {missing[:3]}; is this the adapter of that model?"
        )
    if len(shards) > 1 or (model_dir / _INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    vocab = _embedding_rows(out)
    eot = _carry_files(model_dir, adapter_dir, out, dtype, vocab)
    floats = sorted(_TORCH_NAME[d] for d in stored if d in _TORCH_NAME)
    return MergeReport(
        into=into,
        base_dtype="/".join(floats) or "none",
        dtype=dtype if dtype != "auto" else "/".join(floats) or "none",
        merged_modules=len(adapter.lora),
        replaced_tensors=len(adapter.replace) + len(adapter.rows),
        shards=len(shards),
        bytes=total,
        end_of_turn_ids=eot,
    )


def _embedding_rows(out: Path) -> int | None:
    for shard in _iter_shards(out):
        for name, info in read_header(shard).items():
            if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
                return int(info["shape"][0])
    return None


def _iter_shards(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.safetensors"))
