"""Tokenisation and loss masks: rows in, ``{"input_ids", "labels"}`` out (``-100`` = no loss).

We tokenise ourselves and hand TRL a pre-tokenised dataset, so the mask is right for any chat
template, with or without ``{% generation %}`` markers. An assistant turn's span is found by
rendering the conversation twice, up to the turn (with the generation prompt) and through it;
the characters in between (the reply and the template's end-of-turn text) carry the loss, and a
token carries it when its character span overlaps. Templates that do not render prefixes
stably fall back to locating each reply's text, plus the one token after it (the end of turn).

Standard library only: the tokenizer is passed in.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .columns import LAYOUTS, Columns, detect_layout, normalise, with_system
from .protocol import CHATML_SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE
from .templates import apply_template

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "encode_row",
    "encode_rows",
    "ensure_chat_template",
    "normalise_row",
    "read_jsonl",
]

IGNORE_INDEX = -100


class DataError(ValueError):
    """A row the trainer cannot use; the message names the file and row."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read the bundle's normalised JSONL.

    Raises:
        DataError: naming ``path:line`` of a line that is not a JSON object.
    """
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def normalise_row(
    row: Mapping[str, Any], columns: Columns | None = None
) -> tuple[str, dict[str, Any]]:
    """Read a hub row through ``columns`` (or its detected layout), like the client does for
    local files (:mod:`.columns`).

    Returns:
        ``(data_format, row)`` with ``data_format`` one of messages / prompt_completion / text.

    Raises:
        DataError: the row's layout is unknown, or it lacks a field its columns name.
    """
    if columns is None:
        layout = detect_layout(row)
        columns = LAYOUTS[layout] if layout is not None else None
        if columns is None or any(row.get(f) is None for f in columns.required):
            raise DataError(
                f"unknown row format with keys {sorted(row)}; expected 'messages', "
                "'conversations', 'instruction'+'output'/'response', 'prompt'+'response', "
                "'question'+'answer', 'query'+'response', 'prompt'+'completion' or 'text' "
                "(or give the source a column mapping: columns: {prompt: ..., response: ...})"
            )
    try:
        return columns.kind, normalise(row, columns)
    except KeyError as exc:
        raise DataError(f"the row has no field {exc} (its fields: {sorted(row)})") from None


def ensure_chat_template(tokenizer: Any, template: str | None = None) -> list[str]:
    """Give the tokenizer the spec's ``chat_template`` (a name or Jinja, :mod:`.templates`), or,
    when the spec names none and the tokenizer has none, the ChatML default.

    Returns:
        The special tokens that had to be added (the caller resizes the embeddings and makes
        those rows trainable).
    """
    if template is not None:
        return apply_template(tokenizer, template)
    if tokenizer.chat_template:
        return []
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return text


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span is ``(start, end, extra)`` where ``extra`` = 1 asks for the next token too.
    """
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if through.startswith(before) and full.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through), 0))
            continue
        # Not prefix-stable (e.g. templates that rewrite earlier turns): find the reply itself.
        start = full.find(message["content"], spans[-1][1] if spans else 0)
        if start < 0:
            raise DataError("the chat template drops an assistant reply; set train.loss_on='all'")
        spans.append((start, start + len(message["content"]), 1))
    return full, spans


def _mask(offsets: list[tuple[int, int]], spans: Iterable[tuple[int, int, int]]) -> list[bool]:
    """Which tokens carry the loss: those whose characters overlap a span (plus the next token
    after a span marked ``extra``). Each span finds its token range by bisection over running
    maxima of the token ends and starts (special tokens have empty ``(0, 0)`` offsets)."""
    n = len(offsets)
    spans = list(spans)
    if len(spans) == 1 and spans[0][0] <= 0 and not spans[0][2]:
        end = spans[0][1]  # one span from the start (text, or a whole completion row)
        return [e > s and s < end for s, e in offsets]
    keep = [False] * n
    ends = list(itertools.accumulate((e for _, e in offsets), max))
    starts = list(itertools.accumulate((s if e > s else 0 for s, e in offsets), max))
    for start, end, extra in spans:
        lo = bisect.bisect_right(ends, start)
        hi = bisect.bisect_left(starts, end, lo)
        keep[lo:hi] = [e > s and s < end and e > start for s, e in offsets[lo:hi]]
        if extra:
            last = next((k for k in range(hi - 1, lo - 1, -1) if keep[k]), -1)
            if 0 <= last < n - 1:
                keep[last + 1] = True
    return keep


