"""Fused LoRA linears: one autograd function per projection, or per group of projections that
read the same input (q/k/v, gate/up) computed as one wide GEMM, over NF4 weights dequantised in
one Triton launch (:mod:`loraburst.remote.kernels`) or cached in bf16.
"""

from __future__ import annotations

import functools
from typing import Any


def _dequantize(base: Any) -> Any:
    """The bf16 weight that bitsandbytes computes with (or a plain linear's weight)."""
    cached = getattr(base, "_fastpath_weight", None)
    if cached is not None:
        return cached
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    nf4 = _nf4(base)
    if nf4 is not None:
        return nf4.dequantize()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)


def _nf4(base: Any) -> Any:
    """Our one-launch Triton dequantiser for ``base`` (CUDA NF4 only), or None."""
    handle = getattr(base, "_fastpath_nf4", None)
    if handle is not None:
        return handle or None
    handle = False
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if weight.is_cuda and quant_state is not None and quant_state.quant_type == "nf4":
        try:
            from .. import kernels

            handle = kernels.Nf4Weight(weight.data, quant_state)
        except ImportError:  # no Triton: bitsandbytes' own path
            handle = False
    base._fastpath_nf4 = handle
    return handle or None


class _Group:
    """Projections that read the same input (q/k/v, gate/up), computed as one wide GEMM.

    ``bases`` are the frozen layers, ``lora`` the peft LoRA layers around them (one active plain
    adapter each). The concatenated weight is cached here when the layer's cache is on;
    otherwise it is dequantised on every pass straight into one buffer.
    """

    _stack: Any = None  # (key, stacked A, block-diagonal B): :func:`_stack_lora`'s

    def __init__(self, lora: list[Any]) -> None:
        self.lora = lora
        self.bases = [m.base_layer for m in lora]
        self.names = [m.active_adapters[0] for m in lora]
        self.sizes = [b.out_features if hasattr(b, "out_features") else b.weight.shape[0]
                      for b in self.bases]  # fmt: skip
        self.scalings = [float(m.scaling[n]) for m, n in zip(lora, self.names, strict=True)]
        self.cached: Any = None
        biases = [getattr(b, "bias", None) for b in self.bases]
        self.has_bias = any(bias is not None for bias in biases)

    def params(self) -> list[Any]:
        out = []
        for m, n in zip(self.lora, self.names, strict=True):
            out += [m.lora_A[n].weight, m.lora_B[n].weight]
        return out

    def bias(self, dtype: Any) -> Any:
        import torch

        parts = []
        for b, size in zip(self.bases, self.sizes, strict=True):
            bias = getattr(b, "bias", None)
            ref = self.bases[0].weight
            parts.append(bias.to(dtype) if bias is not None
                         else torch.zeros(size, dtype=dtype, device=ref.device))  # fmt: skip
        return torch.cat(parts)

    def weight(self) -> Any:
        if self.cached is not None:
            return self.cached
        if len(self.bases) == 1:
            return _dequantize(self.bases[0])
        import torch

        handles: list[Any] = [
            _nf4(b) if getattr(b, "_fastpath_weight", None) is None else None for b in self.bases
        ]
        if all(h is not None for h in handles):
            first = handles[0]
            out = torch.empty((sum(self.sizes), first.shape[1]), dtype=first.dtype,
                              device=first.packed.device)  # fmt: skip
            row = 0
            for h, size in zip(handles, self.sizes, strict=True):
                h.dequantize(out=out[row : row + size])
                row += size
            return out
        return torch.cat([_dequantize(b) for b in self.bases])


def _group_forward(group: _Group, x2: Any, params: Any) -> tuple[Any, Any]:
    """``(x W^T + b + (x A^T) B_s^T, x A^T)`` for a ``[T, in]`` input."""
    weight = group.weight()
    dt = weight.dtype
    x2 = x2.to(dt)
    a_cat, b_bd = _stack_lora(group, params, dt)
    xa = x2 @ a_cat.t()
    bias = group.bias(dt) if group.has_bias else None
    return lora_product(x2, weight, bias, xa, b_bd), xa


def lora_product(x: Any, weight: Any, bias: Any, xa: Any, b_bd: Any) -> Any:
    """``x W^T + b + xa B^T``: a group's frozen product plus its LoRA term (``xa = x A^T``)."""
    import torch

    base = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return torch.addmm(base, xa, b_bd.t())


