"""Each Triton op of the fast path against its eager reference, in Triton's CPU interpreter.

Run by ``test_triton_ops.py`` as ``python -m tests.remote._triton_ops_cases`` with
``TRITON_INTERPRET=1`` in the environment (it must be set before Triton is imported). Prints one
JSON object mapping ``op/dtype/case/what`` to the largest difference from the eager function,
relative to the eager result's largest magnitude (``inf`` where shape or dtype differ, or a
gradient is missing), so the test decides the tolerance per dtype; ``.../out-mismatch-share``
keys hold the share of values that are not bit-identical.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from loraburst.remote.fastpath import layers, triton_ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _err(got: Any, ref: Any) -> float:
    if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
        return math.inf
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _rms_norm_cases(out: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, dt in DTYPES.items():
        cases = {
            "3x7x96": torch.randn(3, 7, 96, generator=gen),
            "row-stride": torch.randn(5, 80, generator=gen)[:, :64],  # a slice: row stride 80
            "transposed": torch.randn(6, 4, 100, generator=gen).transpose(0, 1),
            "1x40": torch.randn(1, 40, generator=gen),
        }
        for case, x0 in cases.items():
            hidden = x0.shape[-1]
            x = x0.to(dt).requires_grad_()
            trained = case != "3x7x96"  # the LoRA case: a frozen weight, no gradient for it
            w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dt).requires_grad_(trained)
            eps = 1e-6 if case == "1x40" else 1e-5
            grad = torch.randn(x.shape, generator=gen).to(dt)
            inputs = (x, w) if trained else (x,)
            ref = layers._rms_norm(x, w, eps)
            got = triton_ops.rms_norm(x, w, eps)
            key = f"rms_norm/{name}/{case}"
            out[f"{key}/out"] = _err(got, ref)
            if dt == torch.float16:
                # The interpreter rounds fp16 as CUDA does, so HF's rounding of the normalised
                # row before the weight multiply shows: without it most values differ.
                out[f"{key}/out-mismatch-share"] = float((got != ref).float().mean())
            ref_grads = torch.autograd.grad(ref, inputs, grad)
            got_grads = torch.autograd.grad(got, inputs, grad)
            for what, g, r in zip(("grad_x", "grad_w"), got_grads, ref_grads, strict=False):
                out[f"{key}/{what}"] = _err(g, r)
    # A fp32 weight on bf16 activations: the eager product is fp32, and so must ours be (filed
    # under bf16: the normalised row is rounded to bf16 before the multiply).
    x = torch.randn(4, 48, generator=gen).to(torch.bfloat16)
    w = torch.randn(48, generator=gen)
    out["rms_norm/bf16/mixed-dtype/out"] = _err(
        triton_ops.rms_norm(x, w, 1e-5), layers._rms_norm(x, w, 1e-5)
    )


def _angles(batch: int, seq: int, dim: int, hf: bool, gen: Any) -> tuple[Any, Any]:
    """HF's cos/sin (both halves the same angles) or unrelated values in each half."""
    if hf:
        pos = torch.arange(seq, dtype=torch.float32) + 3 * torch.arange(batch)[:, None]
        freqs = pos[..., None] / 10_000 ** (torch.arange(0, dim, 2) / dim)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
    return torch.randn(batch, seq, dim, generator=gen), torch.randn(batch, seq, dim, generator=gen)


