"""The data report: what is in the data, and what is wrong with it, before any money is spent.

Built while the rows are checked (``prepare_dataset`` feeds it each row, as a ``RowObserver``),
so the data is read once:

* rows and tokens per source, and the length histogram against ``train.max_seq_len`` with the
  share of rows that will be cut short;
* exact duplicate rows, and near duplicates (word 5-gram MinHash, densified one-permutation
  hashing, banded for lookup and checked against ``near_duplicate_similarity``), within the
  training data and between it and the eval data;
* empty or whitespace-only answers, answers that repeat the prompt, control characters and
  encoding damage (UTF-8 read as Latin-1: ``Ã©``, ``â€™``; the replacement character).

Every finding keeps a few ``file:line`` examples. Memory stays flat: the hashes live in a SQLite
file under ``$LORABURST_HOME/tmp`` (deleted when the report is done), and each finding keeps its
count and at most ``EXAMPLES`` examples. The spec's ``data_checks`` thresholds turn findings
into a ``DatasetError``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import hashlib
import json
import operator
import re
import sqlite3
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._api.spec import DataChecks
from .._exceptions import DatasetError
from .._state.disk import local_io, storage_error
from .._state.home import home

__all__ = ["REPORT_FILE", "DataReport", "Finding", "ReportBuilder"]

EXAMPLES = 5
REPORT_FILE = "data_report.json"
_PERM = 64  # MinHash buckets
_BANDS, _ROWS = 16, 4  # 16 bands of 4: pairs above ~0.5 similarity become candidates
_CANDIDATES = 64  # candidates compared per row (a common band cannot blow up)
_SHINGLE = 5
_MAX_WORDS = 4096  # words of a row that are shingled: bounds the cost of a very long row
_VALUE_BITS = 26  # a 32-bit gram hash: 6 bits of bucket, 26 of value
_VALUE_MASK = (1 << _VALUE_BITS) - 1
_EMPTY = 1 << 32
_WORD = re.compile(r"\w+")
# Control characters other than tab and newlines; UTF-8 decoded as Latin-1/CP-1252 ("Ã©" for
# "é", "â€™" for "’"); and U+FFFD where a decoder gave up.
_DAMAGE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|[ÃÂ][\u0080-\u00bf]|â€|\ufffd")
# Byte tables for ASCII text: lower-case word characters kept, every other byte a space; and
# the bytes that cannot start a damage match (printable ASCII, tab, CR, LF).
_ASCII_WORDS = bytes(
    c if c < 128 and (chr(c).isalnum() or c == ord("_")) else ord(" ") for c in range(256)
).lower()
_ASCII_CLEAN = bytes([9, 10, 13, *range(32, 127)])


@dataclasses.dataclass
class Finding:
    """One kind of problem: how many rows have it, and where the first few are.

    Attributes:
        name: ``duplicates``, ``near_duplicates``, ``eval_overlap``, ``truncated``,
            ``empty_answers``, ``echoes``, ``damaged``.
        title: what it means, in words.
        count: rows with it.
        of: the rows it is a share of.
        examples: ``file:line`` (with detail) of the first ``EXAMPLES`` rows.
    """

    name: str
    title: str
    count: int = 0
    of: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    @property
    def share(self) -> float:
        """``count / of`` (0 when there are no rows)."""
        return self.count / self.of if self.of else 0.0


@dataclasses.dataclass
class DataReport:
    """The finished report.

    Attributes:
        sources: per source: ``field``, ``source``, ``rows``, ``tokens``.
        histogram: ``(label, rows)`` of the training rows' token lengths; the last bucket is
            the rows over ``max_seq_len``.
        max_seq_len: the limit rows are measured against.
        findings: each kind of problem, by name.
        violations: the ``data_checks`` thresholds the findings exceed.
    """

    sources: list[dict[str, Any]]
    histogram: list[tuple[str, int]]
    max_seq_len: int
    findings: dict[str, Finding]
    violations: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (written to the run's folder)."""
        return {
            "sources": self.sources,
            "histogram": [{"tokens": label, "rows": n} for label, n in self.histogram],
            "max_seq_len": self.max_seq_len,
            "findings": {
                k: dataclasses.asdict(f) | {"share": f.share} for k, f in self.findings.items()
            },
            "violations": self.violations,
        }

    def save(self, folder: Path) -> Path:
        """Write ``data_report.json`` into ``folder`` (a run's folder); return its path."""
        from loraburst.remote.protocol import write_atomic

        path = folder / REPORT_FILE
        write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def summary(self) -> str:
        """One line: the findings that are not zero."""
        parts = [
            f"{f.count:,} {f.name.replace('_', ' ')}" for f in self.findings.values() if f.count
        ]
        return "data report: " + (", ".join(parts) if parts else "no findings")

    def lines(self) -> list[str]:
        """The report for a terminal, one line each."""
        out = ["data report"]
        for s in self.sources:
            tokens = f", {s['tokens']:,} tokens" if s["tokens"] else ""
            out.append(f"  {s['field']}: {s['source']}: {s['rows']:,} rows{tokens}")
        total = sum(n for _, n in self.histogram)
        if total:
            out.append(f"  token lengths (max_seq_len {self.max_seq_len:,}):")
            for label, n in self.histogram:
                bar = "#" * round(40 * n / total)
                out.append(f"    {label:>14} {n:>8,}  {bar}")
        for f in self.findings.values():
            share = f" ({100 * f.share:.1f}% of {f.of:,})" if f.of else ""
            out.append(f"  {f.title}: {f.count:,}{share}")
            out += [f"      {e}" for e in f.examples]
        out += [f"  THRESHOLD EXCEEDED: {v}" for v in self.violations]
        return out

    def enforce(self) -> None:
        """Raise when a ``data_checks`` threshold is exceeded.

        Raises:
            DatasetError: one problem per threshold, with the finding's examples.
        """
        if self.violations:
            raise DatasetError(self.violations, source="data_checks")


