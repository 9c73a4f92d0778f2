"""The ledger: SQLite under ``$LORABURST_HOME``, the client's memory of every job and instance.

An instance row is written **before** the create call, keyed by a unique tag that is also the
instance's name at the provider (``lb-<job id>-<attempt>``). A create whose response was lost is
therefore resolved by looking the tag up at the provider, never by creating twice, and
``loraburst cleanup`` can reconcile the ledger with every provider account.
Rows hold no secrets: no API keys, no private keys. The file is still owner-only (0600): it maps
your jobs, costs and instances.

The first open of a brand-new ledger switches it to WAL, which needs a write lock that SQLite
does not wait for when the connection already reads (it answers "database is locked" at once):
several processes opening a new home together are serialised by a lock file, and a switch that
still meets a writer (another tool's connection) is retried until the 30 s timeout.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .._exceptions import LocalStorageError
from .home import home, owner_only

__all__ = ["InstanceRow", "JobRow", "Ledger", "OPEN_STATES"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, provider TEXT, gpu TEXT,
    cache_key TEXT, bundle_sha256 TEXT, spec_json TEXT NOT NULL, adapter_path TEXT,
    metrics_json TEXT, cost_usd REAL NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    tag TEXT PRIMARY KEY, job_id TEXT NOT NULL, attempt INTEGER NOT NULL, provider TEXT NOT NULL,
    provider_id TEXT, gpu TEXT, price_per_hour REAL NOT NULL DEFAULT 0,
    billing_increment_s INTEGER NOT NULL DEFAULT 1, state TEXT NOT NULL,
    created_at REAL NOT NULL, launched_at REAL, ended_at REAL,
    billed_usd REAL NOT NULL DEFAULT 0, note TEXT, held_until REAL
);
CREATE TABLE IF NOT EXISTS instance_events (
    tag TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, note TEXT
);
CREATE INDEX IF NOT EXISTS jobs_cache ON jobs(cache_key);
"""

# Instance states that may still bill: cleanup looks at these. "held": kept on purpose with the
# only copy of an adapter this machine could not store, for `loraburst attach` (until held_until).
OPEN_STATES = ("creating", "launched", "running", "held", "terminating", "teardown_failed")
# Columns added after the first release, with their type: added to older ledgers on open.
_ADDED_COLUMNS = {
    "instances": {"held_until": "REAL"},
    # The estimate a job's offer was chosen on, and what it measured (sdk/_cost/history.py).
    "jobs": {"estimate_json": "TEXT", "actual_json": "TEXT"},
}


@dataclasses.dataclass(frozen=True)
class JobRow:
    id: str
    name: str | None
    status: str
    provider: str | None
    gpu: str | None
    cache_key: str | None
    bundle_sha256: str | None
    spec_json: str
    adapter_path: str | None
    metrics_json: str | None
    cost_usd: float
    error: str | None
    created_at: float
    updated_at: float
    estimate_json: str | None = None
    actual_json: str | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json) if self.metrics_json else {}

    @property
    def estimate(self) -> dict[str, Any]:
        """The estimate the job's offer was chosen on (empty when none: the local CPU)."""
        return json.loads(self.estimate_json) if self.estimate_json else {}

    @property
    def actual(self) -> dict[str, Any]:
        """What the finished job measured: tokens/s, peak memory, phases, dollars."""
        return json.loads(self.actual_json) if self.actual_json else {}


@dataclasses.dataclass(frozen=True)
class InstanceRow:
    tag: str
    job_id: str
    attempt: int
    provider: str
    provider_id: str | None
    gpu: str | None
    price_per_hour: float
    billing_increment_s: int
    state: str
    created_at: float
    launched_at: float | None
    ended_at: float | None
    billed_usd: float
    note: str | None
    held_until: float | None = None