def _prepare(
    row: Mapping[str, Any], data_format: str, tokenizer: Any
) -> tuple[str, list[tuple[int, int, int]], bool]:
    """A row's text, the character spans that carry the loss, and whether to add BOS/EOS."""
    if data_format == "messages":
        text, spans = _assistant_spans(tokenizer, list(row["messages"]))
        return text, spans, False  # the template writes its own bos
    if data_format == "prompt_completion":
        completion = row["completion"]
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        text = row["prompt"] + completion
        return text, [(len(row["prompt"]), len(text), 0)], True
    if data_format == "text":
        text = row["text"] + (tokenizer.eos_token or "")
        return text, [(0, len(text), 0)], True
    raise DataError(f"unknown data_format {data_format!r}")


def _labelled(
    ids: list[int], offsets: list[Any], spans: list[tuple[int, int, int]], loss_on: str
) -> dict[str, list[int]]:
    keep = [True] * len(ids) if loss_on == "all" else _mask([tuple(o) for o in offsets], spans)
    return {
        "input_ids": ids,
        "labels": [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)],
    }


def encode_row(
    row: Mapping[str, Any], data_format: str, tokenizer: Any, *, loss_on: str = "assistant"
) -> dict[str, list[int]]:
    """Tokenise one normalised row (not truncated) with its labels.

    ``loss_on="assistant"`` keeps the loss on assistant turns (messages) or on the completion
    (prompt_completion); ``"all"`` trains on every token. Plain text always trains on all of it.

    Raises:
        DataError: an unknown ``data_format`` or a template that loses a reply.
    """
    text, spans, special = _prepare(row, data_format, tokenizer)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return _labelled(list(enc["input_ids"]), enc["offset_mapping"], spans, loss_on)


_TOKENIZE_BATCH = 512


def encode_rows(
    rows: Iterable[Mapping[str, Any]],
    data_format: str,
    tokenizer: Any,
    *,
    max_seq_len: int,
    loss_on: str = "assistant",
    source: str = "data",
    columns: Columns | None = None,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenise, mask and truncate every row to ``max_seq_len`` tokens.

    ``data_format="hub"`` reads each row through ``columns`` (or its detected layout).
    ``system_prompt`` becomes the first turn of every conversation that has no system turn.
    Rows left without any loss token after truncation are dropped (they would teach nothing)
    and counted.

    Returns:
        The encoded rows and stats: ``rows``, ``tokens``, ``loss_tokens``, ``truncated``,
        ``dropped``.

    Raises:
        DataError: naming ``source`` and the row number, or when no row is left.
    """
    out: list[dict[str, list[int]]] = []
    stats = {"rows": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0, "dropped": 0}
    pending: list[tuple[str, list[tuple[int, int, int]], bool]] = []

    def flush() -> None:
        # One tokenizer call per batch: the Rust tokenizer encodes a batch on every core.
        for special in (True, False):
            part = [(t, sp) for t, sp, sx in pending if sx is special]
            if not part:
                continue
            texts = [t for t, _ in part]
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:  # the Rust tokenizer itself: no per-row Python conversion
                encs = backend.encode_batch(texts, add_special_tokens=special)
                pairs = [(e.ids, e.offsets) for e in encs]
            else:
                enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
                pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
            for (ids, offsets), (_, spans) in zip(pairs, part, strict=True):
                keep(_labelled(list(ids), offsets, spans, loss_on))
        pending.clear()

    def keep(enc: dict[str, list[int]]) -> None:
        if len(enc["input_ids"]) > max_seq_len:
            stats["truncated"] += 1
            enc = {k: v[:max_seq_len] for k, v in enc.items()}
        loss_tokens = sum(1 for t in enc["labels"] if t != IGNORE_INDEX)
        if loss_tokens == 0:
            stats["dropped"] += 1
            return
        stats["rows"] += 1
        stats["tokens"] += len(enc["input_ids"])
        stats["loss_tokens"] += loss_tokens
        out.append(enc)

    for n, row in enumerate(rows, start=1):
        try:
            fmt, norm = (
                normalise_row(row, columns) if data_format == "hub" else (data_format, dict(row))
            )
            if system_prompt and fmt == "messages":
                norm = with_system(norm, system_prompt)
            pending.append(_prepare(norm, fmt, tokenizer))
        except (DataError, KeyError, TypeError) as exc:
            raise DataError(f"{source} row {n}: {exc}") from exc
        except Exception as exc:  # the chat template's own (Jinja) errors, named with the row
            raise DataError(
                f"{source} row {n}: the chat template cannot render it "
                f"({type(exc).__name__}: {exc}); check the row's turns"
            ) from exc
        if len(pending) >= _TOKENIZE_BATCH:
            flush()
    flush()
    if not out:
        raise DataError(
            f"{source}: no row has a trainable token left (max_seq_len={max_seq_len} cuts every "
            "row before its answer); raise train.max_seq_len"
        )
    return out, stats
