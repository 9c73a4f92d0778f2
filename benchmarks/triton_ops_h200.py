"""The fast path's elementwise ops on one CUDA GPU: hand-written Triton against ``torch.compile``.

For each op (RMSNorm, RoPE, the stacked SiLU gate and its backward, the two-tensor SiLU gate)
at Llama-3-8B shapes (8,192 tokens, hidden 4,096, 32 q / 8 kv heads of 128, intermediate
14,336, bf16), three implementations of one forward + backward:

- ``triton``: :mod:`loraburst.remote.fastpath.triton_ops`;
- ``compile``: the eager function through ``torch.compile`` exactly as ``layers._compiled``
  builds it (token dimension marked dynamic);
- ``eager``: the eager function of ``layers``.

Reported per op and implementation: median GPU milliseconds (CUDA events), host microseconds per
forward + backward at 64 tokens (where the GPU work is negligible, so this is the CPU cost a
small step pays), the first call's seconds from cold caches (compilation: Triton's and
inductor's caches point at fresh folders unless ``--warm-cache``), the first call's seconds at
a new token count (a recompile, or not), and the largest absolute difference from eager of the
outputs and gradients. Prints a markdown table and writes ``results/triton_ops.json``.

    python benchmarks/triton_ops_h200.py [--tokens 8192] [--iters 50] [--warm-cache]
    python benchmarks/triton_ops_h200.py --check   # asserts Triton matches eager on many shapes

Not yet run on a GPU: written for one device call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results" / "triton_ops.json"

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, EPS = 4096, 32, 8, 128, 14336, 1e-5
OPS = ("rms_norm", "rope", "silu_mul_cat", "silu_mul")
IMPLS = ("triton", "compile", "eager")
BF16_TOL = 2.0**-5  # of the largest eager value: a few bf16 ulps (as tests/remote)


def _import_fastpath() -> tuple[Any, Any]:
    """``layers`` and ``triton_ops``, installed or straight from this checkout."""
    try:
        from loraburst.remote.fastpath import layers, triton_ops
    except ImportError:
        # Not installed: map the package onto the checkout as setuptools' package-dir does,
        # without importing the client (``sdk/__init__``) and its dependencies.
        import importlib.util
        import types

        pkg = types.ModuleType("loraburst")
        pkg.__path__ = [str(ROOT / "sdk")]
        sys.modules["loraburst"] = pkg
        spec = importlib.util.spec_from_file_location(
            "loraburst.remote", ROOT / "remote" / "__init__.py",
            submodule_search_locations=[str(ROOT / "remote")],
        )  # fmt: skip
        assert spec is not None and spec.loader is not None
        remote = importlib.util.module_from_spec(spec)
        sys.modules["loraburst.remote"] = remote
        spec.loader.exec_module(remote)
        from loraburst.remote.fastpath import layers, triton_ops
    return layers, triton_ops


def _angles(batch: int, seq: int, dim: int, dtype: Any) -> tuple[Any, Any]:
    import torch

    pos = torch.arange(seq, device="cuda", dtype=torch.float32) + 7 * torch.arange(
        batch, device="cuda"
    ).unsqueeze(-1)
    freqs = pos[..., None] / 500_000.0 ** (torch.arange(0, dim, 2, device="cuda") / dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _case(op: str, fn: Any, fn_bwd: Any, tokens: int, shape: dict[str, int], dtype: Any) -> Any:
    """A closure running one forward + backward of ``op``; returns its outputs and gradients."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(tokens)

    def randn(*size: int) -> Any:
        return torch.randn(*size, device="cuda", generator=gen, dtype=torch.float32).to(dtype)

    batch = shape.get("batch", 1)
    seq = tokens // batch
    if op == "rms_norm":
        x = randn(batch, seq, shape["hidden"]).requires_grad_()
        w = 1 + 0.1 * randn(shape["hidden"])
        g = randn(batch, seq, shape["hidden"])

        def run() -> list[Any]:
            out = fn(x, w, EPS)
            return [out, *torch.autograd.grad(out, x, g)]

    elif op == "rope":
        hq, hk, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
        qkv = randn(batch, seq, (hq + 2 * hk) * d)
        # Leaf views laid out as the attention forward makes them (transposed, strided).
        q = qkv[..., : hq * d].view(batch, seq, hq, d).transpose(1, 2).requires_grad_()
        k = qkv[..., hq * d : (hq + hk) * d].view(batch, seq, hk, d).transpose(1, 2)
        k.requires_grad_()
        cos, sin = _angles(shape.get("cos_batch", 1), seq, d, dtype)
        gq, gk = randn(batch, hq, seq, d), randn(batch, hk, seq, d)

        def run() -> list[Any]:
            qo, ko = fn(q, k, cos, sin)
            return [qo, ko, *torch.autograd.grad((qo, ko), (q, k), (gq, gk))]

    elif op == "silu_mul_cat":
        gate_up = randn(tokens, 2 * shape["intermediate"])
        g = randn(tokens, shape["intermediate"])

        def run() -> list[Any]:
            with torch.no_grad():  # as the MLP's autograd function calls them
                return [fn(gate_up), fn_bwd(gate_up, g)]

    else:
        gate = randn(tokens, shape["intermediate"]).requires_grad_()
        up = randn(tokens, shape["intermediate"]).requires_grad_()
        g = randn(tokens, shape["intermediate"])

        def run() -> list[Any]:
            out = fn(gate, up)
            return [out, *torch.autograd.grad(out, (gate, up), g)]

    return run


