"""Compile the fast path's elementwise kernels in a separate process while the model loads.

The first training step on a freshly rented machine waited ~8 s for ``torch.compile`` to build
RMSNorm, RoPE and the SiLU-gate kernels (and their backward graphs): the memory probe is their
first caller, after the model has loaded. Inductor keeps what it compiles in on-disk caches
(FX graphs, AOTAutograd graphs, Triton binaries) shared by every process of the same user, so
a helper process that calls the same compiled functions with inputs of the same shapes, dtypes
and grad flags fills those caches while the trainer is still reading and quantising weights;
the trainer's own compile then finds them there. A process, not a thread: compiling is mostly
Python, and a thread would hold the GIL against the model load and the tokenizer; it also keeps
the trainer's global torch state (default dtype, grad mode) out of the compiler's guards.

Run as ``python -m loraburst.remote.fastpath.warm MODEL DTYPE`` (a model folder, or a hub id
whose ``config.json`` is fetched). The shapes it uses are
the ones the trainer's first callers use: one packed row of 128 tokens (the memory probe's first
size; the token dimension is compiled dynamic, so later sizes reuse the same graphs), with and
without grad, and the lean mode's 2-D MLP chunks. Nothing here is needed for correctness: a
warm-up that fails or guesses a shape wrong only costs the trainer the compile it already paid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["kernel_shapes", "warm"]

_TOKENS = 128  # the memory probe's first size (planner.probe_memory)


def kernel_shapes(config: dict[str, Any]) -> dict[str, Any] | None:
    """The sizes the compiled kernels see for a model with this ``config.json``, or ``None``
    for a config the grouped fast path does not handle (its kernels would never be called)."""
    text = config.get("text_config") or config
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        inter = int(text["intermediate_size"])
        eps = float(text.get("rms_norm_eps", 1e-6))
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    return {
        "hidden": hidden, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
        "intermediate": inter, "eps": eps,
    }  # fmt: skip


def warm(shapes: dict[str, Any], dtype: str = "bfloat16", device: str = "cuda") -> list[str]:
    """Call each compiled kernel once the way training first does; returns what ran.

    Each call goes through the same cached ``torch.compile`` wrappers the trainer uses
    (``layers._compiled``), forward and, where training differentiates it, backward.
    """
    import torch

    from .layers import _compiled

    dt = getattr(torch, dtype)
    n, h, hd = _TOKENS, shapes["hidden"], shapes["head_dim"]
    heads, kv, inter, eps = (
        shapes["heads"],
        shapes["kv_heads"],
        shapes["intermediate"],
        shapes["eps"],
    )
    done: list[str] = []

    def rand(*size: int, grad: bool = False) -> Any:
        return torch.randn(*size, dtype=dt, device=device, requires_grad=grad)

    norm = _compiled("rms_norm")
    # A frozen Parameter, as the model's norm weights are (its type is guarded too).
    weight = torch.nn.Parameter(torch.ones(h, dtype=dt, device=device), requires_grad=False)
    # The first layer's input (frozen embeddings: no grad), every later one (grad), and the
    # lean mode's forward under no_grad (its layers are recomputed with grad in the backward).
    norm(rand(1, n, h), weight, eps)
    x = rand(1, n, h, grad=True)
    norm(x, weight, eps).sum().backward()
    with torch.no_grad():  # a recomputed layer's input requires grad even there
        norm(rand(1, n, h), weight, eps)
        norm(rand(1, n, h, grad=True), weight, eps)
    done.append("rms_norm")

    rope = _compiled("rope")
    cos, sin = rand(1, n, hd), rand(1, n, hd)

    def q_k(grad: bool) -> tuple[Any, Any]:
        # Views of one [q|k|v] buffer, transposed to [batch, heads, tokens, head_dim], as the
        # grouped attention forward hands them over (the strides are part of the graph).
        qkv = rand(1, n, (heads + 2 * kv) * hd, grad=grad)
        q, k, _ = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
        return q.view(1, n, -1, hd).transpose(1, 2), k.view(1, n, -1, hd).transpose(1, 2)

    q, k = q_k(True)
    qo, ko = rope(q, k, cos, sin)
    (qo.float().sum() + ko.float().sum()).backward()
    with torch.no_grad():
        rope(*q_k(False), cos, sin)
    done.append("rope")

    act, act_bwd = _compiled("silu_mul_cat"), _compiled("silu_mul_cat_backward")
    # Both run inside an autograd.Function, where grad is off but the stacked gate/up input
    # still requires it (the lean mode's forward under no_grad: it does not); over the whole
    # micro-batch, and over the lean mode's 2-D chunks.
    with torch.no_grad():
        for lead in ((1, n), (n,)):
            gate_up = rand(*lead, 2 * inter, grad=True)
            act(gate_up)
            act_bwd(gate_up, rand(*lead, inter))
            act(rand(*lead, 2 * inter))
    done.append("silu_mul_cat")
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def _config(model: str) -> dict[str, Any]:
    folder = Path(model)
    if folder.is_dir():
        path = folder / "config.json"
    else:  # a hub id: the one small file, into the cache the model load then reads
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``MODEL [DTYPE]``; prints what was compiled as JSON."""
    args = sys.argv[1:] if argv is None else argv
    config = _config(args[0])
    shapes = kernel_shapes(config)
    if shapes is None:
        print(json.dumps({"warmed": [], "reason": "not a config the fast path groups"}))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"warmed": [], "reason": "no CUDA device"}))
        return 0
    done = warm(shapes, args[1] if len(args) > 1 else "bfloat16")
    print(json.dumps({"warmed": done}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
