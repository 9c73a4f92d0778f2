"""Row formats: detect each row's format, check it, and normalise it to what the trainer reads.

=================  ==========================================  ======================
format             a row looks like                            normalised to
=================  ==========================================  ======================
messages           ``{"messages": [{"role", "content"}]}``     ``{"messages"}``
sharegpt           ``{"conversations": [{"from", "value"}]}``  ``{"messages"}``
alpaca             ``{"instruction", "input"?, "output"}``     ``{"messages"}``
prompt_completion  ``{"prompt", "completion"}``                ``{"prompt", "completion"}``
text               ``{"text"}``                                ``{"text"}``
=================  ==========================================  ======================

Conversations must be (system?) user, assistant, user, assistant, ... and end on an assistant
turn, because the trainer learns the assistant turns: a conversation without one, or ending on
a question, teaches nothing or teaches the model to stop mid-dialogue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .read import Located, Unreadable

__all__ = ["KIND_OF_FORMAT", "RowChecker", "check_rows", "detect_format"]

KIND_OF_FORMAT = {
    "messages": "messages",
    "sharegpt": "messages",
    "alpaca": "messages",
    "prompt_completion": "prompt_completion",
    "text": "text",
    "preference": "preference",  # objective dpo/orpo: pairs (preference.py)
}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# ShareGPT's own names first; some exports already use the OpenAI ones.
_SHAREGPT_ROLES = {**{"system": "system", "human": "user", "gpt": "assistant"}, **_ROLES}
_KNOWN = "'messages', 'conversations', 'instruction'+'output', 'prompt'+'completion' or 'text'"

_Checked = tuple[dict[str, Any] | None, list[str]]


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The format a row is written in, judged by its non-null keys; None when unknown."""
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _text_problem(value: Any, label: str, hint: str) -> str | None:
    if value is None:
        return f"{label} is missing; {hint}"
    if not isinstance(value, str):
        return f"{label} must be a string, got {_type(value)}; {hint}"
    if not value.strip():
        return f"{label} is empty; {hint}"
    return None


def _order_problems(roles: list[str], field: str) -> list[str]:
    problems: list[str] = []
    expected = "user"
    for i, role in enumerate(roles):
        if role == "system":
            if i:
                problems.append(
                    f"{field}[{i}] is a system turn; only the first turn may be system "
                    "(move it to the start or merge it into the first system turn)"
                )
                break
            continue
        if role != expected:
            problems.append(
                f"{field}[{i}] is {role!r} where {expected!r} was expected; after an optional "
                "system turn, turns must alternate user, assistant, user, ..."
            )
            break
        expected = "assistant" if role == "user" else "user"
    if "assistant" not in roles:
        problems.append(
            f"{field} has no assistant turn; add the answer to learn as a final assistant turn"
        )
    elif roles[-1] != "assistant":
        problems.append(
            f"{field} ends with a {roles[-1]} turn; the last turn must be assistant "
            "(drop the trailing turn or add its answer)"
        )
    return problems


def _check_turns(turns: Any, field: str, names: tuple[str, str], roles: dict[str, str]) -> _Checked:
    role_key, content_key = names
    shape = f"a list of {{{role_key!r}, {content_key!r}}} objects"
    if not isinstance(turns, list):
        return None, [f"{field!r} must be {shape}, got {_type(turns)}"]
    if not turns:
        return None, [f"{field!r} is empty; add a user turn and an assistant turn"]
    problems: list[str] = []
    messages: list[dict[str, str]] = []
    allowed = ", ".join(roles)
    for i, turn in enumerate(turns):
        at = f"{field}[{i}]"
        if not isinstance(turn, dict):
            problems.append(f"{at} is {_type(turn)}; each turn must be an object in {shape}")
            continue
        rk, ck = names
        if role_key not in turn and "role" in turn:  # ShareGPT exports that kept OpenAI keys
            rk, ck = "role", "content"
        role = turn.get(rk)
        mapped = roles.get(role) if isinstance(role, str) else None
        if role is None:
            problems.append(f"{at} has no {rk!r}; give one of: {allowed}")
        elif mapped is None:
            problems.append(f"{at} has unknown {rk} {role!r}; allowed: {allowed}")
        hint = "every turn needs non-empty text"
        text_problem = _text_problem(turn.get(ck), f"{at} {ck!r}", hint)
        if text_problem:
            problems.append(text_problem)
        elif mapped is not None:
            messages.append({"role": mapped, "content": turn[ck]})
    if problems:
        return None, problems
    order = _order_problems([m["role"] for m in messages], field)
    return (None, order) if order else ({"messages": messages}, [])


