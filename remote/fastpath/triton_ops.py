"""Hand-written Triton kernels for the fast path's elementwise ops: RMSNorm, RoPE, the SiLU gate.

Drop-in replacements for the ``torch.compile`` path of :mod:`.layers` (``_rms_norm``, ``_rope``,
``_silu_mul_cat``, ``_silu_mul_cat_backward``, ``_silu_mul``), with the same signatures and the
same arithmetic. Compiling those took 12.7-20.9 s on a fresh H200 before the first step (the
plan took 4.0 s with these kernels), and every compiled call pays host time in dynamo's guards
and the AOT autograd wrapper, which small, host-bound steps feel: with these kernels a 4K-token
step under a 24 GiB cap ran 11,186 tok/s where it ran 9,853 (benchmarks/RESULTS.md, (b)). A
Triton kernel is compiled once per dtype and layout.

Every kernel computes in fp32 and rounds once, on the store, to the output's dtype (plus the one
rounding HF Llama's RMSNorm makes on purpose before its weight multiply). Row counts only ever
reach a kernel through its launch grid, never as an argument, so a new token count never compiles
anything: the arguments that do change with it (the batch strides of RoPE's q/k/cos/sin) are
multiples of 16 for any head_dim that is one, so Triton's divisibility specialisation keeps them
in one variant.

Torch and Triton are imported only inside functions: this module is imported on machines that
have neither. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["available", "rms_norm", "rope", "silu_mul", "silu_mul_cat", "silu_mul_cat_backward"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(tensor: Any) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device.

    True for a CUDA tensor when Triton is importable, and for any tensor when
    ``TRITON_INTERPRET=1`` is set (Triton's CPU interpreter, used by the tests). Callers fall back
    to the ``torch.compile`` path of :mod:`.layers` otherwise.
    """
    if not _triton_importable():
        return False
    return bool(tensor.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps(block: int) -> int:
    """Warps for a program that holds ``block`` values of a row (8-16 values a thread)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows(t: Any) -> Any:
    """``t`` as ``[rows, last]`` with unit stride along the last dim (a view when it can be)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 or flat.shape[-1] == 1 else flat.contiguous()


# ----------------------------------------------------------------------------------- RMSNorm


@functools.cache
def _rms_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def rms_norm_fwd(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, out_ptr, rstd_ptr, x_stride, out_stride, n_cols, eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        # HF Llama rounds the normalised row to x's dtype before the weight multiply.
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (w * normed).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * out_stride + cols, out, mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit  # type: ignore[untyped-decorator]
    def rms_norm_bwd(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, x_stride, g_stride, dx_stride, n_cols,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        # Autograd rounds the gradient reaching the rounded row to x's dtype: so do we.
        dn = (g * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        n = x * rstd
        dot = tl.sum(dn * n, axis=0) / n_cols
        dx = rstd * (dn - n * dot)
        tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    return rms_norm_fwd, rms_norm_bwd


def _rms_norm_forward(x2: Any, weight: Any, eps: float, out_dtype: Any) -> tuple[Any, Any]:
    import torch

    rows, cols = x2.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block = _next_pow2(cols)
        _rms_kernels()[0][(rows,)](
            x2, weight, out, rstd, x2.stride(0), out.stride(0), cols, eps,
            BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return out, rstd


@functools.cache
def _rms_norm_function() -> Any:
    import torch

    class _RmsNorm(torch.autograd.Function):
        """HF Llama's RMSNorm, saving only ``x`` and the fp32 ``1/rms`` of each row."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
            x2 = _rows(x)
            w = weight.contiguous()
            out_dtype = x.dtype if w.dtype == x.dtype else torch.promote_types(w.dtype, x.dtype)
            out, rstd = _rms_norm_forward(x2, w, eps, out_dtype)
            ctx.save_for_backward(x2, w, rstd)
            ctx.x_shape = x.shape
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x2, w, rstd = ctx.saved_tensors
            rows, cols = x2.shape
            g2 = _rows(grad)
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                dx = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
                if rows:
                    block = _next_pow2(cols)
                    _rms_kernels()[1][(rows,)](
                        x2, w, g2, rstd, dx, x2.stride(0), g2.stride(0), dx.stride(0), cols,
                        BLOCK=block, num_warps=_warps(block),
                    )  # fmt: skip
                grad_x = dx.view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                # The norm weight is frozen under LoRA: a plain torch reduction keeps it correct
                # for the rare caller that trains it, without a second kernel.
                normed = (x2.float() * rstd[:, None]).to(x2.dtype).float()
                grad_w = (g2.float() * normed).sum(0).to(w.dtype)
            return grad_x, grad_w, None

    return _RmsNorm


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """HF Llama's RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, in fp32.

    Args:
        x: ``[..., hidden]`` activations (any float dtype and strides, any hidden size).
        weight: ``[hidden]`` norm weight; its gradient is computed only if it requires one.
        eps: added to the mean square.

    Returns:
        ``[..., hidden]`` in the dtype ``weight`` and ``x`` promote to, as the eager expression gives.
    """
    out: Any = _rms_norm_function().apply(x, weight, eps)
    return out


# -------------------------------------------------------------------------------------- RoPE


@functools.cache
def _rope_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def rope_rotate(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
        q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd,
        qo_sb, qo_sh, qo_st, qo_sd, ko_sb, ko_sh, ko_st, ko_sd,
        c_sb, c_st, c_sd, s_sb, s_st, s_sd, n_q_heads, n_k_heads,
        HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        # One program rotates every q and k head of one token: cos/sin are read once for all.
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        cs = cos_ptr + b * c_sb + t * c_st
        ss = sin_ptr + b * s_sb + t * s_st
        c1 = tl.load(cs + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cs + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(ss + d * s_sd, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(ss + (d + HALF) * s_sd, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            # The transpose of the rotation: with HF's duplicated cos/sin halves this is the
            # rotation by -sin; written from the halves it also holds when they differ.
            s1, s2 = -s2, -s1
        # q and k written out twice: Triton resolves a called @jit helper through the module's
        # globals, which this lazily built kernel cannot use.
        h = tl.arange(0, BLOCK_HQ)
        mask = (h[:, None] < n_q_heads) & dmask[None, :]
        xs = q_ptr + b * q_sb + t * q_st + h[:, None] * q_sh + d[None, :] * q_sd
        x1 = tl.load(xs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xs + HALF * q_sd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        os_ = qo_ptr + b * qo_sb + t * qo_st + h[:, None] * qo_sh + d[None, :] * qo_sd
        tl.store(os_, o1.to(qo_ptr.dtype.element_ty), mask=mask)
        tl.store(os_ + HALF * qo_sd, o2.to(qo_ptr.dtype.element_ty), mask=mask)
        h = tl.arange(0, BLOCK_HK)
        mask = (h[:, None] < n_k_heads) & dmask[None, :]
        xs = k_ptr + b * k_sb + t * k_st + h[:, None] * k_sh + d[None, :] * k_sd
        x1 = tl.load(xs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xs + HALF * k_sd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        os_ = ko_ptr + b * ko_sb + t * ko_st + h[:, None] * ko_sh + d[None, :] * ko_sd
        tl.store(os_, o1.to(ko_ptr.dtype.element_ty), mask=mask)
        tl.store(os_ + HALF * ko_sd, o2.to(ko_ptr.dtype.element_ty), mask=mask)

    return rope_rotate


def _like_projection(x: Any) -> Any:
    """An empty ``[B, H, T, D]`` laid out ``[B, T, H, D]`` in memory.

    That is the layout the eager expression gives for q/k viewed out of the projection's
    ``[B, T, H*D]`` output, and the one attention reads (and its gradient arrives in) cheapest.
    """
    import torch

    bsz, heads, seq, dim = x.shape
    return torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device).transpose(1, 2)


def _rotate(q: Any, k: Any, cos: Any, sin: Any, backward: bool) -> tuple[Any, Any]:
    """``q`` and ``k`` rotated by ``cos``/``sin`` (or back, for gradients) into fresh tensors."""
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    q_out, k_out = _like_projection(q), _like_projection(k)
    if bsz and seq and dim:
        # A batch of one row of angles serves every row of q/k: stride 0 over the batch.
        c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
        s_sb = 0 if sin.shape[0] == 1 else sin.stride(0)
        block_d = _next_pow2(dim // 2)
        block_hq, block_hk = _next_pow2(n_q), _next_pow2(max(n_k, 1))
        _rope_kernel()[(seq, bsz)](
            q, k, q_out, k_out, cos, sin, *q.stride(), *k.stride(), *q_out.stride(),
            *k_out.stride(), c_sb, cos.stride(1), cos.stride(2), s_sb, sin.stride(1),
            sin.stride(2), n_q, n_k, HALF=dim // 2, BLOCK_D=block_d, BLOCK_HQ=block_hq,
            BLOCK_HK=block_hk, BACKWARD=backward, num_warps=_warps(2 * block_hq * block_d),
        )  # fmt: skip
    return q_out, k_out


@functools.cache
def _rope_function() -> Any:
    import torch

    class _Rope(torch.autograd.Function):
        """HF's rotary embedding of q and k; the backward rotates the gradients back."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
            ctx.save_for_backward(cos, sin)
            return _rotate(q, k, cos, sin, False)

        @staticmethod
        def backward(ctx: Any, grad_q: Any, grad_k: Any) -> Any:
            cos, sin = ctx.saved_tensors
            # Both in one launch even if only one is needed: it is the launch that costs.
            dq, dk = _rotate(grad_q, grad_k, cos, sin, True)
            return dq, dk, None, None

    return _Rope


def rope(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """HF's rotary embedding ``x * cos + rotate_half(x) * sin`` of ``q`` and ``k``, in fp32.

    Args:
        q: ``[B, Hq, T, D]``, any strides (usually a transposed view of ``[B, T, Hq, D]``).
        k: ``[B, Hk, T, D]``, ``Hk`` may be smaller than ``Hq`` (grouped-query attention).
        cos: ``[B or 1, T, D]``.
        sin: like ``cos``.

    Returns:
        The rotated ``(q, k)``, fresh tensors in the inputs' shapes and dtypes. Gradients flow to
        ``q`` and ``k`` only (cos and sin are constants of the positions).

    Raises:
        ValueError: if cos/sin are not ``[B or 1, T, D]`` or ``D`` is odd.
    """
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] % 2:
        raise ValueError(f"cos/sin must be [B or 1, T, even D], got {tuple(cos.shape)}")
    out: tuple[Any, Any] = _rope_function().apply(q, k, cos, sin)
    return out


# ---------------------------------------------------------------------------------- SiLU gate

_SILU_BLOCK = 1024  # values of one row a program handles: 8 a thread with 4 warps


@functools.cache
def _silu_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def silu_mul_fwd(  # type: ignore[no-untyped-def]
        g_ptr, u_ptr, out_ptr, g_stride, u_stride, o_stride, n_cols, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * o_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit  # type: ignore[untyped-decorator]
    def silu_mul_bwd(  # type: ignore[no-untyped-def]
        g_ptr, u_ptr, grad_ptr, dg_ptr, du_ptr,
        g_stride, u_stride, grad_stride, dg_stride, du_stride, n_cols, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + row * grad_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        d_gate = dy * u * sig * (1 + g * (1 - sig))
        d_up = dy * g * sig
        tl.store(dg_ptr + row * dg_stride + cols, d_gate.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * du_stride + cols, d_up.to(du_ptr.dtype.element_ty), mask=mask)

    return silu_mul_fwd, silu_mul_bwd


def _silu_fwd(gate: Any, up: Any, out: Any) -> None:
    """``out = silu(gate) * up`` over ``[rows, I]`` views with unit column stride."""
    rows, cols = out.shape
    if rows and cols:
        grid = (rows, -(-cols // _SILU_BLOCK))
        _silu_kernels()[0][grid](
            gate, up, out, gate.stride(0), up.stride(0), out.stride(0), cols, BLOCK=_SILU_BLOCK
        )


def _silu_bwd(gate: Any, up: Any, grad: Any, d_gate: Any, d_up: Any) -> None:
    """``d_gate, d_up`` of ``silu(gate) * up`` for ``grad``, over ``[rows, I]`` views."""
    rows, cols = grad.shape
    if rows and cols:
        grid = (rows, -(-cols // _SILU_BLOCK))
        _silu_kernels()[1][grid](
            gate, up, grad, d_gate, d_up, gate.stride(0), up.stride(0), grad.stride(0),
            d_gate.stride(0), d_up.stride(0), cols, BLOCK=_SILU_BLOCK,
        )  # fmt: skip


def _silu_mul_cat_forward(gate_up: Any) -> Any:
    import torch

    gu = _rows(gate_up)
    half = gu.shape[-1] // 2
    out = torch.empty((gu.shape[0], half), dtype=gu.dtype, device=gu.device)
    _silu_fwd(gu[:, :half], gu[:, half:], out)
    return out.view(*gate_up.shape[:-1], half)


@functools.cache
def _silu_mul_cat_function() -> Any:
    import torch

    class _SiluMulCat(torch.autograd.Function):
        """:func:`silu_mul_cat` with a gradient, for a caller outside ``no_grad``."""

        @staticmethod
        def forward(ctx: Any, gate_up: Any) -> Any:
            ctx.save_for_backward(gate_up)
            return _silu_mul_cat_forward(gate_up)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (gate_up,) = ctx.saved_tensors
            return silu_mul_cat_backward(gate_up, grad)

    return _SiluMulCat


def silu_mul_cat(gate_up: Any) -> Any:
    """``silu(gate) * up`` from the stacked ``[..., 2I]`` ``[gate | up]``, computed in fp32.

    Meant for a caller under ``no_grad`` (the MLP's own autograd function, whose backward calls
    :func:`silu_mul_cat_backward`); with grad enabled it still records a correct gradient.

    Args:
        gate_up: ``[..., 2I]``, gate in the first half, up in the second.

    Returns:
        ``[..., I]`` in ``gate_up``'s dtype.
    """
    import torch

    if gate_up.requires_grad and torch.is_grad_enabled():
        out: Any = _silu_mul_cat_function().apply(gate_up)
        return out
    return _silu_mul_cat_forward(gate_up)


def silu_mul_cat_backward(gate_up: Any, grad: Any) -> Any:
    """Gradient of :func:`silu_mul_cat` w.r.t. its stacked input, computed in fp32.

    Args:
        gate_up: the ``[..., 2I]`` input of the forward.
        grad: ``[..., I]`` gradient of its output.

    Returns:
        ``[..., 2I]``: ``(d_gate, d_up)`` stacked, in ``gate_up``'s dtype.
    """
    import torch

    gu = _rows(gate_up)
    half = gu.shape[-1] // 2
    out = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
    _silu_bwd(gu[:, :half], gu[:, half:], _rows(grad), out[:, :half], out[:, half:])
    return out.view(gate_up.shape)


@functools.cache
def _silu_mul_function() -> Any:
    import torch

    class _SiluMul(torch.autograd.Function):
        """``silu(gate) * up`` of two same-shape tensors, recomputing ``silu`` in the backward."""

        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            g2, u2 = _rows(gate), _rows(up)
            dtype = (
                gate.dtype if gate.dtype == up.dtype else torch.promote_types(gate.dtype, up.dtype)
            )
            out = torch.empty(g2.shape, dtype=dtype, device=gate.device)
            _silu_fwd(g2, u2, out)
            ctx.save_for_backward(g2, u2)
            ctx.shape = gate.shape
            return out.view(gate.shape)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            g2, u2 = ctx.saved_tensors
            d_gate = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
            d_up = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
            _silu_bwd(g2, u2, _rows(grad), d_gate, d_up)
            return d_gate.view(ctx.shape), d_up.view(ctx.shape)

    return _SiluMul


def silu_mul(gate: Any, up: Any) -> Any:
    """``silu(gate) * up`` with its gradient, computed in fp32 (an unfused MLP's activation).

    Args:
        gate: ``[..., I]`` gate projection output.
        up: ``[..., I]`` up projection output; shapes that differ from ``gate``'s (broadcasting)
            take the eager torch expression.

    Returns:
        ``[..., I]`` in the dtype ``gate`` and ``up`` promote to.
    """
    if gate.shape != up.shape:
        import torch

        return torch.nn.functional.silu(gate) * up
    out: Any = _silu_mul_function().apply(gate, up)
    return out
