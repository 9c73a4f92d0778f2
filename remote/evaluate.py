"""Did it help? Base against tuned on the same instance, before teardown.

Run by a recipe right after training, on the model it trained (no second load)::

    held-out loss   the eval split through the Trainer's own evaluation, twice: with the
                    adapters disabled (the base) and enabled (the tuned model)
    samples         the first ``samples`` eval rows' prompts (the tokens before the first
                    trained token) answered by both, greedy, same limit, stopped at EOS
    tasks           optional lm-eval benchmark tasks on both, ``limit`` examples each
    verdict         ``passed`` against ``min_loss_drop`` (None when no threshold was set);
                    a failing verdict marks the result, the adapter still comes back

The result is one JSON-ready dict, stored under ``metrics["evaluation"]`` (so it is pulled and
verified with the adapter, and kept in the ledger). Standard library at import; torch and
friends inside the functions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .protocol import EvaluationSpec, JobSpecData

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = ["run", "verdict", "wanted"]

# ChatML's end of turn (the default template's): an answer ends there, whatever the eos is.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def wanted(spec: JobSpecData, eval_rows: int) -> bool:
    """Whether this job evaluates: ``enabled`` true, or ``"auto"`` with held-out rows."""
    enabled = spec.evaluation.enabled
    return eval_rows > 0 and (enabled is True or enabled == "auto")


def run(
    spec: JobSpecData,
    model: Any,
    tokenizer: Any,
    trainer: Any,
    eval_rows: list[dict[str, list[int]]],
    reporter: Reporter,
    *,
    tuned_loss: float | None = None,
) -> dict[str, Any]:
    """Evaluate base and tuned; returns the ``metrics["evaluation"]`` dict.

    Args:
        spec: the job (its ``evaluation`` section).
        model: the trained PEFT model (adapters enabled on return).
        tokenizer: its tokenizer.
        trainer: the Trainer, whose evaluation loop computes the held-out loss.
        eval_rows: the encoded eval rows (``input_ids`` and ``labels``).
        reporter: for the ``evaluating`` phase and events.
        tuned_loss: the tuned eval loss when the recipe already computed it.
    """
    cfg = spec.evaluation
    t0 = time.time()
    reporter.update(phase="evaluating")
    reporter.event("evaluating", rows=len(eval_rows), samples=min(cfg.samples, len(eval_rows)))
    if tuned_loss is None:
        tuned_loss = float(trainer.evaluate()["eval_loss"])
    with _adapters_off(model):
        base_loss = float(trainer.evaluate()["eval_loss"])
    out: dict[str, Any] = {
        "rows": len(eval_rows),
        "base_eval_loss": base_loss,
        "tuned_eval_loss": tuned_loss,
        "loss_drop": base_loss - tuned_loss,
        "min_loss_drop": cfg.min_loss_drop,
    }
    t_gen = time.time()
    out["samples"] = samples(model, tokenizer, eval_rows[: cfg.samples], cfg.max_new_tokens)
    out["samples_s"] = round(time.time() - t_gen, 3)
    if cfg.tasks:
        out["tasks"] = tasks(model, tokenizer, cfg)
    out["passed"], out["verdict"] = verdict(cfg, base_loss, tuned_loss)
    out["seconds"] = round(time.time() - t0, 3)
    reporter.event(
        "evaluated",
        base_eval_loss=round(base_loss, 4),
        tuned_eval_loss=round(tuned_loss, 4),
        passed=out["passed"],
        verdict=out["verdict"],
        seconds=out["seconds"],
    )
    return out


def verdict(cfg: EvaluationSpec, base: float, tuned: float) -> tuple[bool | None, str]:
    """``(passed, why)``: None without a threshold; the threshold compares the loss drop."""
    drop = base - tuned
    said = f"eval loss {base:.4f} -> {tuned:.4f} ({-drop:+.4f})"
    if cfg.min_loss_drop is None:
        return None, f"{said}; no threshold set"
    ok = drop >= cfg.min_loss_drop
    need = f"needs a drop of at least {cfg.min_loss_drop:g}"
    return ok, f"{said}; {need}: {'passed' if ok else 'NOT PASSING'}"


@contextlib.contextmanager
def _adapters_off(model: Any) -> Iterator[None]:
    """The base model: PEFT's ``disable_adapter`` (honoured by the CUDA fast path too)."""
    with model.disable_adapter():
        yield


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode through the stock attention (SDPA; eager for soft-capped attention, which
    SDPA drops), restored after: the padding-free training attention is for packed rows, and
    generation and lm-eval feed ordinary ones."""
    from .attention import stock_implementation

    config = model.get_base_model().config
    attn = getattr(config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    try:
        if attn is not None:
            config._attn_implementation = stock_implementation(config)
        yield
    finally:
        if attn is not None:
            config._attn_implementation = attn
        model.train(was_training)


def _prompt(row: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """The prompt (tokens before the first trained one) and the reference answer's tokens."""
    labels = row["labels"]
    first = next((i for i, v in enumerate(labels) if v != -100), len(labels))
    answer = [t for t, v in zip(row["input_ids"], labels, strict=False) if v != -100]
    return row["input_ids"][:first], answer


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id an answer may stop at: the eos, the generation config's, the end of turn."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab]
    return sorted(set(ids))


