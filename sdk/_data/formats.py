"""Row layouts: detect each row's layout (or read it from a column mapping), check it, and
normalise it to what the trainer reads.

The layouts and the mapping live in ``loraburst.remote.columns`` (the instance normalises hub
rows with the same table): ``messages``, ``sharegpt``, ``alpaca``, ``instruction_response``,
``prompt_response``, ``question_answer``, ``query_response`` train as chat; ``prompt_completion``
and ``text`` as raw text. Any other layout is named by a mapping (``columns:``).

Conversations must be (system?) user, assistant, user, assistant, ... and end on an assistant
turn, because the trainer learns the assistant turns: a conversation without one, or ending on
a question, teaches nothing or teaches the model to stop mid-dialogue.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from loraburst.remote.columns import LAYOUTS, Columns, close_match, detect_layout

from .._exceptions import ConfigError
from .read import Located, Unreadable

__all__ = ["KIND_OF_FORMAT", "LAYOUT_NAMES", "RowChecker", "check_rows", "detect_format"]

KIND_OF_FORMAT = {name: cols.kind for name, cols in LAYOUTS.items()}
KIND_OF_FORMAT["preference"] = "preference"  # objective dpo/orpo: pairs (preference.py)
# How ``validate`` names a layout: the fields it read, and what it trains as.
LAYOUT_NAMES = {
    "messages": "messages (role/content)",
    "sharegpt": "sharegpt (conversations with from/value)",
    "alpaca": "alpaca (instruction/input/output)",
    "instruction_response": "instruction/response",
    "prompt_response": "prompt/response",
    "question_answer": "question/answer",
    "query_response": "query/response",
    "prompt_completion": "prompt/completion",
    "text": "text",
    "preference": "preference",  # objective dpo/orpo: prompt/chosen/rejected pairs
    "columns": "mapped columns",
}
_KNOWN = (
    "'messages', 'conversations', 'instruction'+'output' (or +'response'), 'prompt'+'response', "
    "'question'+'answer', 'query'+'response', 'prompt'+'completion' or 'text'"
)
_MAP_HINT = (
    "; or say which field is which with a column mapping, e.g. dataset: {path: ..., columns: "
    "{prompt: <field>, response: <field>}}"
)

_Checked = tuple[dict[str, Any] | None, list[str]]


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The layout a row is written in, judged by its non-null keys; None when unknown."""
    return detect_layout(row)


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


def _check_turns(row: Mapping[str, Any], cols: Columns) -> _Checked:
    assert cols.messages is not None
    field, turns = cols.messages, row[cols.messages]
    role_key, content_key = cols.role, cols.content
    roles = cols.role_names
    shape = f"a list of {{{role_key!r}, {content_key!r}}} objects"
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        # A CSV cell of a mapped conversation column (read.py parses only the usual names).
        with contextlib.suppress(json.JSONDecodeError):
            turns = json.loads(turns)
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
        rk, ck = role_key, content_key
        if role_key not in turn and "role" in turn:  # ShareGPT exports that kept OpenAI keys
            rk, ck = "role", "content"
        role = turn.get(rk)
        mapped = roles.get(role) if isinstance(role, str) else None
        if role is None:
            problems.append(f"{at} has no {rk!r}; give one of: {allowed}")
        elif mapped is None:
            problems.append(
                f"{at} has unknown {rk} {role!r}; allowed: {allowed} (columns.roles maps "
                "other names)"
                if cols.roles
                else f"{at} has unknown {rk} {role!r}; allowed: {allowed}"
            )
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


def _pair_hint(cols: Columns, layout: str) -> str:
    second = cols.response if cols.response is not None else cols.completion
    optional = (
        f" ({' and '.join(repr(f) for f in cols.optional)} optional)" if cols.optional else ""
    )
    article = "an" if layout[0] in "aeiou" else "a"
    what = f"{article} {layout} row" if layout in LAYOUTS else "each row (per columns:)"
    return f"{what} needs non-empty {cols.prompt!r} and {second!r}{optional}"


def _check_pair(row: Mapping[str, Any], cols: Columns, layout: str) -> _Checked:
    hint = _pair_hint(cols, layout)
    problems = [
        p
        for key in cols.required
        if (p := _text_problem(row.get(key), repr(key), hint)) is not None
    ]
    for key in cols.optional:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key!r} must be a string (or left out), got {_type(value)}")
    if problems:
        return None, problems
    return _normalise(row, cols), []