def _rope_cases(out: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(1)
    # (B, T, Hq, Hk, D, cos batch, HF angles)
    shapes = {
        "gqa-cos-b1": (2, 5, 4, 2, 16, 1, True),
        "gqa-cos-b2": (2, 3, 3, 1, 24, 2, False),  # head_dim/2 = 12: not a power of 2
        "mha-odd-T": (1, 9, 5, 5, 8, 1, False),
    }
    for name, dt in DTYPES.items():
        for case, (b, t, hq, hk, d, cb, hf) in shapes.items():
            # q/k as the attention forward makes them: views of one [B, T, (Hq+2Hk) D] output.
            qkv = torch.randn(b, t, (hq + 2 * hk) * d, generator=gen).to(dt).requires_grad_()
            q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            q = q.view(b, t, hq, d).transpose(1, 2)
            k = k.reshape(b, t, hk, d).transpose(1, 2)
            cos, sin = (a.to(dt) for a in _angles(cb, t, d, hf, gen))
            ref = layers._rope(q, k, cos, sin)
            got = triton_ops.rope(q, k, cos, sin)
            grads = (torch.randn(q.shape, generator=gen).to(dt),
                     torch.randn(k.shape, generator=gen).to(dt))  # fmt: skip
            key = f"rope/{name}/{case}"
            out[f"{key}/q"], out[f"{key}/k"] = _err(got[0], ref[0]), _err(got[1], ref[1])
            (ref_grad,) = torch.autograd.grad(ref, qkv, grads)
            (got_grad,) = torch.autograd.grad(got, qkv, grads)
            out[f"{key}/grad_qk"] = _err(got_grad, ref_grad)
        # Contiguous [B, H, T, D] inputs and a grad for q alone.
        q = torch.randn(2, 4, 6, 16, generator=gen).to(dt).requires_grad_()
        k = torch.randn(2, 2, 6, 16, generator=gen).to(dt)
        cos, sin = (a.to(dt) for a in _angles(2, 6, 16, True, gen))
        ref, got = layers._rope(q, k, cos, sin), triton_ops.rope(q, k, cos, sin)
        out[f"rope/{name}/contiguous/q"] = _err(got[0], ref[0])
        out[f"rope/{name}/contiguous/k"] = _err(got[1], ref[1])
        grad = torch.randn(q.shape, generator=gen).to(dt)
        out[f"rope/{name}/contiguous/grad_q"] = _err(
            torch.autograd.grad(got[0], q, grad)[0], torch.autograd.grad(ref[0], q, grad)[0]
        )


def _silu_cases(out: dict[str, float]) -> None:
    gen = torch.Generator().manual_seed(2)
    for name, dt in DTYPES.items():
        cases = {
            "3x5xI40": torch.randn(3, 5, 80, generator=gen),
            "7xI1100": torch.randn(7, 2200, generator=gen),  # two column blocks, a ragged tail
            "row-stride": torch.randn(4, 2100, generator=gen)[:, :2060],
        }
        for case, gu0 in cases.items():
            gate_up = gu0.to(dt)
            half = gate_up.shape[-1] // 2
            grad = torch.randn(*gate_up.shape[:-1], half, generator=gen).to(dt)
            key = f"silu_mul_cat/{name}/{case}"
            with torch.no_grad():
                out[f"{key}/out"] = _err(
                    triton_ops.silu_mul_cat(gate_up), layers._silu_mul_cat(gate_up)
                )
            out[f"{key}/backward"] = _err(
                triton_ops.silu_mul_cat_backward(gate_up, grad),
                layers._silu_mul_cat_backward(gate_up, grad),
            )
            # With grad enabled it must still give the right gradient.
            leaf = gate_up.detach().requires_grad_()
            out[f"{key}/autograd"] = _err(
                torch.autograd.grad(triton_ops.silu_mul_cat(leaf), leaf, grad)[0],
                torch.autograd.grad(layers._silu_mul_cat(leaf), leaf, grad)[0],
            )
            gate = gate_up[..., :half].detach().requires_grad_()
            up = gate_up[..., half:].detach().requires_grad_()
            ref, got = layers._silu_mul(gate, up), triton_ops.silu_mul(gate, up)
            key = f"silu_mul/{name}/{case}"
            out[f"{key}/out"] = _err(got, ref)
            ref_grads = torch.autograd.grad(ref, (gate, up), grad)
            got_grads = torch.autograd.grad(got, (gate, up), grad)
            out[f"{key}/grad_gate"] = _err(got_grads[0], ref_grads[0])
            out[f"{key}/grad_up"] = _err(got_grads[1], ref_grads[1])


def main() -> None:
    """Print every case's relative error as one JSON object."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running (Triton reads it on import)")
    out: dict[str, float] = {"available": 0.0 if triton_ops.available(torch.zeros(1)) else 1.0}
    _rms_norm_cases(out)
    _rope_cases(out)
    _silu_cases(out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
