"""Readers that turn a dataset file or folder into rows, each tagged with where it came from.

Every reader yields ``(where, row)`` pairs, where ``where`` is the place a person would look
(``data.jsonl:3`` for a physical line, ``data.json:row 3`` for an element of an array). A row
that could not be read at all (malformed JSON, bad UTF-8) is an ``Unreadable`` in its place, so
that problems come out in file order. Nothing is checked for meaning here; that is
``_dataset_formats``'s job, so that every problem of a file is reported in one go.

Readers stream: JSONL and CSV are read a line at a time, Parquet and ``save_to_disk`` folders a
record batch at a time, so memory stays flat whatever the file's size. A ``.json`` file is one
document and is parsed whole.

Reads are bounded: a line longer than the row limit (``LORABURST_MAX_ROW_MB``, 8 MiB by default)
is reported as a problem of its line and skipped without being held in memory, a ``.json``
document over 64 MiB is refused (JSONL streams), and a path that is not a regular file (a
device such as ``/dev/zero``, a FIFO, a socket, whether or not reached through a symlink) is
refused before it is opened for reading.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError

__all__ = ["DATA_SUFFIXES", "Located", "Unreadable", "is_saved_dataset", "read_path", "read_rows"]


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands in for a row that could not be parsed; ``reason`` says why and how to fix it."""

    reason: str


Located = Iterable[tuple[str, Any]]
_Reader = Callable[[Path, str], Located]

# Cells of these CSV columns hold a JSON list (a conversation), since CSV has no nesting.
_JSON_COLUMNS = ("messages", "conversations")
# Rows per Parquet batch: small enough that memory stays flat, large enough to be fast.
_BATCH_ROWS = 4096
# A .json file is parsed whole (Python objects take several times the file's bytes).
MAX_JSON_BYTES = 64 << 20
# Bytes read at a time while skipping the rest of an over-long line.
_SKIP_CHUNK = 1 << 20


def max_row_bytes() -> int:
    """The longest line (row) a reader accepts: ``LORABURST_MAX_ROW_MB`` MiB, default 8.

    8 MiB of text is about two million tokens, twice the longest ``max_seq_len`` there is; a
    longer line is almost always a file that is not one row per line.
    """
    text = os.environ.get("LORABURST_MAX_ROW_MB", "").strip()
    try:
        mb = float(text) if text else 8.0
    except ValueError:
        raise ConfigError(
            f"LORABURST_MAX_ROW_MB={text!r} is not a number of MiB (e.g. 8 or 32)"
        ) from None
    if not 0 < mb < 1 << 20:
        raise ConfigError(f"LORABURST_MAX_ROW_MB={text!r} must be between 0 and 1048576 MiB")
    return int(mb * (1 << 20))


def _too_long(limit: int) -> Unreadable:
    return Unreadable(
        f"line is longer than {limit / (1 << 20):g} MiB, the row limit; split it into shorter "
        "rows (the trainer truncates each row at train.max_seq_len tokens anyway), or raise "
        "the limit with LORABURST_MAX_ROW_MB if the file really holds rows that long"
    )


def _decode(path: Path, name: str) -> str | list[tuple[str, Any]]:
    """The whole file's text (for ``.json``, one document), or a one-row list that says where
    the bad UTF-8 is."""
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        reason = (
            f"a .json file is parsed whole and this one is over {MAX_JSON_BYTES >> 20} MiB; "
            "write it as JSONL, one row a line (e.g. `jq -c '.[]' in.json > in.jsonl`), which "
            "is read a row at a time"
        )
        return [(f"{name}:1", Unreadable(reason))]
    try:
        # utf-8-sig: spreadsheet tools often prepend a BOM that json would reject.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return [(f"{name}:{line}", _bad_utf8(e.start))]


def _bad_utf8(offset: int) -> Unreadable:
    return Unreadable(f"not valid UTF-8 (byte {offset}); re-save the file as UTF-8")