def _check_messages(row: Mapping[str, Any]) -> _Checked:
    return _check_turns(row["messages"], "messages", ("role", "content"), _ROLES)


def _check_sharegpt(row: Mapping[str, Any]) -> _Checked:
    return _check_turns(row["conversations"], "conversations", ("from", "value"), _SHAREGPT_ROLES)


def _check_alpaca(row: Mapping[str, Any]) -> _Checked:
    hint = "an alpaca row needs non-empty 'instruction' and 'output' ('input' is optional)"
    problems = [
        p
        for key in ("instruction", "output")
        if (p := _text_problem(row.get(key), repr(key), hint)) is not None
    ]
    for key in ("input", "system"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key!r} must be a string (or left out), got {_type(value)}")
    if problems:
        return None, problems
    user = row["instruction"]
    extra = row.get("input")
    if extra and extra.strip():
        user += "\n\n" + extra
    system = row.get("system")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return {"messages": messages}, []


def _check_prompt_completion(row: Mapping[str, Any]) -> _Checked:
    hint = "a prompt/completion row needs non-empty 'prompt' and 'completion' strings"
    problems = [
        p
        for key in ("prompt", "completion")
        if (p := _text_problem(row.get(key), repr(key), hint)) is not None
    ]
    if problems:
        return None, problems
    return {"prompt": row["prompt"], "completion": row["completion"]}, []


def _check_text(row: Mapping[str, Any]) -> _Checked:
    problem = _text_problem(row.get("text"), "'text'", "a text row needs a non-empty 'text'")
    return (None, [problem]) if problem else ({"text": row["text"]}, [])


_CHECKERS: dict[str, Callable[[Mapping[str, Any]], _Checked]] = {
    "messages": _check_messages,
    "sharegpt": _check_sharegpt,
    "alpaca": _check_alpaca,
    "prompt_completion": _check_prompt_completion,
    "text": _check_text,
}


class RowChecker:
    """Checks rows one at a time, in file order, and collects every problem.

    Feed each ``(where, row)`` to ``check``; it returns the normalised row, or None when the row
    has problems (they are appended to ``problems``). ``format`` is the format of the first
    recognisable row: every later row must share it.
    """

    def __init__(self) -> None:
        self.format: str | None = None
        self.problems: list[str] = []
        self._first = ""

    def check(self, where: str, row: Any) -> dict[str, Any] | None:
        """The normalised row, or None (with its problems recorded)."""
        if isinstance(row, Unreadable):
            self.problems.append(f"{where}: {row.reason}")
            return None
        if not isinstance(row, dict):
            self.problems.append(
                f"{where}: row is a {_type(row)}, not an object; each row must be a dict"
            )
            return None
        row_fmt = detect_format(row)
        if row.get("chosen") is not None and row.get("rejected") is not None:
            self.problems.append(
                f"{where}: a preference row (chosen/rejected) in an sft job; set objective: dpo "
                "or orpo to train on pairs"
            )
            return None
        if row_fmt is None:
            keys = ", ".join(repr(k) for k in sorted(map(str, row))) or "none"
            self.problems.append(f"{where}: no known fields (found: {keys}); a row needs {_KNOWN}")
            return None
        if self.format is None:
            self.format, self._first = row_fmt, where
        elif row_fmt != self.format:
            self.problems.append(
                f"{where}: mixed formats: this row is {row_fmt} but the first row "
                f"({self._first}) is {self.format}; convert the file to one format"
            )
            return None
        normalised, row_problems = _CHECKERS[row_fmt](row)
        self.problems += [f"{where}: {p}" for p in row_problems]
        return normalised


def check_rows(located: Located) -> tuple[str | None, list[dict[str, Any]], list[str]]:
    """Check every row and collect every problem (in memory; ``RowChecker`` streams).

    Returns:
        ``(format, normalised_rows, problems)``: the format of the first recognisable row, the
        rows that passed (normalised), and one ``"<where>: <what is wrong>"`` per problem.
    """
    checker = RowChecker()
    rows = [r for where, row in located if (r := checker.check(where, row)) is not None]
    return checker.format, rows, checker.problems
