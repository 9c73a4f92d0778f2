"""Preference pairs: check a row, normalise it, and tokenise it into a chosen and a rejected
sequence that share one prompt.

A row is one of (the shapes TRL's preference trainers read):

=============================  ================================================================
explicit prompt, text          ``{"prompt": str, "chosen": str, "rejected": str}``
explicit prompt, conversation  ``{"prompt": [turns], "chosen": [assistant turn], "rejected": ...}``
implicit prompt                ``{"chosen": [turns], "rejected": [turns]}``: two whole
                               conversations that share every turn but the last (DPO Mix 7K,
                               UltraFeedback-binarized, whose extra ``prompt`` string is the
                               first user turn again and is ignored)
=============================  ================================================================

and is normalised to ``{"prompt", "chosen", "rejected"}``: three strings, or the shared turns
and the two final assistant turns as one-turn lists. The client checks every row with
:func:`check_pair` before anything is rented; the instance normalises hub rows with the same
function, so the rules cannot drift apart.

Standard library only: the tokenizer is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._data import IGNORE_INDEX, DataError

__all__ = [
    "PAIR_KEYS",
    "check_pair",
    "encode_pairs",
    "is_pair_row",
    "normalise_pair",
    "reference_mode",
]

PAIR_KEYS = ("prompt", "chosen", "rejected")
_ROLES = ("system", "user", "assistant")
_HINT = (
    "a preference row needs 'chosen' and 'rejected' (and 'prompt' unless both are conversations)"
)


def is_pair_row(row: Mapping[str, Any]) -> bool:
    """Whether a row looks like preference data (it has ``chosen`` or ``rejected``)."""
    return any(row.get(k) is not None for k in ("chosen", "rejected"))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _turns(value: Any, field: str) -> tuple[list[dict[str, str]] | None, list[str]]:
    """Check a list of ``{"role", "content"}`` turns; the turns, or the problems."""
    if not value:
        return None, [f"{field!r} is empty; give the answer's text or its turns"]
    problems: list[str] = []
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(turn, Mapping):
            problems.append(f"{at} is {_kind(turn)}; each turn is a {{'role', 'content'}} object")
            continue
        role, content = turn.get("role"), turn.get("content")
        if role not in _ROLES:
            problems.append(f"{at} has role {role!r}; use one of {', '.join(_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{at} 'content' must be non-empty text, got {_kind(content)}")
        if not problems:
            turns.append({"role": str(role), "content": str(content)})
    return (None, problems) if problems else (turns, [])


def _ends_with_answer(turns: list[dict[str, str]], field: str) -> list[str]:
    last = turns[-1]["role"]
    if last != "assistant":
        return [
            f"{field!r} ends with a {last} turn; a preference conversation must end with the "
            "assistant's answer (the turn that is preferred or not)"
        ]
    return []


def check_pair(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Check one preference row and normalise it.

    Returns:
        ``(normalised, [])`` or ``(None, problems)``, each problem saying what is wrong and how
        to fix it (the caller prefixes ``file:line``).
    """
    prompt, chosen, rejected = (row.get(k) for k in PAIR_KEYS)
    missing = [k for k, v in (("chosen", chosen), ("rejected", rejected)) if v is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return None, [f"{' and '.join(map(repr, missing))} {verb} missing; {_HINT}"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        problems = [
            f"{k!r} is empty; {_HINT}"
            for k, v in (("chosen", chosen), ("rejected", rejected))
            if not v.strip()
        ]
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(
                f"'prompt' must be non-empty text when chosen and rejected are text, got "
                f"{_kind(prompt)}; add the question both answers reply to"
            )
        if not problems and chosen == rejected:
            problems.append(_SAME)
        return (None, problems) if problems else ({"prompt": prompt, "chosen": chosen,
                                                   "rejected": rejected}, [])  # fmt: skip
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None, [
            f"'chosen' is {_kind(chosen)} and 'rejected' is {_kind(rejected)}; give both as "
            "text or both as lists of {'role', 'content'} turns"
        ]
    c_turns, problems = _turns(chosen, "chosen")
    r_turns, more = _turns(rejected, "rejected")
    problems += more
    if c_turns is None or r_turns is None:
        return None, problems
    problems = _ends_with_answer(c_turns, "chosen") + _ends_with_answer(r_turns, "rejected")
    if problems:
        return None, problems
    if isinstance(prompt, list):  # explicit prompt turns, answers as one assistant turn each
        p_turns, problems = _turns(prompt, "prompt")
        if p_turns is None:
            return None, problems
        if p_turns[-1]["role"] == "assistant":
            return None, ["'prompt' ends with an assistant turn; the prompt ends with the turn "
                          "the answers reply to (a user turn)"]  # fmt: skip
        shared, c_last, r_last = p_turns, c_turns, r_turns
    else:
        # Implicit prompt: whole conversations that differ only in their last turn.
        if len(c_turns) < 2 or len(r_turns) < 2:
            return None, [
                "'chosen' and 'rejected' are conversations without a prompt; give each the "
                "whole conversation (user turn, then the answer) or add 'prompt' turns"
            ]
        for i, (a, b) in enumerate(zip(c_turns[:-1], r_turns[:-1], strict=False)):
            if a != b:
                return None, [_prefix(i)]
        if len(c_turns) != len(r_turns):
            return None, [_prefix(min(len(c_turns), len(r_turns)) - 1)]
        shared, c_last, r_last = c_turns[:-1], c_turns[-1:], r_turns[-1:]
    if c_last == r_last:
        return None, [_SAME]
    return {"prompt": shared, "chosen": c_last, "rejected": r_last}, []


_SAME = (
    "'chosen' and 'rejected' are the same answer; the pair teaches nothing (drop the row or "
    "give the worse answer as 'rejected')"
)


def _prefix(turn: int) -> str:
    return (
        f"'chosen' and 'rejected' differ at turn {turn}, before their last turn; both must share "
        "the conversation up to the final assistant answer (only that answer may differ)"
    )


def normalise_pair(row: Mapping[str, Any]) -> dict[str, Any]:
    """A hub row, normalised as the client does for files.

    Raises:
        DataError: the row is not a usable pair (the message says why).
    """
    normalised, problems = check_pair(row)
    if normalised is None:
        raise DataError("; ".join(problems))
    return normalised


def _texts(row: Mapping[str, Any], tokenizer: Any) -> tuple[str, str, str, bool]:
    """``(prompt, chosen, rejected, add_special)``: the texts tokenised on their own."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        answers = [a if not eos or a.endswith(eos) else a + eos for a in (row["chosen"],
                                                                          row["rejected"])]  # fmt: skip
        return prompt, answers[0], answers[1], True
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for answer in (row["chosen"], row["rejected"]):
        full = tokenizer.apply_chat_template([*prompt, *answer], tokenize=False)
        if not full.startswith(head):
            raise DataError(
                "the chat template does not render the prompt as a prefix of the conversation, "
                "so the answer cannot be split off; use a prompt/chosen/rejected text row"
            )
        out.append(full[len(head) :])
    return head, out[0], out[1], False


def encode_pairs(
    rows: Any,
    tokenizer: Any,
    *,
    max_seq_len: int,
    max_prompt_len: int | None = None,
    source: str = "data",
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenise every pair: two rows per pair, chosen then rejected, each ``{"input_ids",
    "labels"}`` with the prompt off the loss.

    The prompt keeps its last ``max_prompt_len`` tokens (default half of ``max_seq_len``); each
    answer is cut so prompt + answer fits ``max_seq_len``. A pair whose answers are cut away,
    or come out identical, is dropped and counted.

    Returns:
        ``[chosen_0, rejected_0, chosen_1, ...]`` and stats: ``rows`` (pairs), ``tokens``,
        ``loss_tokens``, ``truncated``, ``dropped``.

    Raises:
        DataError: naming ``source`` and the row number, or when no pair is left.
    """
    keep_prompt = max_prompt_len or max(1, max_seq_len // 2)
    out: list[dict[str, list[int]]] = []
    stats = {"rows": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0, "dropped": 0}
    for n, row in enumerate(rows, start=1):
        try:
            norm = normalise_pair(row)  # idempotent: the client's rows pass unchanged
            prompt, chosen, rejected, special = _texts(norm, tokenizer)
        except (DataError, KeyError, TypeError) as exc:
            raise DataError(f"{source} row {n}: {exc}") from exc
        p_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        answers = [list(tokenizer(a, add_special_tokens=False)["input_ids"])
                   for a in (chosen, rejected)]  # fmt: skip
        cut = len(p_ids) > keep_prompt
        p_ids = p_ids[-keep_prompt:]
        room = max_seq_len - len(p_ids)
        cut |= any(len(a) > room for a in answers)
        answers = [a[:room] for a in answers]
        if room <= 0 or not all(answers) or answers[0] == answers[1]:
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut
        for a in answers:
            out.append({"input_ids": p_ids + a, "labels": [IGNORE_INDEX] * len(p_ids) + a})
            stats["tokens"] += len(p_ids) + len(a)
            stats["loss_tokens"] += len(a)
        stats["rows"] += 1
    if not out:
        raise DataError(
            f"{source}: no pair is left to train on (max_seq_len={max_seq_len} cuts every answer "
            "away, or the answers are identical once cut); raise train.max_seq_len"
        )
    return out, stats


def reference_mode(objective: Any, init_adapter: str | None) -> str | None:
    """DPO's reference as a job computes it: ``"live"`` or ``"precompute"`` (None: no
    reference, ORPO and SFT). ``objective`` is the client's ``ObjectiveConfig`` or the agent's
    ``ObjectiveSpec`` (both have ``type`` and ``reference``).

    ``auto`` is live from a fresh adapter (switching it off gives the base) and precompute from
    a starting adapter, whose reference is itself before training: computed once, with no
    second adapter to switch to.
    """
    if objective.type != "dpo":
        return None
    if objective.reference != "auto":
        return str(objective.reference)
    return "precompute" if init_adapter else "live"