def _impl(layers: Any, triton_ops: Any, impl: str, op: str) -> tuple[Any, Any]:
    """``(fn, backward fn or None)`` of ``op`` in implementation ``impl``."""
    bwd = op == "silu_mul_cat"
    if impl == "triton":
        return getattr(triton_ops, op), triton_ops.silu_mul_cat_backward if bwd else None
    if impl == "compile":
        return layers._compiled(op), layers._compiled("silu_mul_cat_backward") if bwd else None
    return getattr(layers, "_" + op), layers._silu_mul_cat_backward if bwd else None


def _synced_s(run: Callable[[], Any]) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _gpu_ms(run: Callable[[], Any], iters: int) -> float:
    import torch

    for _ in range(3):
        run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _host_us(run: Callable[[], Any], calls: int = 200) -> float:
    """Wall microseconds per call at a size where the GPU keeps up: the host's cost."""
    for _ in range(10):
        run()
    return _synced_s(lambda: [run() for _ in range(calls)]) / calls * 1e6


def _max_abs(got: list[Any], ref: list[Any]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(_fp32(got), _fp32(ref), strict=True))


def _fp32(tensors: list[Any]) -> list[Any]:
    return [t.detach().float() for t in tensors]


def _max_rel(got: list[Any], ref: list[Any]) -> float:
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        for a, b in zip(_fp32(got), _fp32(ref), strict=True)
    )


LLAMA_8B = {"hidden": HIDDEN, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "intermediate": INTERMEDIATE}  # fmt: skip


def bench(tokens: int, iters: int) -> dict[str, Any]:
    """Time every op and implementation; cold first calls first, before anything warms up."""
    import torch
    import triton

    layers, triton_ops = _import_fastpath()
    dt = torch.bfloat16
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "tokens": tokens, "dtype": "bf16", "shape": LLAMA_8B,
        "ops": {op: {impl: {} for impl in IMPLS} for op in OPS},
    }  # fmt: skip
    # Triton's runtime (its driver stub is built on first use) is paid by both Triton and
    # inductor: paid here once, outside either's first call.
    tiny = torch.ones(1, 2, device="cuda")
    result["runtime_init_s"] = _synced_s(lambda: triton_ops.silu_mul_cat(tiny))
    runs = {}
    for impl in ("triton", "compile"):
        for op in OPS:
            fn, bwd = _impl(layers, triton_ops, impl, op)
            runs[impl, op] = _case(op, fn, bwd, tokens, LLAMA_8B, dt)
            row = result["ops"][op][impl]
            row["first_call_s"] = _synced_s(runs[impl, op])
            other = _case(op, fn, bwd, tokens - 1000 + 8, LLAMA_8B, dt)
            row["new_token_count_first_call_s"] = _synced_s(other)
    for op in OPS:
        fn, bwd = _impl(layers, triton_ops, "eager", op)
        runs["eager", op] = _case(op, fn, bwd, tokens, LLAMA_8B, dt)
        ref = [t.detach() for t in runs["eager", op]()]
        for impl in IMPLS:
            row = result["ops"][op][impl]
            row["max_abs_err_vs_eager"] = _max_abs(runs[impl, op](), ref)
            row["median_ms"] = _gpu_ms(runs[impl, op], iters)
            fn, bwd = _impl(layers, triton_ops, impl, op)
            row["host_us_64_tokens"] = _host_us(_case(op, fn, bwd, 64, LLAMA_8B, dt))
        del ref
        runs = {key: run for key, run in runs.items() if key[1] != op}  # free the memory
        torch.cuda.empty_cache()
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}: "
        f"{result['tokens']} tokens, Llama-3-8B shapes, bf16, forward + backward",
        "",
        "| op | impl | median ms | host us @64 tok | first call s | new token count s "
        "| max abs err vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op, impls in result["ops"].items():
        for impl, row in impls.items():
            first = row.get("first_call_s")
            again = row.get("new_token_count_first_call_s")
            lines.append(
                f"| {op} | {impl} | {row['median_ms']:.3f} | {row['host_us_64_tokens']:.0f} | "
                + (f"{first:.2f} | {again:.2f}" if first is not None else "- | -")
                + f" | {row['max_abs_err_vs_eager']:.3g} |"
            )
    lines.append("")
    for impl in ("triton", "compile"):
        cold = sum(r[impl]["first_call_s"] for r in result["ops"].values())
        lines.append(f"{impl}: {cold:.2f} s of first calls in all")
    lines.append(f"Triton runtime start-up (paid once by either): {result['runtime_init_s']:.2f} s")
    return "\n".join(lines)