def _group_backward(
    group: _Group, x2: Any, xa: Any, g2: Any, params: Any, need_x: bool
) -> tuple[Any, list[Any]]:
    """The input gradient (or None) and the LoRA parameters' gradients, in ``params`` order."""
    import torch

    dt = x2.dtype
    g2 = g2.to(dt)
    a_cat, b_bd = _stack_lora(group, params, dt)
    gb = g2 @ b_bd  # [T, n r], scalings included
    grad_x = torch.addmm(g2 @ group.weight(), gb, a_cat) if need_x else None
    grad_a = gb.t() @ x2  # [n r, in]
    grad_b = g2.t() @ xa  # [N, n r]: only the diagonal blocks are B's gradients
    grads = _split_grads(group, params, grad_a, grad_b)
    return grad_x, grads


def _split_grads(group: _Group, params: Any, grad_a: Any, grad_b: Any) -> list[Any]:
    """Per-parameter gradients, in ``params`` order, from the stacked A gradient ``[n r, in]``
    and the block-diagonal B gradient ``[N, n r]`` (each B block scaled by its LoRA scaling).

    One cast for all of a group's A's (row slices of one tensor stay contiguous) and one kernel
    per B (scaled and cast at once): this runs for 7 projections of every layer in every
    backward, and a 4K-token step on the H200 was short of host time, not GPU time.
    """
    import torch

    a_dtype = params[0].dtype
    grad_a = grad_a.to(a_dtype)
    grads: list[Any] = []
    row = col = 0
    for i, size in enumerate(group.sizes):
        a, b = params[2 * i], params[2 * i + 1]
        r = a.shape[0]
        grads.append(
            grad_a[col : col + r] if a.dtype == a_dtype else grad_a[col : col + r].to(a.dtype)
        )
        grad = torch.empty((size, r), dtype=b.dtype, device=grad_b.device)
        torch.mul(grad_b[row : row + size, col : col + r], group.scalings[i], out=grad)
        grads.append(grad)
        row, col = row + size, col + r
    return grads