def _lines(path: Path) -> Iterator[tuple[int, str | Unreadable]]:
    """``(line number, text)`` of each physical line, decoded one at a time; a line that is not
    UTF-8 comes as an ``Unreadable`` naming the file offset of its first bad byte, and a line
    over the row limit as one that says so (it is skipped without being held in memory)."""
    limit = max_row_bytes()
    offset = 0
    lineno = 0
    with open(path, "rb") as f:
        while raw := f.readline(limit + 1):
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                # Read on to the end of this line in bounded chunks, keeping none of it.
                while raw and not raw.endswith(b"\n"):
                    offset += len(raw)
                    raw = f.readline(_SKIP_CHUNK)
                offset += len(raw)
                yield lineno, _too_long(limit)
                continue
            # A BOM from a spreadsheet tool would make the first row malformed.
            skip = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            try:
                yield lineno, raw[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _bad_utf8(offset + skip + e.start)
            offset += len(raw)


def _malformed(e: json.JSONDecodeError, hint: str) -> Unreadable:
    return Unreadable(f"malformed JSON: {e.msg} (column {e.colno}); {hint}")


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in _lines(path):
        if isinstance(line, Unreadable):
            yield f"{name}:{lineno}", line
            continue
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            row = _malformed(e, "each line must be one complete JSON object")
        yield f"{name}:{lineno}", row


# Keys that mark a JSON object as one row rather than a wrapper such as {"data": [...]}.
_ROW_KEYS = (
    "messages",
    "conversations",
    "instruction",
    "output",
    "response",
    "question",
    "answer",
    "query",
    "prompt",
    "completion",
    "text",
)


def _read_json(path: Path, name: str) -> Located:
    text = _decode(path, name)
    if not isinstance(text, str):
        return text
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "the file must be a JSON array of row objects (or use .jsonl, one object a line)"
        return [(f"{name}:{e.lineno}", _malformed(e, hint))]
    if isinstance(doc, dict):
        if any(k in doc for k in _ROW_KEYS):
            return [(f"{name}:row 1", doc)]
        lists = sorted(k for k, v in doc.items() if isinstance(v, list))
        if len(lists) != 1:
            found = ", ".join(repr(k) for k in lists) or "none"
            reason = (
                'a JSON object must hold exactly one list of rows (like {"data": [...]}); '
                f"list-valued keys found: {found}"
            )
            return [(f"{name}:1", Unreadable(reason))]
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        reason = f"expected a JSON array of row objects, got {type(doc).__name__}"
        return [(f"{name}:1", Unreadable(reason))]
    return [(f"{name}:row {i}", row) for i, row in enumerate(doc, start=1)]


def _csv_lines(path: Path, bad: list[tuple[int, Unreadable]]) -> Iterator[str]:
    """Decoded lines for ``csv.reader``; the first line that is not UTF-8 ends the input and is
    recorded in ``bad`` (a quoted cell may span lines, so what follows cannot be trusted)."""
    for lineno, line in _lines(path):
        if isinstance(line, Unreadable):
            bad.append((lineno, line))
            return
        yield line


def _read_csv(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    bad: list[tuple[int, Unreadable]] = []
    reader = csv.reader(_csv_lines(path, bad))
    header = [h.strip() for h in next(reader, [])]
    while header:
        # A quoted cell may span lines, so a row starts one line after the previous one ended.
        where = f"{name}:{reader.line_num + 1}"
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            hint = ""
            if "field larger than field limit" in str(e):
                # csv's own bound (128 Ki characters a cell) also stops an unclosed quote from
                # swallowing the rest of the file.
                hint = (
                    f"; a CSV cell holds at most {csv.field_size_limit():,} characters (or a "
                    "quote is never closed): write long rows as JSONL"
                )
            yield where, Unreadable(f"malformed CSV: {e}{hint}")
            break
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            reason = (
                f"has {len(cells)} cells but the header has {len(header)} "
                f"({', '.join(header)}); quote cells that contain commas"
            )
            yield where, Unreadable(reason)
            continue
        yield where, _csv_row(dict(zip(header, cells, strict=True)))
    yield from ((f"{name}:{lineno}", reason) for lineno, reason in bad)


def _csv_row(row: dict[str, Any]) -> dict[str, Any] | Unreadable:
    for col in _JSON_COLUMNS:
        if col in row and row[col].strip():
            try:
                row[col] = json.loads(row[col])
            except json.JSONDecodeError as e:
                return Unreadable(
                    f"column {col!r} is not valid JSON: {e.msg} (column {e.colno}); "
                    "in CSV a conversation is a JSON list in one quoted cell"
                )
    return row


def _pyarrow_missing(e: ImportError) -> ConfigError:
    return ConfigError(
        f"reading Parquet/Arrow datasets needs pyarrow ({e}); run: pip install pyarrow"
    )


def _read_parquet(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise _pyarrow_missing(e) from e
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                i += 1
                yield f"{name}:row {i}", record
    except (pa.ArrowException, OSError) as e:
        yield f"{name}:row {i + 1}", Unreadable(f"not a readable Parquet file: {e}")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_info.json").is_file()
    )


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text("utf-8"))["_data_files"]]
            return [folder / n for n in names]
        except (KeyError, TypeError, ValueError):
            pass  # an unusual state.json: the sorted shard names give the same order
    return sorted(folder.glob("*.arrow"))