def _check_text(row: Mapping[str, Any], cols: Columns) -> _Checked:
    assert cols.text is not None
    label = repr(cols.text)
    problem = _text_problem(row.get(cols.text), label, f"a text row needs a non-empty {label}")
    return (None, [problem]) if problem else ({"text": row[cols.text]}, [])


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _blank_answer(row: Mapping[str, Any], cols: Columns) -> bool:
    """Whether the row's answer (its response, completion or any assistant turn) is an empty
    or whitespace-only string."""
    if cols.messages is not None:
        turns = row.get(cols.messages)
        names = cols.role_names
        if not isinstance(turns, list):
            return False
        for t in turns:
            role = t.get(cols.role, t.get("role")) if isinstance(t, dict) else None
            assistant = isinstance(role, str) and names.get(role) == "assistant"
            if assistant and _blank(t.get(cols.content, t.get("content"))):
                return True
        return False
    answer = cols.response if cols.response is not None else cols.completion
    return answer is not None and _blank(row.get(answer))


def _normalise(row: Mapping[str, Any], cols: Columns) -> dict[str, Any]:
    from loraburst.remote.columns import normalise

    return normalise(row, cols)


class RowChecker:
    """Checks rows one at a time, in file order, and collects every problem.

    Feed each ``(where, row)`` to ``check``; it returns the normalised row, or None when the row
    has problems (they are appended to ``problems``). Without ``columns`` the layout is
    detected: ``format`` is the layout of the first recognisable row and every later row must
    share it. With ``columns`` (a mapping, or a layout forced by ``format:``) every row is read
    through them, and ``format`` is ``layout``.

    Args:
        columns: the columns to read, when given by the spec.
        layout: the name to report for them (a layout name, or ``"columns"`` for a mapping).
    """

    def __init__(self, columns: Columns | None = None, layout: str | None = None) -> None:
        self.columns = columns
        self.format: str | None = layout if columns is not None else None
        self.problems: list[str] = []
        # Whether the latest rejected row's answer is blank (the data report counts them).
        self.empty_answer = False
        self._first = ""
        self._mapping_checked = columns is None

    def check(self, where: str, row: Any) -> dict[str, Any] | None:
        """The normalised row, or None (with its problems recorded).

        Raises:
            ConfigError: the first row lacks a field the column mapping names (a typo in the
                mapping, said once with a did-you-mean, rather than once per row).
        """
        if isinstance(row, Unreadable):
            self.problems.append(f"{where}: {row.reason}")
            return None
        if not isinstance(row, dict):
            self.problems.append(
                f"{where}: row is a {_type(row)}, not an object; each row must be a dict"
            )
            return None
        if row.get("chosen") is not None and row.get("rejected") is not None:
            self.problems.append(
                f"{where}: a preference row (chosen/rejected) in an sft job; set objective: dpo "
                "or orpo to train on pairs"
            )
            return None
        cols = self.columns
        if cols is None:
            row_fmt = detect_format(row)
            if row_fmt is None:
                keys = ", ".join(repr(k) for k in sorted(map(str, row))) or "none"
                self.problems.append(
                    f"{where}: no known fields (found: {keys}); a row needs {_KNOWN}{_MAP_HINT}"
                )
                return None
            if self.format is None:
                self.format, self._first = row_fmt, where
            elif row_fmt != self.format:
                self.problems.append(
                    f"{where}: mixed formats: this row is {row_fmt} but the first row "
                    f"({self._first}) is {self.format}; convert the file to one format"
                )
                return None
            cols, layout = LAYOUTS[row_fmt], row_fmt
        else:
            layout = self.format or "columns"
            if not self._mapping_checked:
                self._check_mapping(where, row, cols)
        normalised, row_problems = self._check(row, cols, layout)
        self.problems += [f"{where}: {p}" for p in row_problems]
        self.empty_answer = bool(row_problems) and _blank_answer(row, cols)
        return normalised

    def _check_mapping(self, where: str, row: dict[str, Any], cols: Columns) -> None:
        self._mapping_checked = True
        fields = sorted(map(str, row))
        for name in ("messages", "prompt", "response", "completion", "text"):
            field = getattr(cols, name)
            if field is not None and field not in row:
                raise ConfigError(
                    f"columns.{name}: {field!r} is not a field of {where} (its fields: "
                    f"{', '.join(fields)}){close_match(field, fields)}"
                )

    @staticmethod
    def _check(row: Mapping[str, Any], cols: Columns, layout: str) -> _Checked:
        if cols.messages is not None:
            return _check_turns(row, cols)
        if cols.text is not None:
            return _check_text(row, cols)
        return _check_pair(row, cols, layout)


def check_rows(located: Located) -> tuple[str | None, list[dict[str, Any]], list[str]]:
    """Check every row and collect every problem (in memory; ``RowChecker`` streams).

    Returns:
        ``(format, normalised_rows, problems)``: the format of the first recognisable row, the
        rows that passed (normalised), and one ``"<where>: <what is wrong>"`` per problem.
    """
    checker = RowChecker()
    rows = [r for where, row in located if (r := checker.check(where, row)) is not None]
    return checker.format, rows, checker.problems
