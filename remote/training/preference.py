"""What preference objectives add to the shared blocks: pairs as micro-batches, the sequences'
log-probabilities, DPO's and ORPO's losses, and the reference.

A pair is one packing unit of two rows, chosen then rejected (:mod:`..pairs`), so
:func:`..collate.collate` lays both out padding-free (or packed into one padded row) with their
own positions, and the fast path's attention, fused LoRA and recompute apply unchanged. What the
fast path does not do here is its fused cross-entropy: a preference loss needs each sequence's
log-probability, so the logits of the answer tokens are made in chunks of the same size (each
chunk recomputed in backward rather than kept), never for the prompt.

The reference (DPO) is the same weights with the adapter switched off (``live``: one more
forward per step, no gradients) or log-probabilities computed once before training
(``precompute``), which is also how a job started from an adapter gets its reference: the
starting adapter, before training moves it. No second copy of the model is loaded.

Losses follow the papers as TRL implements them (``trl.DPOTrainer``, ``trl.ORPOTrainer``):
DPO ``sigmoid`` (with cDPO label smoothing), ``ipo`` (on mean log-probabilities) and ``hinge``;
ORPO's NLL on chosen minus ``beta`` x log-sigmoid of the log odds ratio (mean log-probabilities).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..collate import collate
from ..protocol import ObjectiveSpec
from .hf import trainer_class as base_trainer_class

__all__ = [
    "METRICS",
    "pair_collate",
    "pair_loader",
    "precompute_reference",
    "preference_loss",
    "trainer_class",
]

Rows = list[dict[str, Any]]
# Reported per step (means over the step's pairs); "reward" is beta x the log-probability
# gained over the reference (DPO), or beta x the mean log-probability (ORPO), as in TRL.
METRICS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")
_KEYS = ("logp_index", "logp_target", "logp_sequence", "sequence_tokens", "num_sequences",
         "ref_logps")  # fmt: skip


def pair_collate(units: Sequence[Sequence[dict[str, Any]]], *, layout: str, pad_id: int) -> Any:
    """:func:`..collate.collate` of pairs, plus where each answer token's log-probability is read.

    Adds (host-side, so the step never waits to size anything): ``logp_index`` (positions in the
    flattened hidden states whose next token is an answer token), ``logp_target`` (that token),
    ``logp_sequence`` (which sequence: ``2 i`` chosen, ``2 i + 1`` rejected of pair ``i``),
    ``sequence_tokens`` (answer tokens per sequence), ``num_sequences`` and, when every row
    carries one, ``ref_logps`` (precomputed reference log-probabilities).
    """
    import torch

    batch = collate(units, layout=layout, pad_id=pad_id)
    labels = batch["labels"]
    width = labels.shape[1]
    sequence = torch.zeros_like(labels)
    # Lay the sequence index out exactly as collate laid out the tokens.
    k = 0
    offset = 0
    for b, unit in enumerate(units):
        if layout == "padded":
            offset = 0
        for row in unit:
            n = len(row["input_ids"])
            r = 0 if layout == "flat" else b
            sequence[r, offset : offset + n] = k
            offset += n
            k += 1
    following = labels[:, 1:]
    rows_, cols = (following != -100).nonzero(as_tuple=True)
    batch["logp_index"] = rows_ * width + cols
    batch["logp_target"] = following[rows_, cols]
    batch["logp_sequence"] = sequence[rows_, cols + 1]
    batch["sequence_tokens"] = torch.bincount(batch["logp_sequence"], minlength=k).float()
    batch["num_sequences"] = k
    flat = [row for unit in units for row in unit]
    if all("ref_logp" in row for row in flat):
        batch["ref_logps"] = torch.tensor([row["ref_logp"] for row in flat], dtype=torch.float32)
    return batch


def pair_loader(rows: Rows, plan: Any, *, seed: int, layout: str, pad_id: int,
                shuffle: bool = True) -> Any:  # fmt: skip
    """:func:`.data.loader` over pairs (``plan.units`` = ``[[2 i, 2 i + 1], ...]``)."""
    from .data import loader

    fn = functools.partial(pair_collate, layout=layout, pad_id=pad_id)
    return loader(rows, plan, seed=seed, layout=layout, pad_id=pad_id, shuffle=shuffle,
                  collate_fn=fn)  # fmt: skip


def _chunk_logps(hidden: Any, target: Any, head: Any, softcap: float) -> Any:
    logits = head(hidden).float()
    if softcap:  # Gemma-2's final logits
        logits = softcap * (logits / softcap).tanh()
    return logits.gather(-1, target[:, None]).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model: Any, inputs: dict[str, Any]) -> Any:
    """Summed log-probability of each sequence's answer tokens (``[num_sequences]``, fp32).

    Runs the decoder (with whatever the fast path patched into it) and the output head on the
    answer positions only, in chunks of about a GiB of fp32 logits, each recomputed in
    backward instead of kept.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from ..planning import default_loss_chunk

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, causal.base_model_prefix)
    model_inputs = {k: v for k, v in inputs.items() if k not in (*_KEYS, "labels")}
    model_inputs["use_cache"] = False
    hidden = decoder(**model_inputs).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs["logp_index"])
    target = inputs["logp_target"]
    head = causal.get_output_embeddings()
    softcap = float(getattr(causal.config, "final_logit_softcapping", None) or 0.0)
    chunk = default_loss_chunk(head.weight.shape[0])
    parts = []
    for start in range(0, flat.shape[0], chunk):
        h, y = flat[start : start + chunk], target[start : start + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, h, y, head, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, y, head, softcap))
    logps = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(inputs["num_sequences"], dtype=torch.float32, device=logps.device)
    return sums.index_add(0, inputs["logp_sequence"], logps)


