"""Datasets: read any supported source, check every row before anything runs, normalise, count.

``prepare_dataset`` is the one entry point. It reads JSONL, JSON, CSV, Parquet, a
``datasets.save_to_disk`` folder or an in-memory list of dicts (``_dataset_read``), detects the
row format and checks every row, collecting *all* problems into one ``DatasetError``
(``_dataset_formats``), and counts tokens exactly when the model's tokenizer is on disk, else
estimates them and says so (``_dataset_tokens``). A hub id is not loaded here: the instance loads
it, so its size is unknown until then.

It streams: rows are read, checked, normalised and counted one at a time, and the normalised
JSONL is spilled to ``$LORABURST_HOME/datasets/<sha256>.jsonl`` (content-addressed, so the same
rows are stored once) from where the bundle streams it. Memory stays flat for JSONL, CSV,
Parquet and ``save_to_disk`` sources; a ``.json`` file is one document and is parsed whole.

torch, transformers and pyarrow are imported only inside the functions that need them, so that
``import loraburst`` stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from loraburst.remote.columns import Columns, with_system

from .._exceptions import ConfigError, DatasetError
from .._state.disk import local_io
from .._state.home import home
from .formats import KIND_OF_FORMAT, LAYOUT_NAMES, RowChecker
from .preference import PreferenceChecker
from .read import DATA_SUFFIXES, Located, read_path, read_rows
from .tokens import TokenTally, count_tokens

__all__ = [
    "DatasetStats",
    "PreparedDataset",
    "Reading",
    "RowObserver",
    "count_tokens",
    "is_hub_id",
    "prepare_dataset",
]

# org/name or name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What a dataset holds, as the trainer will see it.

    Attributes:
        rows: number of rows (0 for a hub dataset: unknown until loaded on the instance).
        format: detected format: ``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion``,
            ``text``, ``preference`` (pairs; counts are per pair, both sequences) or ``hub``.
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
    detail: str = ""
    lengths: Sequence[int] | None = dataclasses.field(default=None, repr=False, compare=False)
    """Every row's token count, in file order (None for a hub dataset)."""

    def describe(self) -> str:
        """One human line, e.g. ``120 rows (messages), ~34,512 tokens (estimated), ...``."""
        if self.format == "hub" or self.tokens is None:
            return "hub dataset: rows and tokens unknown until it is loaded on the instance"
        approx = "" if self.tokens_exact else "~"
        how = "exact" if self.tokens_exact else "estimated"
        unit = "pairs" if self.format == "preference" else "rows"
        layout = LAYOUT_NAMES.get(self.format, self.format)
        line = (
            f"{self.rows:,} {unit} ({layout}), {approx}{self.tokens:,} tokens ({how}), "
            f"longest {approx}{self.max_tokens or 0:,}"
        )
        if self.over_max_seq_len:
            over = "twice max_seq_len" if unit == "pairs" else "max_seq_len"
            line += (
                f"; {self.over_max_seq_len:,} {unit} over {over} {self.max_seq_len:,} "
                "will be truncated"
            )
        return line + self.detail


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A checked, normalised dataset ready to go into a bundle.

    The rows are not held in memory: they are in ``jsonl_path``, one normalised row a line
    (sorted keys, UTF-8, ``\\n``-terminated), so the same rows always give the same bytes and
    the same ``sha256``.

    Attributes:
        source: display name: the path as given, ``"<rows>"``, or the hub id.
        kind: ``"messages"``, ``"prompt_completion"``, ``"text"``, ``"preference"`` or ``"hub"``.
        hub_id: the hub id when ``kind == "hub"``, else None.
        stats: rows, tokens and lengths.
        jsonl_path: ``$LORABURST_HOME/datasets/<sha256>.jsonl`` (None for a hub dataset).
        sha256: hex digest of that file's bytes (None for a hub dataset; for a mix, of its
            parts' digests and options).
        size: that file's size in bytes (0 for a hub dataset).
        options: how the instance reads it, for a source with settings (a hub dataset's
            config, split, columns; a weight in a mix); empty for a plain file.
        parts: a mix's sources (``kind == "mix"``), each a PreparedDataset of its own.
    """

    source: str
    kind: str
    hub_id: str | None
    stats: DatasetStats
    jsonl_path: Path | None = None
    sha256: str | None = None
    size: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    parts: tuple[PreparedDataset, ...] = ()

    def open(self) -> IO[bytes]:
        """The normalised JSONL for reading (empty for a hub dataset); close it when done.

        Raises:
            ConfigError: the cached file was deleted since the dataset was prepared.
        """
        if self.jsonl_path is None:
            return io.BytesIO(b"")
        try:
            return open(self.jsonl_path, "rb")
        except FileNotFoundError:
            raise ConfigError(
                f"{self.source}: its normalised copy {self.jsonl_path} is gone (was "
                f"$LORABURST_HOME cleaned?); prepare the dataset again",
                source=self.source,
            ) from None

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """The normalised rows, one at a time (nothing for a hub dataset)."""
        with self.open() as f:
            for line in f:
                row: dict[str, Any] = json.loads(line)
                yield row


class _Spill:
    """Writes normalised rows to a temp file under ``datasets/``, hashing as it goes; ``keep``
    renames it to ``<sha256>.jsonl`` and ``discard`` deletes it."""

    def __init__(self) -> None:
        self.folder = home() / "datasets"
        with local_io(self.folder):
            self.folder.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".spill-", suffix=".jsonl")
        self.tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        with local_io(self.tmp):
            self._f.write(line)
        self._sha.update(line)
        self.size += len(line)

    def keep(self) -> tuple[Path, str]:
        digest = self._sha.hexdigest()
        final = self.folder / f"{digest}.jsonl"
        with local_io(self.tmp):
            self._f.close()
            os.replace(self.tmp, final)
        return final, digest

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails on a full disk
            self._f.close()
        self.tmp.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How to read a source's rows (a ``DataSource``'s settings, resolved).

    Attributes:
        columns: the columns to read (a mapping or a forced layout); None detects the layout.
        layout: the name ``validate`` reports for ``columns``.
        start, stop: the rows of the file to read (a split slice such as ``train[:2000]``).
        max_rows: keep at most this many rows.
        chat_template: the spec's template, for exact token counts.
        system_prompt: the spec's default system turn, given to conversations without one.
    """

    columns: Columns | None = None
    layout: str | None = None
    start: int | None = None
    stop: int | None = None
    max_rows: int | None = None
    chat_template: str | None = None
    system_prompt: str | None = None