def _words(text: str) -> list[str] | list[bytes]:
    """The words of ``text``, lower-cased: ``\\w+`` runs, at most ``_MAX_WORDS``.

    ASCII text (most rows) is split as bytes, which is the same split (ASCII ``\\w`` is
    ``[A-Za-z0-9_]``) without the regex, and whose words hash without encoding each gram.
    """
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).split()[:_MAX_WORDS]
    return _WORD.findall(text.lower())[:_MAX_WORDS]


def _damage(text: str) -> re.Match[str] | None:
    """The first control character or sign of encoding damage in ``text``, or None."""
    # In ASCII text only the control characters can match: when deleting the printable
    # characters (and tab, CR, LF) leaves nothing, the regex would find nothing.
    if text.isascii() and not text.encode().translate(None, _ASCII_CLEAN):
        return None
    return _DAMAGE.search(text)


def _text(row: dict[str, Any]) -> str:
    """All of a row's text: SFT rows and preference pairs (prompt, chosen, rejected; each a
    string or a conversation) alike."""
    parts: list[str] = []
    for key in ("messages", "prompt", "completion", "chosen", "rejected", "text"):
        value = row.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [str(m.get("content", "")) for m in value if isinstance(m, dict)]
    return "\n".join(parts)


def _signature(words: list[str] | list[bytes]) -> list[int] | None:
    """Densified one-permutation MinHash of the row's word 5-grams (None: no words).

    Each 5-gram (its words joined by a space, UTF-8) is hashed once (CRC-32); the top 6 bits
    pick its bucket and the bucket keeps its smallest value. Sorting the hashes puts every
    bucket's minimum first in its run, so 64 bisections find them: the per-gram work stays in
    C. Words given as bytes (ASCII rows) are the same words already encoded.
    """
    if not words:
        return None
    # The shifted lists end at different lengths on purpose: zip stops at the last gram.
    shifted = zip(*(words[i:] for i in range(_SHINGLE)), strict=False)
    if isinstance(words[0], bytes):
        grams: Iterable[bytes] = (
            map(b" ".join, shifted) if len(words) >= _SHINGLE else [b" ".join(words)]
        )
    else:
        joined = map(" ".join, shifted) if len(words) >= _SHINGLE else [" ".join(words)]
        grams = map(str.encode, joined)
    hashes = sorted(map(zlib.crc32, grams))
    sig = [_EMPTY] * _PERM
    for b in range(_PERM):
        i = bisect.bisect_left(hashes, b << _VALUE_BITS)
        if i < len(hashes) and hashes[i] >> _VALUE_BITS == b:
            sig[b] = hashes[i] & _VALUE_MASK
    if _EMPTY not in sig:  # every bucket filled (any row of a few hundred words)
        return sig
    # Densify: an empty bucket borrows the next filled one's value (circularly, offset by the
    # distance), so that short rows still compare bucket by bucket.
    orig = list(sig)
    nxt = -1
    for b in range(2 * _PERM - 1, -1, -1):
        if orig[b % _PERM] != _EMPTY:
            nxt = b
        elif b < _PERM:
            sig[b] = (orig[nxt % _PERM] + (nxt - b) * 0x9E3779B1) & _VALUE_MASK
    return sig


