"""A job's ``dataset`` (or ``eval_dataset``) as the spec gives it — a path, rows, one source with
its column mapping, or a mix of sources — prepared into one ``PreparedDataset``.

Each local source is read, checked and normalised on its own (``prepare_dataset``), with its
mapping, its split slice and its row cap; a hub source is read on the instance, so here it is
only described. A mix's rows and tokens are what the instance will train on: the rows each
source gives (``loraburst.remote.mix``: weights are shares, drawn without repeating a row), and
their tokens in proportion.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from loraburst.remote.columns import columns_for, parse_split
from loraburst.remote.mix import mix_counts

from .._api.spec import DataSource
from .._exceptions import ConfigError
from .dataset import DatasetStats, PreparedDataset, Reading, RowObserver, is_hub_id, prepare_dataset
from .formats import LAYOUT_NAMES

__all__ = ["prepare_field"]


class SourceObserver(RowObserver, Protocol):
    """A ``RowObserver`` that is told which source its next rows come from."""

    def source(self, field: str, name: str) -> None:
        """The rows that follow are ``field``'s source ``name``."""


def prepare_field(
    value: Any,
    *,
    field: str,
    max_seq_len: int,
    tokenizer: str | None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    observer: SourceObserver | None = None,
    pairs: bool = False,
) -> PreparedDataset:
    """Prepare the spec's ``dataset`` or ``eval_dataset`` (``field``); ``pairs``: its rows are
    preference pairs (``objective: dpo``/``orpo``).

    Raises:
        DatasetError: rows that fail their checks, naming file:line.
        ConfigError: a missing file, a mapping that names a field the rows lack (with a
            did-you-mean), a split the source cannot take, weights on some sources only.
    """
    base = Reading(chat_template=chat_template, system_prompt=system_prompt)
    if not isinstance(value, (DataSource, list)) or (
        isinstance(value, list) and not all(isinstance(v, DataSource) for v in value)
    ):
        name = "<rows>" if isinstance(value, list) else os.fspath(value)
        if observer is not None:
            observer.source(field, name)
        return prepare_dataset(
            value, max_seq_len=max_seq_len, tokenizer=tokenizer, field=field, reading=base,
            observer=observer, pairs=pairs,
        )  # fmt: skip
    sources = [value] if isinstance(value, DataSource) else value
    parts = []
    for i, src in enumerate(sources):
        where = field if len(sources) == 1 else f"{field}[{i}]"
        if observer is not None:
            observer.source(where, src.path)
        parts.append(_prepare_source(src, where, base, max_seq_len, tokenizer, observer, pairs))
    if len(parts) == 1 and not parts[0].options:
        return parts[0]  # one local file, its mapping applied: a plain dataset now
    return _mix(parts, sources, field, max_seq_len)


def _prepare_source(
    src: DataSource,
    where: str,
    base: Reading,
    max_seq_len: int,
    tokenizer: str | None,
    observer: SourceObserver | None,
    pairs: bool = False,
) -> PreparedDataset:
    options = src.options()
    path = Path(src.path).expanduser()
    if not path.exists() and is_hub_id(src.path):
        return _hub_source(src, options, max_seq_len)
    if src.config is not None or src.streaming is True:
        raise ConfigError(
            f"{where}: config and streaming apply to hub datasets; {src.path!r} is a local path",
            source=src.path,
        )
    split, start, stop = parse_split(src.split)
    bounds = [b for b in (start, stop) if b is not None]
    if split != "train" or any(b.endswith("%") or b.startswith("-") for b in bounds):
        raise ConfigError(
            f"{where}: split {src.split!r}: a local file is one split; slice it by row number "
            "('train[100:2100]') or cap it with max_rows",
            source=src.path,
        )
    columns = None
    if src.format is not None or src.columns is not None:
        mapping = src.columns.model_dump(exclude_none=True) if src.columns else None
        columns = columns_for(src.format, mapping)
    reading = Reading(
        columns=columns,
        layout=src.format or ("columns" if columns else None),
        start=int(start) if start else None,
        stop=int(stop) if stop else None,
        max_rows=src.max_rows,
        chat_template=base.chat_template,
        system_prompt=base.system_prompt,
    )
    ds = prepare_dataset(
        src.path, max_seq_len=max_seq_len, tokenizer=tokenizer, field=where, reading=reading,
        observer=observer, pairs=pairs,
    )  # fmt: skip
    kept = {"weight": src.weight} if src.weight is not None else {}
    return PreparedDataset(
        source=ds.source, kind=ds.kind, hub_id=None, stats=ds.stats, jsonl_path=ds.jsonl_path,
        sha256=ds.sha256, size=ds.size, options=kept,
    )  # fmt: skip


def _hub_source(src: DataSource, options: dict[str, Any], max_seq_len: int) -> PreparedDataset:
    stats = DatasetStats(
        rows=0, format="hub", tokens=None, tokens_exact=False, max_tokens=None,
        over_max_seq_len=None, chars=0, max_seq_len=max_seq_len,
    )  # fmt: skip
    return PreparedDataset(
        source=src.path, kind="hub", hub_id=src.path, stats=stats, options=options
    )


def _mix(
    parts: list[PreparedDataset],
    sources: list[DataSource],
    field: str,
    max_seq_len: int,
) -> PreparedDataset:
    weights = [s.weight for s in sources]
    local = [p for p in parts if p.kind != "hub"]
    try:
        counts = mix_counts([p.stats.rows for p in local], [p.options.get("weight") for p in local])
        if len(local) < len(parts):
            mix_counts([0] * len(parts), weights)  # every source or none weighted, hub ones too
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    # With a hub source in a weighted mix, the shares depend on its size: known on the
    # instance. The local sources' full counts stand in for the estimate.
    if len(local) < len(parts):
        counts = [p.stats.rows for p in local]
    rows = tokens = over = chars = 0
    for p, k in zip(local, counts, strict=True):
        share = k / p.stats.rows if p.stats.rows else 0.0
        rows += k
        tokens += round((p.stats.tokens or 0) * share)
        over += round((p.stats.over_max_seq_len or 0) * share)
        chars += round(p.stats.chars * share)
    exact = all(p.stats.tokens_exact for p in local) and all(
        k == p.stats.rows for p, k in zip(local, counts, strict=True)
    )
    taken = ", ".join(
        f"{Path(p.source).name} ({LAYOUT_NAMES.get(p.stats.format, p.stats.format)}) "
        f"{k:,} of {p.stats.rows:,}"
        for p, k in zip(local, counts, strict=True)
    )
    hub = [p.hub_id for p in parts if p.kind == "hub"]
    detail = f"; mix of {len(parts)} sources: {taken}" if local else f"; mix of {len(parts)}"
    if hub:
        detail += f"; hub source(s) {', '.join(map(str, hub))} counted on the instance"
    stats = DatasetStats(
        rows=rows,
        format="mix",
        tokens=tokens if local else None,
        tokens_exact=exact,
        max_tokens=max((p.stats.max_tokens or 0 for p in local), default=None),
        over_max_seq_len=over,
        chars=chars,
        max_seq_len=max_seq_len,
        detail=detail,
    )
    digest = hashlib.sha256(
        json.dumps(
            [[p.sha256 or p.hub_id, dict(p.options)] for p in parts], sort_keys=True
        ).encode()
    ).hexdigest()
    return PreparedDataset(
        source=f"{field} (mix)",
        kind="mix",
        hub_id=None,
        stats=stats,
        sha256=digest,
        parts=tuple(parts),
    )
