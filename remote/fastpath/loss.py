"""Chunked linear cross-entropy: the training loss without materialising ``[tokens, vocab]``
logits, and the ``*ForCausalLM`` forward that uses it."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["linear_cross_entropy", "patched_causal_forward"]

# The default chunk (~1 GiB of fp32 logits): one rule for the loss and the memory plan.
from ..planning import default_loss_chunk


def _make_ce_function() -> Any:
    import torch

    class _LinearCrossEntropy(torch.autograd.Function):
        """Summed CE of ``hidden @ weight^T`` against ``labels``; gradients made in forward."""

        @staticmethod
        def forward(
            ctx: Any, hidden: Any, weight: Any, labels: Any, chunk: int, softcap: float = 0.0
        ) -> Any:
            n = hidden.shape[0]
            acc = torch.promote_types(hidden.dtype, torch.float32)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk]
                y = labels[start : start + chunk]
                logits = h @ weight.t()
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                capped = None
                if softcap:  # Gemma-2's final logits: softcap * tanh(z / softcap)
                    capped = logits.div_(softcap).tanh_()  # in place: kept for the backward
                    logits = capped * softcap
                valid = y != -100
                target = torch.where(valid, y, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d(sum CE)/d logits = softmax - onehot, zero on ignored rows, in place.
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
                probs.mul_(valid[:, None])
                if capped is not None:  # chain rule through the cap: d/dz = 1 - tanh^2
                    probs.mul_(capped.square_().neg_().add_(1))
                g = probs.to(hidden.dtype)
                # This chunk's fp32 [chunk, vocab] buffers go now, not when the next chunk's
                # logits replace them: held over, they stood beside those at the next peak.
                del logits, probs, capped
                if grad_h is not None:
                    grad_h[start : start + chunk] = g @ weight.to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ h).to(acc)
                del g
            ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
            ctx.has = (grad_h is not None, grad_w is not None)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            saved = list(ctx.saved_tensors)
            grad_h = grad_w = None
            if ctx.has[0]:
                stored = saved.pop(0)
                grad_h = stored * grad_total.to(stored.dtype)
            if ctx.has[1]:
                grad_w = (saved.pop(0) * grad_total).to(ctx.weight_dtype)
            return grad_h, grad_w, None, None, None

    return _LinearCrossEntropy


@functools.cache
def _ce_function() -> Any:
    return _make_ce_function()


def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    num_items: Any = None,
    chunk: int | None = None,
    softcap: float | None = None,
) -> Any:
    """Cross-entropy of ``hidden @ weight.T`` against next-token ``labels``, chunk by chunk.

    Same function as Hugging Face's causal-LM loss: labels are shifted left by one inside,
    ``-100`` is ignored, the result is the mean over counted tokens, or the sum over
    ``num_items`` when given (gradient accumulation).

    Args:
        hidden: final hidden states ``[batch, seq, hidden]``.
        weight: the output embedding ``[vocab, hidden]``.
        labels: ``[batch, seq]`` token ids (unshifted).
        num_items: token count to divide by instead of this batch's count.
        chunk: tokens per chunk; default keeps one chunk's fp32 logits near 1 GiB.
        softcap: final-logit soft-capping (Gemma-2's ``final_logit_softcapping``).
    """
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = shifted.reshape(-1).to(flat_h.device)
    if chunk is None:
        chunk = default_loss_chunk(weight.shape[0])
    fn = _ce_function()
    total = fn.apply(flat_h, weight, flat_y, chunk, float(softcap or 0.0))
    if num_items is None:
        num_items = (flat_y != -100).sum()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


def patched_causal_forward(model: Any, chunk: int | None) -> Any:
    """A ``forward`` for a ``*ForCausalLM`` that never builds the full logits when training.

    The chunk size is read from ``model._fastpath_loss_chunk`` on each call, so a memory plan
    applied later (:func:`apply_plan`) can change it.
    """
    original = model.forward
    model._fastpath_loss_chunk = chunk
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if labels is None or not model.training or args or kwargs.get("return_dict") is False:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        out = model.model(**kwargs)
        loss = linear_cross_entropy(
            out.last_hidden_state, model.lm_head.weight, labels, num_items=num_items,
            chunk=model._fastpath_loss_chunk, softcap=softcap,
        )  # fmt: skip
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states)

    return forward
