"""Readers that turn a dataset file or folder into rows, each tagged with where it came from.

Every reader returns a list of ``(where, row)`` pairs, where ``where`` is the place a person
would look (``data.jsonl:3`` for a physical line, ``data.json:row 3`` for an element of an
array). A row that could not be read at all (malformed JSON, bad UTF-8) is an ``Unreadable`` in
its place, so that problems come out in file order. Nothing is checked for meaning here; that is
``_dataset_formats``'s job, so that every problem of a file is reported in one go.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError

__all__ = ["DATA_SUFFIXES", "Located", "Unreadable", "is_saved_dataset", "read_path", "read_rows"]


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands in for a row that could not be parsed; ``reason`` says why and how to fix it."""

    reason: str


Located = list[tuple[str, Any]]
_Reader = Callable[[Path, str], Located]

# Cells of these CSV columns hold a JSON list (a conversation), since CSV has no nesting.
_JSON_COLUMNS = ("messages", "conversations")


def _decode(path: Path, name: str) -> str | Located:
    """The file's text, or a one-row ``Located`` that says where the bad UTF-8 is."""
    data = path.read_bytes()
    try:
        # utf-8-sig: spreadsheet tools often prepend a BOM that json would reject.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        reason = f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        return [(f"{name}:{line}", Unreadable(reason))]


def _malformed(e: json.JSONDecodeError, hint: str) -> Unreadable:
    return Unreadable(f"malformed JSON: {e.msg} (column {e.colno}); {hint}")


def _read_jsonl(path: Path, name: str) -> Located:
    text = _decode(path, name)
    if not isinstance(text, str):
        return text
    rows: Located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            row = _malformed(e, "each line must be one complete JSON object")
        rows.append((f"{name}:{lineno}", row))
    return rows


# Keys that mark a JSON object as one row rather than a wrapper such as {"data": [...]}.
_ROW_KEYS = ("messages", "conversations", "instruction", "output", "prompt", "completion", "text")


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


def _read_csv(path: Path, name: str) -> Located:
    text = _decode(path, name)
    if not isinstance(text, str):
        return text
    rows: Located = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    while header:
        # A quoted cell may span lines, so a row starts one line after the previous one ended.
        where = f"{name}:{reader.line_num + 1}"
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((where, Unreadable(f"malformed CSV: {e}")))
            break
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            reason = (
                f"has {len(cells)} cells but the header has {len(header)} "
                f"({', '.join(header)}); quote cells that contain commas"
            )
            rows.append((where, Unreadable(reason)))
            continue
        rows.append((where, _csv_row(dict(zip(header, cells, strict=True)))))
    return rows


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


def _read_parquet(path: Path, name: str) -> Located:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise _pyarrow_missing(e) from e
    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        return [(f"{name}:row 1", Unreadable(f"not a readable Parquet file: {e}"))]
    return [(f"{name}:row {i}", r) for i, r in enumerate(records, start=1)]


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


def _read_saved(folder: Path, name: str) -> Located:
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError as e:
        raise _pyarrow_missing(e) from e
    files = _arrow_files(folder)
    if not files:
        raise ConfigError(f"{name}: looks like a save_to_disk folder but holds no *.arrow file")
    records: list[Any] = []
    for f in files:
        # datasets writes the Arrow stream format; the file format is accepted for hand-made data.
        try:
            with pa.memory_map(str(f)) as src:
                table = ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(f)) as src:
                table = ipc.open_file(src).read_all()
        records += table.to_pylist()
    return [(f"{name}:row {i}", r) for i, r in enumerate(records, start=1)]


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
    return reader(path, name)


def read_rows(rows: list[Any], name: str = "<rows>") -> Located:
    """Tag an in-memory list of rows with ``<rows>:row n`` (1-based)."""
    return [(f"{name}:row {i}", r) for i, r in enumerate(rows, start=1)]