def _log1mexp(x: Any) -> Any:
    """``log(1 - exp(x))`` for log-probabilities ``x < 0``, stable near 0."""
    import torch

    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def preference_loss(
    model: Any, inputs: dict[str, Any], objective: ObjectiveSpec
) -> tuple[Any, Any]:
    """The micro-batch's loss and its metrics (a detached ``[len(METRICS)]`` tensor).

    Raises:
        ValueError: an objective this module does not train.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own spelling

    beta = float(objective.beta)
    ref: Any = inputs.get("ref_logps")
    if objective.type == "dpo" and ref is None:
        # Live: the same weights with the adapter switched off. First, as TRL does, so its
        # transient activations are gone before the policy's are kept for backward: the
        # step's peak is the SFT plan's.
        with torch.no_grad(), model.disable_adapter():
            ref = sequence_logps(model, inputs)
    policy = sequence_logps(model, inputs)
    counts = inputs["sequence_tokens"].to(policy.device).clamp(min=1)
    chosen, rejected = policy[0::2], policy[1::2]
    extra = []
    if objective.type == "dpo":
        ref = ref.to(policy.device)
        if objective.loss_type == "ipo":  # IPO is defined on mean log-probabilities
            policy, ref = policy / counts, ref / counts
            chosen, rejected = policy[0::2], policy[1::2]
        chosen_gain, rejected_gain = chosen - ref[0::2], rejected - ref[1::2]
        diff = chosen_gain - rejected_gain
        if objective.loss_type == "sigmoid":
            smooth = float(objective.label_smoothing)
            losses = -(1 - smooth) * F.logsigmoid(beta * diff) - smooth * F.logsigmoid(-beta * diff)
        elif objective.loss_type == "ipo":
            losses = (diff - 1 / (2 * beta)) ** 2
        elif objective.loss_type == "hinge":
            losses = torch.relu(1 - beta * diff)
        else:
            raise ValueError(f"objective.loss_type={objective.loss_type!r}")
        loss = losses.mean()
        chosen_r, rejected_r = beta * chosen_gain.detach(), beta * rejected_gain.detach()
    elif objective.type == "orpo":
        mean_c, mean_r = chosen / counts[0::2], rejected / counts[1::2]
        log_odds = (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))
        nll = -chosen.sum() / counts[0::2].sum()  # SFT's loss on the chosen answers
        loss = nll - beta * F.logsigmoid(log_odds).mean()
        chosen_r, rejected_r = beta * mean_c.detach(), beta * mean_r.detach()
        extra = [nll.detach(), log_odds.detach().mean()]
    else:
        raise ValueError(f"no preference loss for objective {objective.type!r}")
    metrics = torch.stack([
        (chosen_r - rejected_r).mean(), (chosen_r > rejected_r).float().mean(),
        chosen_r.mean(), rejected_r.mean(), *extra,
    ])  # fmt: skip
    return loss, metrics


def metric_names(objective: ObjectiveSpec) -> tuple[str, ...]:
    """Names of :func:`preference_loss`'s metrics, in order."""
    return (*METRICS, "nll_loss", "log_odds_ratio") if objective.type == "orpo" else METRICS


def precompute_reference(model: Any, rows: Rows, plan: Any, *, layout: str, pad_id: int) -> None:
    """Write each row's reference log-probability (``ref_logp``): the model as it is now (the
    base, or the starting adapter), one pass without gradients, before training moves it.

    Done before a resumed run loads its checkpoint too, so the reference never drifts.
    """
    import torch

    device = next(model.parameters()).device
    units = plan.units
    step = max(1, plan.micro_batch)
    with torch.no_grad():
        for start in range(0, len(units), step):
            part = [[rows[j] for j in unit] for unit in units[start : start + step]]
            batch = pair_collate(part, layout=layout, pad_id=pad_id)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            logps = sequence_logps(model, batch).tolist()
            flat = [j for unit in units[start : start + step] for j in unit]
            for j, value in zip(flat, logps, strict=True):
                rows[j]["ref_logp"] = value


def trainer_class(objective: ObjectiveSpec) -> Any:
    """:func:`.hf.trainer_class`'s Trainer with the preference loss; each step's metrics are
    kept on the device (``step_metrics``) for the progress thread to copy."""
    import torch

    names = metric_names(objective)

    class PreferenceTrainer(base_trainer_class()):  # type: ignore[misc]
        metric_names = names

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The loss is a mean over pairs: Trainer divides it by the accumulation steps.
            self.model_accepts_loss_kwargs = False
            self.step_metrics: dict[str, Any] | None = None

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:  # fmt: skip
            loss, metrics = preference_loss(model, inputs, objective)
            if model.training:
                share = metrics / self.args.gradient_accumulation_steps
                old = self.step_metrics
                total = share if old is None else torch.stack(list(old.values())) + share
                self.step_metrics = dict(zip(names, total, strict=True))
            return (loss, {}) if return_outputs else loss

    return PreferenceTrainer
