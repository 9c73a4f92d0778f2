"""Row layouts: which fields of a row hold the prompt, the answer, the system prompt, the
conversation (and its role/content keys) or the text, detected or given by a column mapping.

Read on both sides: the client checks local files with it (``sdk/_data/formats.py``) and the
instance normalises hub rows with it (``_data.normalise_row``), so a layout the client accepts is
the layout the trainer reads. Standard library only.

===================  =============================================  ==================
layout               a row looks like                               trains as
===================  =============================================  ==================
messages             ``{"messages": [{"role", "content"}]}``        chat
sharegpt             ``{"conversations": [{"from", "value"}]}``     chat
alpaca               ``{"instruction", "input"?, "output"}``        chat
instruction_response ``{"instruction", "input"?, "response"}``      chat (Magicoder)
question_answer      ``{"question", "answer"}``                     chat
query_response       ``{"query", "response"}``                      chat
prompt_response      ``{"prompt", "response"}``                     chat
prompt_completion    ``{"prompt", "completion"}``                   raw prompt + completion
text                 ``{"text"}``                                   raw text
===================  =============================================  ==================

Any other layout is named by a mapping (``columns:`` in a dataset source), as Axolotl's
``field_*`` keys and LLaMA-Factory's ``dataset_info.json`` ``columns``/``tags`` do; every pair
layout also takes an optional ``system`` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "COLUMN_KEYS",
    "LAYOUTS",
    "ROLES",
    "Columns",
    "close_match",
    "columns_for",
    "detect_layout",
    "normalise",
    "parse_split",
    "with_system",
]

# The roles the trainer knows, and the names datasets give them (ShareGPT's, OpenAI's, a few
# common others); a mapping's ``roles`` adds to these.
ROLES = ("system", "user", "assistant")
_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
}
# Keys of a column mapping (the spec's ``columns:``), each documented on ``Columns``.
COLUMN_KEYS = (
    "messages",
    "role",
    "content",
    "roles",
    "prompt",
    "input",
    "response",
    "system",
    "completion",
    "text",
)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a row's parts are. Exactly one group is set: ``messages`` (with ``role``,
    ``content`` and extra ``roles`` names), ``prompt`` + ``response`` (with optional ``input``,
    appended to the prompt, and ``system``), ``prompt`` + ``completion`` (raw, no chat
    template) or ``text``.

    Attributes:
        messages: the field holding the conversation, a list of turn objects.
        role: the key of a turn that holds its role (``role``; ShareGPT: ``from``).
        content: the key of a turn that holds its text (``content``; ShareGPT: ``value``).
        roles: the dataset's role names mapped to system/user/assistant (``{"bot":
            "assistant"}``), on top of the usual ones.
        prompt: the field holding the user's prompt (an instruction, a question).
        input: an optional field appended to the prompt after a blank line (alpaca's input).
        response: the field holding the answer the model learns.
        system: an optional field holding the system prompt.
        completion: with ``prompt``: raw prompt/completion rows, trained without a template.
        text: the field holding raw text (trained on every token).
    """

    messages: str | None = None
    role: str = "role"
    content: str = "content"
    roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prompt: str | None = None
    input: str | None = None
    response: str | None = None
    system: str | None = None
    completion: str | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        """What the trainer reads: ``messages``, ``prompt_completion`` or ``text``."""
        if self.messages is not None or self.response is not None:
            return "messages"
        return "prompt_completion" if self.completion is not None else "text"

    @property
    def required(self) -> tuple[str, ...]:
        """The fields every row must have."""
        if self.messages is not None:
            return (self.messages,)
        if self.text is not None:
            return (self.text,)
        second = self.response if self.response is not None else self.completion
        return tuple(f for f in (self.prompt, second) if f is not None)

    @property
    def optional(self) -> tuple[str, ...]:
        """Fields a row may leave out."""
        return tuple(f for f in (self.input, self.system) if f is not None)

    @property
    def role_names(self) -> dict[str, str]:
        """Every role name a turn may carry, mapped to system/user/assistant: OpenAI's names
        where turns keep their role under ``role``, ShareGPT's and OpenAI's elsewhere, plus
        ``roles``."""
        base = {r: r for r in ROLES} if self.role == "role" else _ROLE_NAMES
        return {**base, **dict(self.roles)}


# Detection order matters where layouts share a field: the first whose required fields are all
# present wins; a row that matches none is blamed on the one it shares most fields with.
LAYOUTS: dict[str, Columns] = {
    "messages": Columns(messages="messages"),
    "sharegpt": Columns(messages="conversations", role="from", content="value"),
    "alpaca": Columns(prompt="instruction", input="input", response="output", system="system"),
    "instruction_response": Columns(
        prompt="instruction", input="input", response="response", system="system"
    ),
    "prompt_completion": Columns(prompt="prompt", completion="completion"),
    "prompt_response": Columns(prompt="prompt", response="response", system="system"),
    "question_answer": Columns(prompt="question", response="answer", system="system"),
    "query_response": Columns(prompt="query", response="response", system="system"),
    "text": Columns(text="text"),
}


