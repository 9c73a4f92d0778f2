"""Triton kernels for the CUDA fast path (imported only there, never at agent start-up).

:func:`nf4_dequantize` turns a bitsandbytes NF4 weight (double-quantised or not) back into bf16 in
one kernel launch. bitsandbytes does the same work in three launches (the 8-bit absmax, the
offset add, the 4-bit values) behind several layers of Python and operator dispatch; when a
frozen weight is dequantised on every pass (no cache, or recompute) that per-call CPU cost is
paid 224 times a pass for an 8B model. The arithmetic is bitsandbytes' own: fp32 scale, one
rounding to the output dtype, high nibble first.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["Nf4Weight", "nf4_dequantize"]


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def nf4_dequant(  # type: ignore[no-untyped-def]
        q_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, code_ptr, out_ptr, n_bytes,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # byte index: elements 2i (high) and 2i+1 (low)
        mask = offs < n_bytes
        byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = (offs * 2) // BLOCKSIZE
        if NESTED:
            aq = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
            scale = tl.load(code2_ptr + aq) * a2 + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, vals, mask=out_offs < 2 * n_bytes)

    return nf4_dequant


_BLOCK = 1024  # bytes per program: 2,048 output values


class Nf4Weight:
    """What one NF4 weight needs to be dequantised, gathered once (attribute walks cost time).

    Args:
        packed: the bitsandbytes ``Params4bit`` data (uint8, two values per byte).
        quant_state: its ``QuantState``.
    """

    __slots__ = ("absmax", "absmax2", "blocksize", "blocksize2", "code", "code2", "dtype",
                 "nested", "offset", "packed", "shape")  # fmt: skip

    def __init__(self, packed: Any, quant_state: Any) -> None:
        import torch

        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_type={quant_state.quant_type!r}: only nf4 is supported")
        self.packed = packed.reshape(-1)
        self.shape = tuple(quant_state.shape)
        self.dtype = quant_state.dtype
        self.blocksize = int(quant_state.blocksize)
        self.code = quant_state.code.to(torch.float32).contiguous()
        self.nested = bool(quant_state.nested)
        if self.nested:
            self.absmax = quant_state.absmax.contiguous()
            self.code2 = quant_state.state2.code.to(torch.float32).contiguous()
            self.absmax2 = quant_state.state2.absmax.to(torch.float32).contiguous()
            self.blocksize2 = int(quant_state.state2.blocksize)
            self.offset = float(quant_state.offset)
        else:
            self.absmax = quant_state.absmax.to(torch.float32).contiguous()
            self.code2 = self.absmax2 = self.absmax  # unused by the kernel when not nested
            self.blocksize2, self.offset = 1, 0.0

    def dequantize(self, out: Any = None) -> Any:
        """The weight in ``quant_state.dtype``, shape ``quant_state.shape``."""
        return nf4_dequantize(self, out=out)


def nf4_dequantize(w: Nf4Weight, out: Any = None) -> Any:
    """Dequantise ``w`` in one launch (into ``out`` when given: same shape and dtype)."""
    import torch

    n_bytes = w.packed.numel()
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.packed.device)
    grid = ((n_bytes + _BLOCK - 1) // _BLOCK,)
    _kernel()[grid](
        w.packed, w.absmax, w.code2, w.absmax2, w.offset, w.code, out, n_bytes,
        BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BLOCK=_BLOCK,
    )  # fmt: skip
    return out