def _read_saved(folder: Path, name: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError as e:
        raise _pyarrow_missing(e) from e
    files = _arrow_files(folder)
    if not files:
        raise ConfigError(f"{name}: looks like a save_to_disk folder but holds no *.arrow file")
    return _saved_rows(files, name, pa, ipc)


def _saved_rows(files: list[Path], name: str, pa: Any, ipc: Any) -> Iterator[tuple[str, Any]]:
    i = 0
    for f in files:
        with pa.memory_map(str(f)) as src:
            # datasets writes the Arrow stream format; the file format is accepted for hand-made
            # data. Either way one record batch at a time is in memory.
            try:
                batches: Iterable[Any] = ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = ipc.open_file(src)
                batches = (reader.get_batch(b) for b in range(reader.num_record_batches))
            for batch in batches:
                for record in batch.to_pylist():
                    i += 1
                    yield f"{name}:row {i}", record


_READERS: dict[str, _Reader] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
}
# Suffixes that mark a string as a file path (never a hub id), whether or not it exists.
DATA_SUFFIXES = frozenset(_READERS) | {".arrow", ".tsv", ".txt", ".gz", ".zip", ".xlsx"}


def read_path(path: Path, name: str) -> Located:
    """Read an existing file or ``save_to_disk`` folder.

    Raises:
        ConfigError: the folder is not a saved dataset, the suffix is not supported, or
            pyarrow is needed and missing.
    """
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text("utf-8")).get("splits", [])
            if "train" in splits:
                return _read_saved(path / "train", f"{name}/train")
            raise ConfigError(
                f"{name}: is a DatasetDict without a 'train' split (splits: {splits}); "
                "point at one split's folder instead"
            )
        if is_saved_dataset(path):
            return _read_saved(path, name)
        raise ConfigError(
            f"{name}: is a folder but not a datasets.save_to_disk folder "
            "(no state.json / dataset_info.json); point at a .jsonl/.json/.csv/.parquet file"
        )
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(_READERS))
        raise ConfigError(f"{name}: unsupported file type {path.suffix!r}; use one of {known}")
    _require_regular(path, name)
    return reader(path, name)


def _require_regular(path: Path, name: str) -> None:
    """Refuse devices, FIFOs and sockets: reading ``/dev/zero`` never ends and a FIFO blocks."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to a regular file is fine
    except OSError as e:
        raise ConfigError(f"{name}: cannot read it: {e.strerror or e}", source=name) from e
    if not stat.S_ISREG(mode):
        kind = (
            "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        target = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise ConfigError(
            f"{name}: is {kind}{target}, not a data file; give a .jsonl/.json/.csv/.parquet "
            "file or a save_to_disk folder",
            source=name,
        )


def read_rows(rows: list[Any], name: str = "<rows>") -> Located:
    """Tag an in-memory list of rows with ``<rows>:row n`` (1-based)."""
    return ((f"{name}:row {i}", r) for i, r in enumerate(rows, start=1))
