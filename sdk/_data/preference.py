"""Preference datasets (``objective: dpo`` / ``orpo``): every pair checked before anything is
rented, each problem named by ``file:line``.

The rules live in :mod:`loraburst.remote.pairs` (the instance applies them again to hub rows):
``chosen`` and ``rejected`` present and different, both text (with a ``prompt``) or both
conversations that end with an assistant answer and share every turn before it (or an explicit
``prompt`` of turns). This module feeds them rows in the dataset checker's streaming shape and
counts a pair's tokens as the trainer sees them: prompt + chosen, and prompt + rejected.
"""

from __future__ import annotations

from typing import Any

from loraburst.remote.pairs import check_pair, is_pair_row

from .read import Unreadable

__all__ = ["PREFERENCE_FORMAT", "PreferenceChecker", "pair_sequences"]

PREFERENCE_FORMAT = "preference"


def _shape(row: dict[str, Any]) -> str:
    return "text" if isinstance(row["prompt"], str) else "conversation"


class PreferenceChecker:
    """Checks preference rows one at a time (the ``RowChecker`` interface of ``formats``).

    ``format`` is ``"preference"`` once a row is recognised; every problem is appended to
    ``problems`` as ``"<where>: <what is wrong and the fix>"``.
    """

    def __init__(self) -> None:
        self.format: str | None = None
        self.problems: list[str] = []
        self.empty_answer = False  # what the data report asks of a rejected row (RowChecker)
        self._shape: tuple[str, str] | None = None  # (text | conversation, first row's where)

    def check(self, where: str, row: Any) -> dict[str, Any] | None:
        """The normalised pair, or None (with its problems recorded)."""
        if isinstance(row, Unreadable):
            self.problems.append(f"{where}: {row.reason}")
            return None
        if not isinstance(row, dict):
            self.problems.append(f"{where}: row is a {type(row).__name__}, not an object")
            return None
        if not is_pair_row(row):
            keys = ", ".join(repr(k) for k in sorted(map(str, row))) or "none"
            self.problems.append(
                f"{where}: not a preference row (found: {keys}); objective dpo/orpo trains on "
                "'prompt', 'chosen' and 'rejected' (or objective: sft for this data)"
            )
            return None
        self.format = PREFERENCE_FORMAT
        normalised, problems = check_pair(row)
        self.problems += [f"{where}: {p}" for p in problems]
        if normalised is None:
            return None
        shape = _shape(normalised)
        if self._shape is None:
            self._shape = (shape, where)
        elif shape != self._shape[0]:
            self.problems.append(
                f"{where}: mixed formats: this pair is {shape} but the first ({self._shape[1]}) "
                f"is {self._shape[0]}; convert the file to one shape"
            )
            return None
        checked: dict[str, Any] = normalised
        return checked


def pair_sequences(row: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The two sequences a normalised pair trains on, as SFT-shaped rows of one kind.

    Returns:
        ``("messages", [...])`` or ``("prompt_completion", [...])``: prompt + chosen, then
        prompt + rejected.
    """
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return "prompt_completion", [
            {"prompt": prompt, "completion": row[k]} for k in ("chosen", "rejected")
        ]
    return "messages", [{"messages": [*prompt, *row[k]]} for k in ("chosen", "rejected")]
