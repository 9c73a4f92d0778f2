"""Recompute policy: which decoder layers recompute in backward, and offloading their inputs to
pinned host memory on a side stream (lean mode)."""

from __future__ import annotations

import functools
from typing import Any


def _set_checkpointing(
    layers: list[Any], every: int, offload: bool, count: int | None = None
) -> int:
    """Turn recompute on for every ``every``-th layer, or for exactly ``count`` layers."""
    import torch.utils.checkpoint as tuc

    ckpt_fn = (
        _offloaded_checkpoint if offload else functools.partial(tuc.checkpoint, use_reentrant=False)
    )
    n, on_count = len(layers), 0
    for i, layer in enumerate(layers):
        if count is not None:  # exactly `count` layers, spread evenly over the stack
            on = (i + 1) * count // n > i * count // n
        else:
            on = every > 0 and (i % every == every - 1 or every == 1)
        layer.gradient_checkpointing = on
        if on:
            layer._gradient_checkpointing_func = ckpt_fn
            on_count += 1
    return on_count


def _offloaded_checkpoint(fn: Any, hidden: Any, *args: Any) -> Any:
    """Checkpoint one layer, keeping its input in pinned host memory until the backward pass."""
    if args:
        raise ValueError("offloaded checkpointing takes the hidden states as the only positional")
    if not hidden.requires_grad:  # the first layer's input: its LoRA still needs a backward
        hidden = hidden.detach().requires_grad_(True)
    return _offload_function().apply(fn, hidden)


class _Offload:
    """One offloaded layer input: copied out on a side stream, copied back ahead of its use.

    Copies run on a dedicated stream so they overlap compute (on the compute stream they cost
    a serial ~1.3 ms per 64 MiB each way). The backward of layer ``i`` starts the copy back of
    layer ``i - 1``'s input, so it has arrived when the recompute of ``i - 1`` begins.
    """

    last: _Offload | None = None  # the most recent forward's record, to chain the next one

    def __init__(self, hidden: Any) -> None:
        import torch

        self.device, self.used = hidden.device, False
        self.host: Any = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        self.back: Any = None
        self.ready: Any = None
        prev = _Offload.last
        self.prev = prev if prev is not None and not prev.used else None
        _Offload.last = self
        if not hidden.is_cuda:
            self.host.copy_(hidden)
            return
        stream = _copy_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(stream):
            self.host.copy_(hidden, non_blocking=True)
        hidden.record_stream(stream)  # not reused before the copy has read it

    def prefetch(self) -> None:
        import torch

        if self.back is not None or self.host is None or self.device.type != "cuda":
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = stream.record_event()

    def take(self) -> Any:
        """The input back on the device, ready for use on the current stream."""
        import torch

        self.used = True
        if self.device.type != "cuda":
            return self.host.to(self.device)
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        out: Any = self.back
        out.record_stream(current)
        self.back = self.host = None
        return out


@functools.cache
def _copy_stream(device: Any) -> Any:
    import torch

    return torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]


@functools.cache
def _offload_function() -> Any:
    import torch

    class _OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, fn: Any, hidden: Any) -> Any:
            ctx.fn, ctx.saved = fn, _Offload(hidden)
            with torch.no_grad():
                return fn(hidden)

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            record = ctx.saved
            hidden = record.take().detach().requires_grad_(True)
            if record.prev is not None:  # the next layer to recompute: start its copy now
                record.prev.prefetch()
            with torch.enable_grad():
                out = ctx.fn(hidden)
            torch.autograd.backward(out, grad_out)
            ctx.saved = None
            return None, hidden.grad

    return _OffloadedCheckpoint