def detect_layout(row: Mapping[str, Any]) -> str | None:
    """The layout a row is written in, judged by its non-null keys; None when unknown.

    A row with every required field of a layout is that layout; otherwise the layout it shares
    the most required fields with (so that ``{"instruction": ...}`` alone is blamed for its
    missing ``output``), or None when it shares none.
    """
    keys = {k for k, v in row.items() if v is not None}
    best, shared = None, 0
    for name, cols in LAYOUTS.items():
        have = sum(f in keys for f in cols.required)
        if have == len(cols.required):
            return name
        if have > shared:
            best, shared = name, have
    return best


def close_match(name: str, options: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the option closest to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def columns_for(layout: str | None, mapping: Mapping[str, Any] | None) -> Columns:
    """The columns of ``layout`` (a name of :data:`LAYOUTS`) with ``mapping`` laid over it.

    A mapping alone starts from the group its keys name: ``messages`` from the messages layout
    (``role``/``content`` keys), ``text`` from the text layout, ``prompt`` + ``completion``
    from prompt/completion, anything else from an empty prompt/response pair.

    Raises:
        ValueError: an unknown layout or mapping key (with a did-you-mean), a mapping that names
            no group or two, or a pair without its prompt or response.
    """
    mapping = dict(mapping or {})
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(
            f"unknown format {layout!r}{close_match(layout, list(LAYOUTS))} "
            f"(known: {', '.join(LAYOUTS)})"
        )
    for key in mapping:
        if key not in COLUMN_KEYS:
            raise ValueError(
                f"unknown column key {key!r}{close_match(str(key), list(COLUMN_KEYS))} "
                f"(known: {', '.join(COLUMN_KEYS)})"
            )
    if layout is None:
        if "messages" in mapping or {"role", "content", "roles"} & set(mapping):
            layout = "messages"
        elif "text" in mapping:
            layout = "text"
        elif "completion" in mapping:
            layout = "prompt_completion"
    base = LAYOUTS[layout] if layout is not None else Columns()
    if base.messages is None and {"role", "content", "roles"} & set(mapping):
        raise ValueError("columns role/content/roles describe a conversation: name its field")
    cols = dataclasses.replace(base, **mapping)
    groups = [
        g
        for g, on in (
            ("messages", cols.messages is not None),
            ("prompt/response", cols.response is not None),
            ("prompt/completion", cols.completion is not None),
            ("text", cols.text is not None),
        )
        if on
    ]
    if len(groups) != 1:
        what = " and ".join(groups) if groups else "none"
        raise ValueError(
            "columns must name one kind of row: a conversation (messages), a pair (prompt + "
            f"response), raw prompt + completion, or text; this names {what}"
        )
    if cols.messages is None and cols.text is None and cols.prompt is None:
        raise ValueError("columns name the answer but not the prompt: add columns.prompt")
    for name, target in cols.roles.items():
        if target not in ROLES:
            raise ValueError(f"columns.roles.{name}: {target!r} must be one of {', '.join(ROLES)}")
    return cols


def with_system(row: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    """A normalised chat row with ``system_prompt`` as its first turn when it has none."""
    messages = row.get("messages")
    if not system_prompt or not messages or messages[0].get("role") == "system":
        return row
    return {**row, "messages": [{"role": "system", "content": system_prompt}, *messages]}


def normalise(row: Mapping[str, Any], cols: Columns) -> dict[str, Any]:
    """``row`` in the shape the trainer reads (``messages``, ``prompt``/``completion`` or
    ``text``); values are taken as they are (the client checks local rows in full first).

    Raises:
        KeyError, TypeError: the row lacks a required field or a turn its role.
    """
    if cols.messages is not None:
        names = cols.role_names
        turns = []
        for turn in row[cols.messages]:
            rk, ck = cols.role, cols.content
            if rk not in turn and "role" in turn:  # ShareGPT exports that kept OpenAI keys
                rk, ck = "role", "content"
            role = turn[rk]
            turns.append({"role": names.get(role, role), "content": turn[ck]})
        return {"messages": turns}
    if cols.text is not None:
        return {"text": row[cols.text]}
    assert cols.prompt is not None  # columns_for guarantees a pair has its prompt
    if cols.completion is not None:
        return {"prompt": row[cols.prompt], "completion": row[cols.completion]}
    assert cols.response is not None
    user = row[cols.prompt]
    extra = row.get(cols.input) if cols.input else None
    if isinstance(extra, str) and extra.strip():
        user += "\n\n" + extra
    system = row.get(cols.system) if cols.system else None
    messages = (
        [{"role": "system", "content": system}]
        if isinstance(system, str) and system.strip()
        else []
    )
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": row[cols.response]},
    ]
    return {"messages": messages}


_SPLIT = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(expr: str) -> tuple[str, str | None, str | None]:
    """``"train[:2000]"`` -> ``("train", None, "2000")``: the split's name and the slice's bounds,
    as the ``datasets`` library's split expressions write them (``train[10%:]``, ``test``).

    Raises:
        ValueError: not ``name`` or ``name[start:stop]`` with integer or percent bounds.
    """
    m = _SPLIT.match(expr)
    if not m:
        raise ValueError(
            f"split {expr!r} is not a split expression; write a split name with an optional "
            "slice, e.g. 'train', 'train[:2000]', 'train[10%:20%]'"
        )
    return m.group(1), m.group(2), m.group(3)
