"""A list-valued ``dataset``/``eval_dataset`` on the instance: every source read (a bundled
file the client normalised, or a hub dataset with its config, split expression, columns and
row cap, streamed where only its first rows are used), encoded, and drawn into one mix
(:mod:`..mix`: the same rows the client's estimate counted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._data import DataError, encode_rows, read_jsonl
from ..columns import Columns, columns_for, parse_split
from ..mix import mix_counts, pick
from ..protocol import BUNDLE_DIR, DEFAULT_CHAT_TEMPLATE, DataChecksSpec, JobSpecData, SourceSpec
from ..templates import template_label

__all__ = ["check_truncation", "encode_sources", "hub_rows", "streams", "template_used"]

Rows = list[dict[str, list[int]]]


def streams(src: SourceSpec) -> bool:
    """Whether a hub source is read as a stream: when asked, or ("auto") when only its first
    rows are used (``max_rows``, or a split slice by row number)."""
    _, start, stop = parse_split(src.split)
    percent = any(b is not None and b.endswith("%") for b in (start, stop))
    if src.streaming == "auto":
        return not percent and (src.max_rows is not None or stop is not None)
    return bool(src.streaming)


def hub_rows(src: SourceSpec) -> Any:
    """The hub source's rows (a ``Dataset`` or, streamed, an ``IterableDataset``), cut to its
    split slice and ``max_rows``.

    Raises:
        DataError: a streamed slice with negative or percent bounds.
    """
    from datasets import load_dataset

    if not streams(src):
        rows = load_dataset(src.path, src.config, split=src.split)
        if src.max_rows is not None and len(rows) > src.max_rows:
            rows = rows.select(range(src.max_rows))
        return rows
    name, start, stop = parse_split(src.split)
    bounds = [b for b in (start, stop) if b is not None]
    if any(b.endswith("%") or b.startswith("-") for b in bounds):
        raise DataError(
            f"{src.path}: split {src.split!r} cannot be streamed (its size is unknown until "
            "read); use row numbers such as 'train[:2000]', or streaming: false"
        )
    rows = load_dataset(src.path, src.config, split=name, streaming=True)
    first = int(start) if start else 0
    if first:
        rows = rows.skip(first)
    count = int(stop) - first if stop else None
    if src.max_rows is not None:
        count = src.max_rows if count is None else min(count, src.max_rows)
    return rows.take(count) if count is not None else rows


def _columns(src: SourceSpec) -> Columns | None:
    if src.format is None and not src.columns:
        return None
    try:
        return columns_for(src.format, src.columns)
    except ValueError as exc:
        raise DataError(f"{src.path}: {exc}") from None


def encode_sources(
    workdir: Path, entries: list[dict[str, Any]], spec: JobSpecData, tokenizer: Any
) -> tuple[Rows, dict[str, Any]]:
    """Encode every source and draw the mix.

    Returns:
        The mix's encoded rows and the stats ``encode_rows`` gives, summed, with ``sources``:
        per source its name, encoded rows and rows taken.

    Raises:
        DataError: a source's rows cannot be used, or weights on some sources only.
    """
    train = spec.train
    encoded: list[tuple[SourceSpec, Rows, dict[str, int]]] = []
    for raw in entries:
        try:
            src = SourceSpec.from_dict(raw)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if src.kind is not None:  # a file the client checked and normalised
            rows: Any = read_jsonl(workdir / BUNDLE_DIR / src.path)
            fmt, columns = src.kind, None
        else:
            rows, fmt, columns = hub_rows(src), "hub", _columns(src)
        out, stats = encode_rows(
            rows, fmt, tokenizer, max_seq_len=train.max_seq_len, loss_on=train.loss_on,
            source=src.path, columns=columns, system_prompt=spec.system_prompt,
        )  # fmt: skip
        encoded.append((src, out, stats))
    try:
        counts = mix_counts([len(r) for _, r, _ in encoded], [s.weight for s, _, _ in encoded])
    except ValueError as exc:
        raise DataError(str(exc)) from None
    mixed: Rows = []
    total: dict[str, Any] = {"rows": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0,
                             "dropped": 0, "sources": []}  # fmt: skip
    for i, ((src, rows_i, stats), k) in enumerate(zip(encoded, counts, strict=True)):
        chosen = pick(len(rows_i), k, train.seed, i)
        mixed += [rows_i[j] for j in chosen]
        share = len(chosen) / len(rows_i) if rows_i else 0.0
        total["rows"] += len(chosen)
        total["tokens"] += sum(len(rows_i[j]["input_ids"]) for j in chosen)
        total["loss_tokens"] += round(stats["loss_tokens"] * share)
        total["truncated"] += round(stats["truncated"] * share)
        total["dropped"] += stats["dropped"]
        total["sources"].append({"source": src.path, "rows": len(rows_i), "taken": len(chosen)})
    return mixed, total


def check_truncation(checks: DataChecksSpec, stats: dict[str, Any], source: str) -> None:
    """Enforce ``data_checks.max_truncated_share`` where only the instance can measure it (hub
    data; the client checked its local files before renting).

    Raises:
        DataError: more rows were cut at ``max_seq_len`` than the threshold allows.
    """
    limit = checks.max_truncated_share
    rows = stats.get("rows", 0) + stats.get("dropped", 0)
    if limit is None or not rows:
        return
    share = stats.get("truncated", 0) / rows
    if share > limit:
        raise DataError(
            f"{source}: {100 * share:.1f}% of {rows:,} rows are over train.max_seq_len and "
            f"would be cut short, over data_checks.max_truncated_share = {limit:g}; raise "
            "train.max_seq_len or the threshold"
        )


def template_used(spec: JobSpecData, tokenizer: Any) -> str:
    """The chat template the run trained with, as metrics record it: the spec's (its name, or
    ``jinja:<hash>``), ``chatml (default)`` for a model without one, else ``model``."""
    if spec.chat_template is not None:
        return template_label(spec.chat_template)
    return "chatml (default)" if tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE else "model"
