"""The leanest setting's MLP: the whole gated MLP as one autograd function over token chunks.

In the offloaded setting every decoder layer is recomputed in its backward, and the step's peak
is one layer's MLP backward: the stacked gate/up output ``z`` and its gradient over every token
of the micro-batch (2 x intermediate_size values a token each; 0.9 GB at 8K tokens on an 8B).
:class:`chunked_mlp` saves only the MLP's input and, in its backward, walks the tokens in chunks:
each chunk's ``z`` is recomputed (the gate/up product), then its gradient is carried through the
down projection, the activation and gate/up at once, so only one chunk's ``z`` and gradients
exist at a time.

What it does not do, against running each chunk under ``torch.utils.checkpoint`` (the first
version): recompute the down projection, whose output the backward never needs, and dequantise
the layer's NF4 weights again for every chunk (once per pass here, for all chunks). The LoRA
gradients are summed over the chunks in fp32.
"""

from __future__ import annotations

import functools
from typing import Any

from .lora import _Group, _split_grads, _stack_lora, lora_product


def _make() -> Any:
    import torch

    class _ChunkedMlp(torch.autograd.Function):
        """``down(act(gate_up(x)))`` over ``chunk`` tokens at a time, saving only ``x``."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, gu: _Group, down: _Group, act: Any, act_bwd: Any, chunk: int,
            *params: Any,
        ) -> Any:  # fmt: skip
            n_gu = 2 * len(gu.sizes)
            gu_params, dn_params = params[:n_gu], params[n_gu:]
            shape = x.shape
            w_gu = gu.weight()  # dequantised once for every chunk
            dt = w_gu.dtype
            x2 = x.reshape(-1, shape[-1]).to(dt)
            gu_bias = gu.bias(dt) if gu.has_bias else None
            w_dn, dn_bias = down.weight(), down.bias(dt) if down.has_bias else None
            a_gu, bd_gu = _stack_lora(gu, gu_params, dt)
            a_dn, bd_dn = _stack_lora(down, dn_params, dt)
            out = torch.empty((x2.shape[0], sum(down.sizes)), dtype=dt, device=x2.device)
            for start in range(0, x2.shape[0], chunk):
                xc = x2[start : start + chunk]
                h = act(lora_product(xc, w_gu, gu_bias, xc @ a_gu.t(), bd_gu))
                out[start : start + chunk] = lora_product(h, w_dn, dn_bias, h @ a_dn.t(), bd_dn)
            ctx.save_for_backward(x2, *params)
            ctx.groups, ctx.acts, ctx.chunk, ctx.n_gu = (gu, down), (act, act_bwd), chunk, n_gu
            ctx.in_dtype = x.dtype
            return out.view(*shape[:-1], out.shape[-1]).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            x2, *params = ctx.saved_tensors
            gu, down = ctx.groups
            act, act_bwd = ctx.acts
            gu_params, dn_params = params[: ctx.n_gu], params[ctx.n_gu :]
            dt = x2.dtype
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            w_gu = gu.weight()
            gu_bias = gu.bias(dt) if gu.has_bias else None
            w_dn = down.weight()
            a_gu, bd_gu = _stack_lora(gu, gu_params, dt)
            a_dn, bd_dn = _stack_lora(down, dn_params, dt)
            need_x = ctx.needs_input_grad[0]
            grad_x = torch.empty_like(x2) if need_x else None
            f32 = torch.float32
            # Sums over the chunks, in fp32: down's A (needs each chunk's activation) and
            # gate/up's B (needs each chunk's z gradient). The others are one product at the
            # end over rank-r pieces kept per chunk.
            grad_a_dn = torch.zeros(a_dn.shape, dtype=f32, device=x2.device)
            grad_b_gu = torch.zeros(bd_gu.shape, dtype=f32, device=x2.device)
            gb_gu_parts, xa_dn_parts = [], []
            for start in range(0, x2.shape[0], ctx.chunk):
                stop = start + ctx.chunk
                xc, gc = x2[start:stop], g2[start:stop]
                xa_gu = xc @ a_gu.t()
                z = lora_product(xc, w_gu, gu_bias, xa_gu, bd_gu)
                h = act(z)
                xa_dn_parts.append(h @ a_dn.t())
                gb_dn = gc @ bd_dn
                grad_h = torch.addmm(gc @ w_dn, gb_dn, a_dn)
                grad_a_dn.add_(gb_dn.t() @ h)
                del h
                grad_z = act_bwd(z, grad_h)
                del z, grad_h
                gb_gu = grad_z @ bd_gu
                grad_b_gu.add_(grad_z.t() @ xa_gu)
                gb_gu_parts.append(gb_gu)
                if grad_x is not None:
                    torch.addmm(grad_z @ w_gu, gb_gu, a_gu, out=grad_x[start:stop])
                del grad_z
            grad_a_gu = torch.cat(gb_gu_parts).t() @ x2
            grad_b_dn = g2.t() @ torch.cat(xa_dn_parts)
            grads = _split_grads(gu, gu_params, grad_a_gu, grad_b_gu)
            grads += _split_grads(down, dn_params, grad_a_dn, grad_b_dn)
            if grad_x is not None:
                grad_x = grad_x.view(*grad_out.shape[:-1], x2.shape[-1]).to(ctx.in_dtype)
            return (grad_x, None, None, None, None, None, *grads)

    return _ChunkedMlp


@functools.cache
def _function() -> Any:
    return _make()


def chunked_mlp(module: Any, act: Any, act_bwd: Any, x: Any, chunk: int) -> Any:
    """The grouped MLP of ``module`` (``_fastpath_gu``, ``_fastpath_down``) over ``x``, in
    ``chunk``-token pieces, saving only ``x`` for its backward."""
    gu, down = module._fastpath_gu, module._fastpath_down
    return _function().apply(x, gu, down, act, act_bwd, chunk, *gu.params(), *down.params())