class RowObserver(Protocol):
    """Sees every row as it is checked (the data report, ``report.py``)."""

    def row(self, where: str, row: dict[str, Any], counted: bool) -> None:
        """A normalised row that passed its checks; ``counted`` when its token count will
        follow (rows after the dataset's first problem are checked but not counted)."""

    def rejected(self, where: str, empty_answer: bool) -> None:
        """A row that failed its checks; ``empty_answer`` when its answer is blank."""

    def counts(self, counts: list[int]) -> None:
        """Token counts of the latest rows passed to ``row``, in order."""


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
    return PreparedDataset(source=hub_id, kind="hub", hub_id=hub_id, stats=stats)


def prepare_dataset(
    source: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    max_seq_len: int = 2048,
    tokenizer: str | None = None,
    field: str = "dataset",
    pairs: bool = False,
    reading: Reading | None = None,
    observer: RowObserver | None = None,
) -> PreparedDataset:
    """Read, check, normalise and measure a dataset.

    Args:
        source: a path to a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a
            ``save_to_disk`` folder, a list of row dicts, or a hub id (``org/name``).
        max_seq_len: rows with more tokens than this are counted in ``over_max_seq_len``.
        tokenizer: a local folder or a hub id in the local HF cache, for exact token counts;
            anything else (or None) gives estimates.
        field: the spec field being prepared, used in error messages (``eval_dataset``).
        pairs: rows are preference pairs (``objective: dpo``/``orpo``; see ``preference``).
        reading: a source's column mapping, row window and template (default: detect).
        observer: sees every row (the data report).

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
    reading = reading or Reading()
    if reading.start is not None or reading.stop is not None:
        located = itertools.islice(located, reading.start or 0, reading.stop)
    return _stream(located, name, max_seq_len, tokenizer, reading, observer, pairs)


def _stream(
    located: Located,
    name: str,
    max_seq_len: int,
    tokenizer: str | None,
    reading: Reading,
    observer: RowObserver | None,
    pairs: bool = False,
) -> PreparedDataset:
    """Check, normalise, spill and count in one pass over ``located``."""
    checker: RowChecker | PreferenceChecker = (
        PreferenceChecker() if pairs else RowChecker(reading.columns, reading.layout)
    )
    tally: TokenTally | None = None
    rows = 0
    spill = _Spill()
    try:
        for where, row in located:
            if reading.max_rows is not None and rows >= reading.max_rows:
                break
            before = len(checker.problems)
            normalised = checker.check(where, row)
            if normalised is not None and reading.system_prompt:
                normalised = with_system(normalised, reading.system_prompt)
            if observer is not None:
                if normalised is not None:
                    observer.row(where, normalised, not checker.problems)
                elif len(checker.problems) > before:
                    observer.rejected(where, checker.empty_answer)
            # After the first problem the job will not run: keep checking, stop the rest.
            if normalised is None or checker.problems:
                continue
            if tally is None:
                assert checker.format is not None
                # A pair is two sequences of up to max_seq_len each (counted together).
                limit = max_seq_len * (2 if pairs else 1)
                kind = reading.columns.kind if reading.columns else KIND_OF_FORMAT[checker.format]
                tally = TokenTally(
                    kind,
                    tokenizer,
                    limit,
                    chat_template=reading.chat_template,
                    on_counts=observer.counts if observer is not None else None,
                )
            spill.write(normalised)
            tally.add(normalised)
            rows += 1
        problems = checker.problems
        if not problems and not rows and checker.format is None:
            problems = [f"{name}: dataset is empty (no rows); add at least one row"]
        if problems or checker.format is None or tally is None:
            raise DatasetError(problems, source=name)
        sums, exact = tally.result()
        path, digest = spill.keep()
    except BaseException:
        spill.discard()
        raise
    stats = DatasetStats(
        rows=rows,
        format=checker.format,
        tokens=sums.total,
        tokens_exact=exact,
        max_tokens=sums.longest,
        over_max_seq_len=sums.over,
        chars=tally.chars,
        max_seq_len=max_seq_len,
        lengths=sums.lengths,
    )
    return PreparedDataset(
        source=name,
        kind=tally.kind,
        hub_id=None,
        stats=stats,
        jsonl_path=path,
        sha256=digest,
        size=spill.size,
    )