def _similarity(a: list[int], b: list[int]) -> float:
    same: int = sum(map(operator.eq, a, b))
    return same / _PERM


def _pack(sig: list[int]) -> bytes:
    return struct.pack(f"<{_PERM}I", *sig)


def _unpack(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{_PERM}I", blob))


def _bands(sig: list[int]) -> list[int]:
    # Tuples of ints hash the same in every process (only str and bytes hashes are salted).
    return [hash((band, *sig[band * _ROWS : (band + 1) * _ROWS])) for band in range(_BANDS)]


def _echo(row: dict[str, Any]) -> bool:
    """Whether an answer repeats its prompt (the same text, or the prompt and little more)."""

    def same(prompt: str, answer: str) -> bool:
        p, a = " ".join(prompt.split()).lower(), " ".join(answer.split()).lower()
        return bool(p) and (a == p or (len(p) >= 20 and a.startswith(p) and len(a) < 1.2 * len(p)))

    if "messages" in row:
        turns = row["messages"]
        return any(
            t["role"] == "assistant" and i and turns[i - 1]["role"] == "user"
            and same(turns[i - 1]["content"], t["content"])
            for i, t in enumerate(turns)
        )  # fmt: skip
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return same(row["prompt"], row["completion"])
    return False


class ReportBuilder:
    """Builds a ``DataReport`` from the rows ``prepare_dataset`` checks (a ``SourceObserver``).

    Use as a context manager, or call ``close`` (``finish`` does): it owns a temporary SQLite
    file.

    Args:
        max_seq_len: the length rows are measured against.
        checks: the spec's thresholds (``data_checks``).
    """

    def __init__(self, max_seq_len: int, checks: DataChecks | None = None) -> None:
        self.max_seq_len = max_seq_len
        self.checks = checks or DataChecks.model_validate({})
        # The hash store is opened with the first row: a dataset that fails before it (a
        # missing file, a full disk under the spill) never creates it.
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._conn: sqlite3.Connection | None = None
        self.sources: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._eval = False
        self._pending: deque[str] = deque()
        edges, e = [], 64
        while e < max_seq_len:
            edges.append(e)
            e *= 2
        self._edges = [*edges, max_seq_len]
        self._hist = [0] * (len(self._edges) + 1)
        self.findings = {
            f.name: f
            for f in (
                Finding("duplicates", "exact duplicate rows (training data)"),
                Finding("near_duplicates", "near-duplicate rows (training data)"),
                Finding("eval_overlap", "eval rows that duplicate a training row"),
                Finding("truncated", f"rows over max_seq_len {max_seq_len:,} (cut short)"),
                Finding("empty_answers", "empty or whitespace-only answers (errors)"),
                Finding("echoes", "answers that repeat the prompt"),
                Finding("damaged", "control characters or encoding damage"),
            )
        }

    # -- RowObserver -----------------------------------------------------------------------
    def source(self, field: str, name: str) -> None:
        """The rows that follow come from ``field``'s source ``name``."""
        self._current = {"field": field, "source": name, "rows": 0, "tokens": 0}
        self.sources.append(self._current)
        self._eval = field.startswith("eval")
        self._pending.clear()

    def row(self, where: str, row: dict[str, Any], counted: bool) -> None:
        """A checked, normalised row."""
        if self._current is None:
            self.source("dataset", where.rsplit(":", 1)[0])
        assert self._current is not None
        self._current["rows"] += 1
        if counted:
            self._pending.append(where)
        text = _text(row)
        m = _damage(text)
        if m is not None:
            self.findings["damaged"].add(f"{where}: {m.group()!r} at character {m.start()}")
        if _echo(row):
            self.findings["echoes"].add(where)
        self._dedupe(where, row, text)

    def rejected(self, where: str, empty_answer: bool) -> None:
        """A row that failed its checks."""
        if empty_answer:
            self.findings["empty_answers"].add(where)

    def counts(self, counts: list[int]) -> None:
        """Token counts of the latest counted rows, in order."""
        assert self._current is not None
        for n in counts:
            where = self._pending.popleft() if self._pending else "?"
            self._current["tokens"] += n
            if self._eval:
                continue
            bucket = next((i for i, e in enumerate(self._edges) if n <= e), len(self._edges))
            self._hist[bucket] += 1
            if n > self.max_seq_len:
                self.findings["truncated"].add(f"{where}: {n:,} tokens")

    # -- duplicates ------------------------------------------------------------------------
    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            folder = home() / "tmp"
            with local_io(folder):
                folder.mkdir(parents=True, exist_ok=True)
                self._dir = tempfile.TemporaryDirectory(dir=folder, prefix="report-")
            self._conn = sqlite3.connect(Path(self._dir.name) / "hashes.db")
            self._conn.executescript(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                "CREATE TABLE exact (hash BLOB PRIMARY KEY, at TEXT);"
                "CREATE TABLE sig (id INTEGER PRIMARY KEY, at TEXT, sig BLOB);"
                "CREATE TABLE band (key INTEGER, id INTEGER);"
                "CREATE INDEX band_key ON band (key);"
            )
        return self._conn

    def _dedupe(self, where: str, row: dict[str, Any], text: str) -> None:
        try:
            self._store(where, row, text)
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "disk is full" not in text and "disk I/O error" not in text:
                raise
            full = OSError(errno.ENOSPC, f"the data report's hash store: {exc}")
            raise storage_error(full, home() / "tmp") from exc

    def _store(self, where: str, row: dict[str, Any], text: str) -> None:
        db = self._db
        digest = hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=16).digest()
        # A training row is recorded at once (the near-duplicate lookup below reads other
        # tables): one statement, and a second only for a duplicate.
        new = not self._eval and (
            db.execute("INSERT OR IGNORE INTO exact VALUES (?, ?)", (digest, where)).rowcount == 1
        )
        if not new:
            hit = db.execute("SELECT at FROM exact WHERE hash = ?", (digest,)).fetchone()
            if hit is not None:
                name = "eval_overlap" if self._eval else "duplicates"
                self.findings[name].add(f"{where}: same as {hit[0]}")
                return
        sig = _signature(_words(text)) if self.checks.near_duplicates else None
        keys = _bands(sig) if sig is not None else []
        near = self._near(sig, keys) if sig is not None else None
        if near is not None:
            name = "eval_overlap" if self._eval else "near_duplicates"
            self.findings[name].add(f"{where}: {100 * near[1]:.0f}% like {near[0]}")
        if self._eval:
            return  # eval rows are compared with the training rows, not stored
        if sig is not None:
            cur = db.execute("INSERT INTO sig (at, sig) VALUES (?, ?)", (where, _pack(sig)))
            db.executemany("INSERT INTO band VALUES (?, ?)", [(k, cur.lastrowid) for k in keys])

    def _near(self, sig: list[int], keys: list[int]) -> tuple[str, float] | None:
        """The most similar stored row at or over the threshold, among those sharing a band."""
        best: tuple[str, float] | None = None
        marks = ",".join("?" * len(keys))
        found = self._db.execute(
            f"SELECT at, sig FROM sig WHERE id IN (SELECT DISTINCT id FROM band WHERE key IN "
            f"({marks}) LIMIT ?)",
            (*keys, _CANDIDATES),
        )
        for at, blob in found:
            sim = _similarity(sig, _unpack(blob))
            if sim >= self.checks.near_duplicate_similarity and (best is None or sim > best[1]):
                best = (at, sim)
        return best

    # -- result ----------------------------------------------------------------------------
    def finish(self) -> DataReport:
        """The report (and the temporary hash store deleted)."""
        train = sum(s["rows"] for s in self.sources if not s["field"].startswith("eval"))
        evals = sum(s["rows"] for s in self.sources if s["field"].startswith("eval"))
        for f in self.findings.values():
            f.of = evals if f.name == "eval_overlap" else train
        labels, low = [], 0
        for e in self._edges:
            labels.append(f"{low + 1 if low else 0}-{e}")
            low = e
        labels.append(f"over {self.max_seq_len}")
        self.close()
        c = self.checks
        limits = {
            "duplicates": ("max_duplicate_share", c.max_duplicate_share),
            "near_duplicates": ("max_near_duplicate_share", c.max_near_duplicate_share),
            "eval_overlap": ("max_eval_overlap_share", c.max_eval_overlap_share),
            "truncated": ("max_truncated_share", c.max_truncated_share),
            "echoes": ("max_echo_share", c.max_echo_share),
            "damaged": ("max_damaged_share", c.max_damaged_share),
        }
        violations = []
        for name, (key, limit) in limits.items():
            f = self.findings[name]
            if limit is not None and f.share > limit:
                examples = "; ".join(f.examples)
                violations.append(
                    f"{f.title}: {100 * f.share:.1f}% of {f.of:,} rows is over data_checks.{key} "
                    f"= {limit:g} (e.g. {examples}); fix the rows or raise the threshold"
                )
        return DataReport(
            sources=self.sources,
            histogram=list(zip(labels, self._hist, strict=True)),
            max_seq_len=self.max_seq_len,
            findings=self.findings,
            violations=violations,
        )

    def close(self) -> None:
        """Delete the temporary hash store."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> ReportBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
