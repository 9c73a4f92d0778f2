"""Small measurements that decide the trainer's levers (issue 7): run on the GPU, prints JSON.

    python benchmarks/probe_h200.py [--out benchmarks/results/probe_h200.json]

- host<->device copy bandwidth (pinned), alone and beside a GEMM on another stream: can
  activation offload hide behind compute?
- NF4 dequantisation: bitsandbytes vs ``remote.kernels.nf4_dequantize`` (bit-exact check, GPU
  time per call, CPU time per call).
- GEMM throughput for Llama-3-8B projection shapes at 8,192 tokens (separate vs fused q/k/v and
  gate/up), and sdpa's causal attention forward + backward.
"""

# The timed lambdas run inside the loop iteration that defines them, so late binding is moot.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _gpu_ms(fn: Any, n: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def copies() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for mb in (64, 1024):
        n = mb * 1024 * 1024 // 2
        host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
        dev = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        h2d = _gpu_ms(lambda: dev.copy_(host, non_blocking=True), 10)
        d2h = _gpu_ms(lambda: host.copy_(dev, non_blocking=True), 10)
        out[f"{mb}MB"] = {
            "h2d_GBps": round(mb / 1024 / h2d * 1e3, 1),
            "d2h_GBps": round(mb / 1024 / d2h * 1e3, 1),
        }
    # Overlap: a 64 MB D2H on a side stream while the default stream runs a GEMM.
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    host = torch.empty(8192 * 4096, dtype=torch.bfloat16, pin_memory=True)
    side = torch.cuda.Stream()
    gemm = _gpu_ms(lambda: a @ w.t(), 10)

    def both() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(a.view(-1), non_blocking=True)
        a @ w.t()
        torch.cuda.current_stream().wait_stream(side)

    out["gemm_ms"] = round(gemm, 3)
    out["gemm_plus_side_copy_64MB_ms"] = round(_gpu_ms(both, 10), 3)
    return out


def dequant() -> dict[str, Any]:
    import bitsandbytes.functional as F
    import torch

    from remote.kernels import Nf4Weight

    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    q, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    ref = F.dequantize_4bit(q, qs).to(torch.bfloat16)
    prepared = Nf4Weight(q, qs)
    ours = prepared.dequantize()
    res: dict[str, Any] = {"mismatches": int((ours != ref).sum()), "numel": ref.numel()}
    bnb = lambda: F.dequantize_4bit(q, qs)  # noqa: E731
    tri = lambda: prepared.dequantize()  # noqa: E731
    res["bnb_gpu_ms"] = round(_gpu_ms(bnb, 50), 4)
    res["ours_gpu_ms"] = round(_gpu_ms(tri, 50), 4)
    for name in ("bnb", "ours"):
        small = torch.randn(1024, 64, device="cuda")  # keep the queue short: CPU cost alone
        q2, qs2 = F.quantize_4bit(small, quant_type="nf4", compress_statistics=True)
        p2 = Nf4Weight(q2, qs2)
        f = (lambda: F.dequantize_4bit(q2, qs2)) if name == "bnb" else (lambda: p2.dequantize())
        f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            f()
        res[f"{name}_cpu_us_per_call"] = round((time.perf_counter() - t0) / 500 * 1e6, 1)
        torch.cuda.synchronize()
    return res


def gemms() -> dict[str, Any]:
    import torch

    t = 8192
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    res: dict[str, Any] = {}
    for name, n in (
        ("q", 4096),
        ("kv", 1024),
        ("qkv_fused", 6144),
        ("gate", 14336),
        ("gate_up_fused", 28672),
    ):
        w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        fwd = _gpu_ms(lambda: x @ w.t())
        bwd = _gpu_ms(lambda: g @ w)
        fl = 2 * t * n * 4096
        res[name] = {"fwd_ms": round(fwd, 3), "fwd_tflops": round(fl / fwd / 1e9, 0),
                     "dx_ms": round(bwd, 3), "dx_tflops": round(fl / bwd / 1e9, 0)}  # fmt: skip
    h = torch.randn(t, 14336, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    down = _gpu_ms(lambda: h @ wd.t())
    res["down"] = {
        "fwd_ms": round(down, 3),
        "fwd_tflops": round(2 * t * 4096 * 14336 / down / 1e9, 0),
    }
    q = torch.randn(4, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(4, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = _gpu_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))

    def fb() -> None:
        sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    res["sdpa_causal_gqa"] = {"fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(_gpu_ms(fb, 10), 3)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = {"copies": copies(), "dequant": dequant(), "gemms": gemms()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