class Ledger:
    """Thread-safe access to the ledger database (one connection per operation)."""

    timeout_s = 30.0

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or home() / "ledger.sqlite3"
        with _init_lock(self.path):
            _private_file(self.path)
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    self._create()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            # SQLite gives -wal and -shm the database file's mode; older ones may predate it.
            for suffix in ("-wal", "-shm"):
                sidecar = self.path.with_name(self.path.name + suffix)
                if sidecar.exists():
                    _private_file(sidecar)

    def _create(self) -> None:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            # BEGIN IMMEDIATE takes the write lock up front, where SQLite does wait for it.
            conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
            for table, columns in _ADDED_COLUMNS.items():
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        finally:
            conn.close()

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _disk_trouble(exc):
                raise LocalStorageError(
                    f"the ledger {self.path} could not be written: {exc} (free space on that "
                    "disk; loraburst records every instance there before renting it)",
                    path=str(self.path),
                ) from exc
            raise
        finally:
            conn.close()

    # jobs -------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        *,
        name: str | None,
        spec_json: str,
        cache_key: str | None,
        bundle_sha256: str | None,
    ) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO jobs (id, name, status, spec_json, cache_key, bundle_sha256,"
                " created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
                (job_id, name, spec_json, cache_key, bundle_sha256, now, now),
            )

    def update_job(self, job_id: str, **fields: Any) -> None:
        allowed = {
            "status",
            "provider",
            "gpu",
            "adapter_path",
            "metrics_json",
            "cost_usd",
            "error",
            "bundle_sha256",
            "estimate_json",
            "actual_json",
        }
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._conn() as c:
            c.execute(
                f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?",
                (*fields.values(), time.time(), job_id),
            )

    def job(self, job_id: str) -> JobRow | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    def jobs(self, limit: int = 100) -> list[JobRow]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
            return [JobRow(*r) for r in rows.fetchall()]

    def outcomes(self, limit: int = 1000) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """``(status, estimate, actual)`` of the newest jobs that have both, newest first: what
        the estimator learns from (without reading every job's metrics)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT status, estimate_json, actual_json FROM jobs WHERE estimate_json IS NOT"
                " NULL AND actual_json IS NOT NULL ORDER BY created_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(status, json.loads(plan), json.loads(got)) for status, plan, got in rows]

    def find_cached(self, cache_key: str) -> JobRow | None:
        with self._conn() as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE cache_key = ? AND status = 'succeeded'"
                " ORDER BY updated_at DESC LIMIT 1",
                (cache_key,),
            ).fetchone()
        return JobRow(*row) if row else None

    # instances --------------------------------------------------------------------------
    def record_instance(
        self,
        tag: str,
        *,
        job_id: str,
        attempt: int,
        provider: str,
        gpu: str | None,
        price_per_hour: float,
        billing_increment_s: int,
    ) -> None:
        """Write the row BEFORE the provider's create call."""
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO instances (tag, job_id, attempt, provider, gpu, price_per_hour,"
                " billing_increment_s, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?,"
                " 'creating', ?)",
                (tag, job_id, attempt, provider, gpu, price_per_hour, billing_increment_s, now),
            )
            c.execute("INSERT INTO instance_events VALUES (?, ?, 'creating', NULL)", (tag, now))

    def update_instance(
        self, tag: str, *, state: str | None = None, note: str | None = None, **fields: Any
    ) -> None:
        allowed = {"provider_id", "launched_at", "ended_at", "billed_usd", "held_until"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown instance fields {sorted(bad)}")
        if state is not None:
            fields["state"] = state
        if note is not None:
            fields["note"] = note
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        now = time.time()
        with self._conn() as c:
            c.execute(f"UPDATE instances SET {sets} WHERE tag = ?", (*fields.values(), tag))
            if state is not None:
                c.execute(
                    "INSERT INTO instance_events VALUES (?, ?, ?, ?)", (tag, now, state, note)
                )

    def instance(self, tag: str) -> InstanceRow | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM instances WHERE tag = ?", (tag,)).fetchone()
        return InstanceRow(*row) if row else None

    def instances(self, *, job_id: str | None = None, open_only: bool = False) -> list[InstanceRow]:
        q, args = "SELECT * FROM instances WHERE 1=1", []
        if job_id is not None:
            q += " AND job_id = ?"
            args.append(job_id)
        if open_only:
            q += f" AND state IN ({', '.join('?' * len(OPEN_STATES))})"
            args.extend(OPEN_STATES)
        with self._conn() as c:
            return [InstanceRow(*r) for r in c.execute(q + " ORDER BY created_at", args)]

    def next_attempt(self, job_id: str) -> int:
        with self._conn() as c:
            row = c.execute(
                "SELECT MAX(attempt) FROM instances WHERE job_id = ?", (job_id,)
            ).fetchone()
        return (row[0] or 0) + 1


@contextmanager
def _init_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<ledger>.lock`` while the ledger is created or migrated."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing (never briefly readable by others), else make it 0600."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    owner_only(path, 0o600)


def _disk_trouble(exc: sqlite3.OperationalError) -> bool:
    """SQLite's "database or disk is full" and "disk I/O error": this machine's disk."""
    text = str(exc)
    return "disk is full" in text or "disk I/O error" in text
