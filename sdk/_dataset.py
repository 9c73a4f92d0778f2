"""Datasets: read any supported source, check every row before anything runs, normalise, count.

``prepare_dataset`` is the one entry point. It reads JSONL, JSON, CSV, Parquet, a
``datasets.save_to_disk`` folder or an in-memory list of dicts (``_dataset_read``), detects the
row format and checks every row, collecting *all* problems into one ``DatasetError``
(``_dataset_formats``), and counts tokens exactly when the model's tokenizer is on disk, else
estimates them and says so (``_dataset_tokens``). A hub id is not loaded here: the instance loads
it, so its size is unknown until then.

torch, transformers and pyarrow are imported only inside the functions that need them, so that
``import loraburst`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from ._dataset_formats import KIND_OF_FORMAT, check_rows
from ._dataset_read import DATA_SUFFIXES, read_path, read_rows
from ._dataset_tokens import count_tokens, row_chars
from ._exceptions import ConfigError, DatasetError

__all__ = ["DatasetStats", "PreparedDataset", "count_tokens", "is_hub_id", "prepare_dataset"]

# org/name or name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What a dataset holds, as the trainer will see it.

    Attributes:
        rows: number of rows (0 for a hub dataset: unknown until loaded on the instance).
        format: detected format: ``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion``,
            ``text`` or ``hub``.
        tokens: total tokens (None for a hub dataset).
        tokens_exact: True only when counted with the model's real tokenizer.
        max_tokens: tokens of the longest row (None for a hub dataset).
        over_max_seq_len: rows longer than ``max_seq_len``; they will be truncated.
        chars: characters of text over all rows.
        max_seq_len: the limit ``over_max_seq_len`` was counted against.
    """

    rows: int
    format: str
    tokens: int | None
    tokens_exact: bool
    max_tokens: int | None
    over_max_seq_len: int | None
    chars: int
    max_seq_len: int = 2048

    def describe(self) -> str:
        """One human line, e.g. ``120 rows (messages), ~34,512 tokens (estimated), ...``."""
        if self.format == "hub" or self.tokens is None:
            return "hub dataset: rows and tokens unknown until it is loaded on the instance"
        approx = "" if self.tokens_exact else "~"
        how = "exact" if self.tokens_exact else "estimated"
        line = (
            f"{self.rows:,} rows ({self.format}), {approx}{self.tokens:,} tokens ({how}), "
            f"longest {approx}{self.max_tokens or 0:,}"
        )
        if self.over_max_seq_len:
            line += (
                f"; {self.over_max_seq_len:,} rows over max_seq_len {self.max_seq_len:,} "
                "will be truncated"
            )
        return line


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A checked, normalised dataset ready to go into a bundle.

    Attributes:
        source: display name: the path as given, ``"<rows>"``, or the hub id.
        kind: ``"messages"``, ``"prompt_completion"``, ``"text"`` or ``"hub"``.
        rows: normalised rows (empty for a hub dataset).
        hub_id: the hub id when ``kind == "hub"``, else None.
        stats: rows, tokens and lengths.
    """

    source: str
    kind: str
    rows: tuple[dict[str, Any], ...]
    hub_id: str | None
    stats: DatasetStats

    def to_jsonl_bytes(self) -> bytes:
        """The rows as JSONL: sorted keys, one ``\\n``-terminated line each, UTF-8.

        The same rows always give the same bytes, so the bundle's sha256 is stable.
        """
        return b"".join(
            json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
            for r in self.rows
        )


def is_hub_id(text: str) -> bool:
    """Whether a string that is not an existing path should be read as a hub dataset id."""
    return bool(_HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in DATA_SUFFIXES


def _hub(hub_id: str, max_seq_len: int) -> PreparedDataset:
    stats = DatasetStats(
        rows=0,
        format="hub",
        tokens=None,
        tokens_exact=False,
        max_tokens=None,
        over_max_seq_len=None,
        chars=0,
        max_seq_len=max_seq_len,
    )
    return PreparedDataset(source=hub_id, kind="hub", rows=(), hub_id=hub_id, stats=stats)


def prepare_dataset(
    source: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    max_seq_len: int = 2048,
    tokenizer: str | None = None,
    field: str = "dataset",
) -> PreparedDataset:
    """Read, check, normalise and measure a dataset.

    Args:
        source: a path to a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a
            ``save_to_disk`` folder, a list of row dicts, or a hub id (``org/name``).
        max_seq_len: rows with more tokens than this are counted in ``over_max_seq_len``.
        tokenizer: a local folder or a hub id in the local HF cache, for exact token counts;
            anything else (or None) gives estimates.
        field: the spec field being prepared, used in error messages (``eval_dataset``).

    Returns:
        The normalised rows and their stats.

    Raises:
        DatasetError: one or more rows are invalid, or there are no rows; lists every problem.
        ConfigError: the path does not exist, or its type is not supported.
    """
    if isinstance(source, list):
        name = "<rows>"
        located = read_rows(source, name)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        path = Path(name).expanduser()
        if not path.exists():
            if isinstance(source, str) and is_hub_id(source):
                return _hub(source, max_seq_len)
            raise ConfigError(
                f"{field}: {name!r} does not exist (relative to {os.getcwd()}); give a "
                ".jsonl/.json/.csv/.parquet file, a save_to_disk folder or a hub id like 'org/name'",
                source=name,
            )
        located = read_path(path, name)
    else:
        raise ConfigError(
            f"{field}: expected a path, a hub id or a list of row dicts, got {type(source).__name__}"
        )
    fmt, rows, problems = check_rows(located)
    if not located:
        problems.append(f"{name}: dataset is empty (no rows); add at least one row")
    if problems or fmt is None:
        raise DatasetError(problems, source=name)
    kind = KIND_OF_FORMAT[fmt]
    counts, exact = count_tokens(rows, kind, tokenizer)
    stats = DatasetStats(
        rows=len(rows),
        format=fmt,
        tokens=sum(counts),
        tokens_exact=exact,
        max_tokens=max(counts),
        over_max_seq_len=sum(c > max_seq_len for c in counts),
        chars=sum(row_chars(r) for r in rows),
        max_seq_len=max_seq_len,
    )
    return PreparedDataset(source=name, kind=kind, rows=tuple(rows), hub_id=None, stats=stats)