def _make_lora_function() -> Any:
    import torch

    class _LoraGroup(torch.autograd.Function):
        """``y = x W^T + b + (x A^T) B_s^T`` for a group of projections sharing ``x``.

        ``W`` is the group's frozen weights stacked by rows, ``A`` the LoRA A's stacked by rows
        and ``B_s`` the block-diagonal of the scaled LoRA B's, so the whole group is one wide
        GEMM plus two rank-``n r`` ones. Saves ``x`` and the rank-``n r`` ``x A^T`` only, and
        not even ``x`` when ``x`` says how to remake it (:func:`recompute_source`).
        """

        @staticmethod
        def forward(ctx: Any, x: Any, group: _Group, *params: Any) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            out, xa = _group_forward(group, x2, params)
            source = getattr(x, "_fastpath_source", None)
            if source is None:
                ctx.save_for_backward(xa, *params, x2.to(out.dtype))
            else:
                ctx.save_for_backward(xa, *params, *source[1])
            ctx.group, ctx.in_dtype, ctx.n_params = group, x.dtype, len(params)
            ctx.source = None if source is None else (source[0], source[2])
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            xa, *rest = ctx.saved_tensors
            params, kept = rest[: ctx.n_params], rest[ctx.n_params :]
            x2 = kept[0] if ctx.source is None else recompute_source(ctx.source, kept)
            x2 = x2.reshape(-1, x2.shape[-1]).to(xa.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x, grads = _group_backward(ctx.group, x2, xa, g2, params, ctx.needs_input_grad[0])
            if grad_x is not None:
                grad_x = grad_x.view(*grad_out.shape[:-1], x2.shape[-1]).to(ctx.in_dtype)
            return (grad_x, None, *grads)

    return _LoraGroup


def recompute_source(source: tuple[Any, Any], tensors: Any) -> Any:
    """Remake an input that was not kept: ``fn(*tensors, *extra)`` with autograd off.

    A producer marks its output ``t._fastpath_source = (fn, tensors, extra)`` when running
    ``fn`` again on the same inputs gives the same bits (the normed activations from the norm's
    input, which the norm keeps anyway): the fused linears then keep ``tensors`` instead of
    ``t`` and call this in their backward.
    """
    import torch

    fn, extra = source
    with torch.no_grad():
        return fn(*tensors, *extra)


def _make_act_lora_function() -> Any:
    import torch

    class _ActLoraGroup(torch.autograd.Function):
        """``act(z) W^T + ...`` (the MLP's down projection over ``silu(gate) * up``).

        Saves ``z`` (the stacked gate/up output, which the activation's backward needs anyway)
        instead of ``act(z)``: the product is recomputed in the backward pass, one cheap
        elementwise kernel, which saves ``intermediate_size`` values per token per layer.
        """

        @staticmethod
        def forward(ctx: Any, z: Any, group: _Group, act: Any, act_bwd: Any, *params: Any) -> Any:
            h = act(z)
            shape = h.shape
            out, xa = _group_forward(group, h.reshape(-1, shape[-1]), params)
            ctx.save_for_backward(z, xa, *params)
            ctx.group, ctx.act, ctx.act_bwd = group, act, act_bwd
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            z, xa, *params = ctx.saved_tensors
            h = ctx.act(z)
            x2 = h.reshape(-1, h.shape[-1]).to(xa.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            need = ctx.needs_input_grad[0]
            grad_h, grads = _group_backward(ctx.group, x2, xa, g2, params, need)
            grad_z = ctx.act_bwd(z, grad_h.view(h.shape).to(z.dtype)) if need else None
            return (grad_z, None, None, None, *grads)

    return _ActLoraGroup


# Bumped after every optimizer step (a global post-step hook, installed with the first stack)
# and by :func:`forget_stacks`: a fused optimizer updates parameters in place without moving
# their version counters (torch 2.13, ``AdamW(fused=True)``), so versions alone cannot say that
# the adapters changed.
_GENERATION = [0]
_HOOK: list[Any] = []


def forget_stacks() -> None:
    """Make every group rebuild its stacked adapters at its next pass (weights were loaded)."""
    _GENERATION[0] += 1


def _install_step_hook() -> None:
    if _HOOK:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _HOOK.append(register_optimizer_step_post_hook(lambda *_: forget_stacks()))


def _stack_lora(group: _Group, params: Any, dt: Any) -> tuple[Any, Any]:
    """The stacked A ``[n r, in]`` and block-diagonal scaled B ``[N, n r]`` in ``dt``.

    Kept on the group until the adapters change: they change only at the optimizer step, but
    this is asked for in every forward, recomputed forward and backward. Building it is ~30
    small kernels a layer (a cast per matrix, the scaling, the concatenations), which on the
    H200 left a 4K-token step waiting on the host. The key holds the optimizer-step generation
    (fused optimizers), each parameter's version counter (any other in-place update, a
    checkpoint's ``copy_``) and data pointer (a ``.data`` swap).
    """
    key = (dt, _GENERATION[0], *[(p.data_ptr(), p._version) for p in params])
    cached = group._stack
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    _install_step_hook()  # before the first stack is kept; a no-op after
    a_cat, b_bd = _build_stack(group, params, dt)
    group._stack = (key, a_cat, b_bd)
    return a_cat, b_bd


def _build_stack(group: _Group, params: Any, dt: Any) -> tuple[Any, Any]:
    import torch

    a_list = [params[2 * i].to(dt) for i in range(len(group.sizes))]
    b_list = [params[2 * i + 1].to(dt) * s for i, s in enumerate(group.scalings)]
    if len(a_list) == 1:
        return a_list[0], b_list[0]
    return torch.cat(a_list), torch.block_diag(*b_list)  # type: ignore[no-untyped-call]


@functools.cache
def _lora_function() -> Any:
    return _make_lora_function()


@functools.cache
def _act_lora_function() -> Any:
    return _make_act_lora_function()


def _group_apply(x: Any, group: _Group) -> Any:
    return _lora_function().apply(x, group, *group.params())


def lora_linear(x: Any, base: Any, lora_a: Any, lora_b: Any, scaling: float) -> Any:
    """``base(x) + scaling * x @ lora_a.T @ lora_b.T`` storing only ``x`` and ``x @ lora_a.T``.

    Args:
        x: input activations ``[..., in_features]``.
        base: the frozen base layer (a bitsandbytes ``Linear4bit`` or a plain ``nn.Linear``).
        lora_a: ``[r, in_features]`` parameter.
        lora_b: ``[out_features, r]`` parameter.
        scaling: LoRA's ``alpha / r``.
    """
    group = _Group.__new__(_Group)
    group.lora, group.bases, group.names = [], [base], ["default"]
    group.sizes, group.scalings, group.cached = [lora_b.shape[0]], [float(scaling)], None
    group.has_bias = getattr(base, "bias", None) is not None
    return _lora_function().apply(x, group, lora_a, lora_b)


def _fused_forward(module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Replacement ``forward`` for a peft LoRA layer with one plain adapter active."""
    if module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None:
        return module._fastpath_original_forward(x, *args, **kwargs)
    return _group_apply(x, module._fastpath_group)


def _fusable(module: Any) -> bool:
    import torch

    adapters = list(getattr(module, "active_adapters", []))
    if len(adapters) != 1 or adapters[0] not in getattr(module, "lora_A", {}):
        return False
    name = adapters[0]
    dropout = module.lora_dropout[name]
    no_dropout = isinstance(dropout, torch.nn.Identity) or getattr(dropout, "p", 1.0) == 0.0
    plain = name not in getattr(module, "lora_variant", {}) and not module.use_dora.get(name, False)
    return bool(no_dropout and plain and hasattr(module.base_layer, "weight"))
