"""Shared pieces of the trainer benchmarks: real model shapes, random checkpoints, the three stacks.

Everything heavy (torch, transformers, peft, bitsandbytes, unsloth) is imported inside functions,
so ``measure_one.py`` can import ``unsloth`` before transformers when it measures that stack.

Models are random-weight checkpoints of the real shapes, written once per machine (bf16
safetensors plus a small fast tokenizer, which Unsloth insists on) under ``$BENCH_MODELS`` (default
``/tmp/models``) and loaded by every stack through its own loader, so all three quantise the same
weights to NF4 with double quantisation.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 790.0  # bf16 dense, measured on this workplace's H200 (KINDS.md)
GIB = 1024**3
LORA_ALPHA = 32
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
# Exact shapes of the public checkpoints' config.json (weights are random).
MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        **_LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
    },
    "llama-3.1-8b": {
        **_LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "llama-3.2-3b": {
        **_LLAMA, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192,
        "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "tiny-llama": {  # for trying the harnesses on a CPU
        **_LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 512,
        "tie_word_embeddings": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "bos_token_id": 257, "eos_token_id": 258,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "use_sliding_window": False, "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "num_hidden_layers": 42,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "intermediate_size": 14336, "vocab_size": 256000, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    },
    "phi-3-mini": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
        "hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
        "pad_token_id": 32000,
    },
    "mistral-7b": {  # Mistral-7B-v0.3
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 32768, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
        "bos_token_id": 1, "eos_token_id": 2,
    },
}  # fmt: skip


def models_root() -> Path:
    return Path(os.environ.get("BENCH_MODELS", "/tmp/models"))


def flops_per_token(model: str, seq: int, lora_r: int) -> float:
    """The issue's 4N convention (no recompute counted), from the estimator's own formula."""
    from remote.memory import flops_per_token as fpt
    from remote.memory import lora_params, shape_from_config

    shape = shape_from_config(MODELS[model])
    return fpt(shape, seq, lora_params(shape, lora_r), gradient_checkpointing=False)["total"]


# A chat template over the benchmark tokenizer's own special tokens (no tokens to add), so chat
# rows train with assistant-only loss as they would on a real instruct model.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def _save_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    """A tokenizer where ``realistic_data.word(i)`` is token ``i`` (a row of N words is N tokens).

    Word-level for every model but Qwen2: transformers 5 rebuilds a Qwen2 folder's tokenizer
    as byte-level BPE from the folder's vocabulary and merges, ignoring the rest of
    ``tokenizer.json``, so there the words are spelled out as BPE merges (``Ġ`` marks a leading
    space): a word is still one token, id ``i`` after a space.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from benchmarks.realistic_data import word

    words = [word(i) for i in range(256)]
    specials = {"<pad>": 256, "<s>": 257, "</s>": 258, "<unk>": 259,
                "<|system|>": 260, "<|user|>": 261, "<|assistant|>": 262}  # fmt: skip
    if config.get("model_type") == "qwen2":
        vocab = {f"\u0120{w}": i for i, w in enumerate(words)} | specials
        pieces = ["\u0120", *"abcdefghijklmnopqrstuvwxyz"]
        firsts = sorted({w[0] for w in words})
        pieces += [f"\u0120{c}" for c in firsts] + words  # words at a row's start: no space
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merges = [("\u0120", c) for c in firsts]
        merges += [(f"\u0120{w[0]}", w[1]) for w in words] + [(w[0], w[1]) for w in words]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        ids = {w: i for i, w in enumerate(words)}
        tok = Tokenizer(models.WordLevel({**ids, **specials}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=config["max_position_embeddings"],
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def ensure_checkpoint(model: str, seed: int = 0, layers: int | None = None) -> Path:
    """Write the random-weight bf16 checkpoint once per machine; return its folder.

    ``layers`` keeps the real widths with fewer decoder layers (per-layer figures scale).
    """
    name = model if layers is None else f"{model}-{layers}l"
    folder = models_root() / name
    if (folder / "DONE").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(MODELS[model])
    if layers is not None:
        config_dict["num_hidden_layers"] = layers
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps({**config_dict, "torch_dtype": "bfloat16"}))
    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.save_pretrained(tmp)
    _save_tokenizer(tmp, config_dict)
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _bnb_config() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip


def _lora_config(r: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
        target_modules=PROJECTIONS, task_type="CAUSAL_LM",
    )  # fmt: skip


def _hf_4bit(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_bnb_config(), dtype=torch.bfloat16,
        device_map={"": 0}, attn_implementation="sdpa",
    )  # fmt: skip


def load_vanilla(path: Path, *, lora_r: int, grad_ckpt: bool) -> Any:
    """The textbook QLoRA recipe: bnb NF4, ``prepare_model_for_kbit_training``, peft LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = _hf_4bit(path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    return get_peft_model(model, _lora_config(lora_r))


def load_ours(path: Path, *, lora_r: int) -> Any:
    """The trainer's load: bnb NF4 + peft LoRA, embeddings and norms left in bf16."""
    from peft import get_peft_model

    model = _hf_4bit(path)
    model.config.use_cache = False
    return get_peft_model(model, _lora_config(lora_r))


def load_unsloth(path: Path, *, seq: int, lora_r: int, grad_ckpt: bool) -> Any:
    """Unsloth's own loader and LoRA wrapper (``import unsloth`` must already have run)."""
    import torch
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(
        str(path), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True,
    )  # fmt: skip
    return FastLanguageModel.get_peft_model(
        model, r=lora_r, lora_alpha=LORA_ALPHA, lora_dropout=0, bias="none",
        target_modules=PROJECTIONS, use_gradient_checkpointing="unsloth" if grad_ckpt else False,
        random_state=3407,
    )  # fmt: skip


def random_batches(vocab: int, micro_batch: int, seq: int, count: int, seed: int) -> list[Any]:
    """Uniform random tokens (timing data): identical for every stack."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro_batch, seq), generator=gen) for _ in range(count)]


def parity_batches(micro_batch: int, seq: int, count: int, seed: int) -> list[Any]:
    """Learnable tokens for the loss-parity run: a fixed bigram chain over 512 token ids.

    Random tokens leave the loss flat at ln(vocab); these let 30 steps move it a lot, so a stack
    that computed a different function would show.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(1000, 1512, (1512,), generator=gen)
    out = []
    for _ in range(count):
        x = torch.empty((micro_batch, seq), dtype=torch.long)
        x[:, 0] = torch.randint(1000, 1512, (micro_batch,), generator=gen)
        for t in range(1, seq):
            x[:, t] = table[x[:, t - 1]]
        noise = torch.rand((micro_batch, seq), generator=gen) < 0.1
        x[noise] = torch.randint(1000, 1512, (int(noise.sum()),), generator=gen)
        out.append(x)
    return out


def train_steps(model: Any, batches: list[Any], *, lr: float) -> tuple[list[float], list[float]]:
    """Plain AdamW steps on ``model(input_ids=x, labels=x).loss``; (losses, step seconds)."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    times: list[float] = []
    device = next(p.device for p in params)
    for x in batches:
        x = x.to(device, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return losses, times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def profile_steps(model: Any, batches: list[Any], *, lr: float, top: int = 25) -> dict[str, Any]:
    """Run ``batches`` under ``torch.profiler``; the trainer's own step-profile summary
    (``loraburst.remote.training.profiling.summarise``: GPU time per kernel kind, busy share,
    top kernels and host operations).

    ``gpu_busy_share`` is summed kernel time over wall time: well under 1 means the GPU waits on
    the CPU (Python and launch overhead) or on host copies.
    """
    import torch
    from loraburst.remote.training.profiling import summarise
    from torch.profiler import ProfilerActivity, profile

    train_steps(model, batches[:1], lr=lr)  # warm caches outside the trace
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        train_steps(model, batches[1:], lr=lr)
    wall = time.perf_counter() - t0
    return summarise(prof.key_averages(), wall, max(1, len(batches) - 1), top=top)


def run_child(script: str, key: str, t_end: float, grace_s: float = 120) -> dict[str, Any]:
    """Run ``script --one key`` in its own process (a fresh CUDA context and allocator per run)
    and return the JSON it wrote, or ``{"error": ...}``; it may run ``grace_s`` past ``t_end``.
    ``elapsed_s`` is added."""
    import subprocess
    import sys
    import tempfile
    import time

    out = Path(tempfile.mkdtemp()) / "run.json"
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, script, "--one", key, "--out", str(out)],
                              capture_output=True, text=True,
                              timeout=max(60, t_end - time.time() + grace_s))  # fmt: skip
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"timed out: {exc.stdout!r} {exc.stderr!r}"
    raw: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"error": log[-4000:]}
    raw["elapsed_s"] = round(time.time() - t0, 1)
    return raw