def samples(
    model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], max_new_tokens: int
) -> list[dict[str, Any]]:
    """Base and tuned answers to each row's prompt: greedy, EOS-stopped, token-limited."""
    import torch

    if not rows:
        return []
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    device = next(p.device for p in model.parameters())
    out = []
    with _inference(model):
        for row in rows:
            prompt, answer = _prompt(row)
            ids = torch.tensor([prompt], device=device)

            def generate(ids: Any = ids) -> tuple[str, int, bool]:
                with torch.no_grad():
                    gen = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=eos or None,
                        pad_token_id=pad,
                        use_cache=True,
                    )
                new = gen[0, ids.shape[1] :].tolist()
                stopped = bool(new) and new[-1] in eos
                text = tokenizer.decode(new, skip_special_tokens=True).strip()
                return text, len(new), stopped

            tuned, tuned_n, tuned_stop = generate()
            with _adapters_off(model):
                base, base_n, base_stop = generate()
            out.append(
                {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "reference": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "base": base,
                    "tuned": tuned,
                    "base_tokens": base_n,
                    "tuned_tokens": tuned_n,
                    "base_stopped": base_stop,
                    "tuned_stopped": tuned_stop,
                }
            )
    return out


def tasks(model: Any, tokenizer: Any, cfg: EvaluationSpec) -> dict[str, Any]:
    """lm-eval's tasks on base and tuned, ``limit`` examples each: ``{task: {metric: {base,
    tuned}}}``, or ``{"error": why}`` when lm-eval cannot run them (the rest of the evaluation
    and the adapter are kept)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {"error": "lm-eval is not installed on the instance: pip install lm-eval"}
    try:
        with _inference(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
            tuned = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), limit=cfg.limit)
            with _adapters_off(model):
                base = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), limit=cfg.limit)
    except Exception as exc:  # a task's data or a version mismatch: say so, keep the adapter
        return {"error": f"lm-eval failed: {type(exc).__name__}: {exc}"[:500]}
    return task_table(base["results"], tuned["results"])


def task_table(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """lm-eval ``results`` of base and tuned as ``{task: {metric: {"base", "tuned"}}}`` (the
    numeric metrics, stderr left out)."""
    table: dict[str, Any] = {}
    for task, metrics in tuned.items():
        for key, value in metrics.items():
            if "stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = key.split(",", 1)[0]
            before = base.get(task, {}).get(key)
            table.setdefault(task, {})[name] = {"base": before, "tuned": value}
    return table