# (tokens, shape, dtype name): odd row counts, hidden sizes of other models, GQA ratios.
CHECKS: list[tuple[int, dict[str, int], str]] = [
    (8192, LLAMA_8B, "bf16"),
    (1003, {"hidden": 3072, "q_heads": 24, "kv_heads": 8, "head_dim": 128,
            "intermediate": 8192}, "bf16"),  # Llama-3.2-3B
    (998, {"hidden": 3584, "q_heads": 28, "kv_heads": 4, "head_dim": 128,
           "intermediate": 18944, "batch": 2, "cos_batch": 2}, "bf16"),  # Qwen2-7B
    (517, {"hidden": 5120, "q_heads": 40, "kv_heads": 8, "head_dim": 128,
           "intermediate": 13824}, "fp16"),
    (33, {"hidden": 96, "q_heads": 6, "kv_heads": 2, "head_dim": 24,
          "intermediate": 1100, "batch": 3, "cos_batch": 3}, "fp32"),
]  # fmt: skip


def check() -> None:
    """Assert the Triton ops match eager on CUDA, and that new token counts compile nothing.

    Raises:
        AssertionError: on a difference beyond tolerance or a recompilation.
    """
    import torch

    layers, triton_ops = _import_fastpath()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    tol = {"bf16": BF16_TOL, "fp16": 2.0**-8, "fp32": 1e-5}
    for tokens, shape, name in CHECKS:
        for op in OPS:
            ours = _case(op, *_impl(layers, triton_ops, "triton", op), tokens, shape, dtypes[name])
            ref = _case(op, *_impl(layers, triton_ops, "eager", op), tokens, shape, dtypes[name])
            err = _max_rel(ours(), ref())
            print(f"{op:13s} {name} {tokens:5d} tokens {shape}: max rel err {err:.3g}")
            assert err <= tol[name], (op, tokens, shape, name, err)
    kernels = [*triton_ops._rms_kernels(), triton_ops._rope_kernel(), *triton_ops._silu_kernels()]
    before = [_variants(k) for k in kernels]
    for tokens in (4099, 777, 12288):
        for op in OPS:
            fn, bwd = _impl(layers, triton_ops, "triton", op)
            _case(op, fn, bwd, tokens, LLAMA_8B, torch.bfloat16)()
    after = [_variants(k) for k in kernels]
    # -1: this Triton keeps its compiled kernels elsewhere, and the count cannot be checked.
    print("compiled variants per kernel before/after new token counts:", before, after)
    assert before == after, "a new token count compiled a new kernel variant"
    print("check passed")


def _variants(kernel: Any) -> int:
    """Compiled variants of a ``@triton.jit`` kernel on the current device (-1 if unknown)."""
    import torch

    try:
        return len(kernel.device_caches[torch.cuda.current_device()][0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return -1


def main() -> None:
    """Parse the arguments; check, or benchmark and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--check", action="store_true", help="assert Triton matches eager")
    parser.add_argument("--warm-cache", action="store_true", help="keep the compile caches")
    args = parser.parse_args()
    if not args.warm_cache:  # before torch or triton is imported: both read these once
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.check:
        check()
        return
    result = bench(args.tokens, args.iters)
    print(_table(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
