"""The ledger and the billing arithmetic the budget relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from loraburst._cost.billing import billed_cost
from loraburst._state.ledger import Ledger


def test_instance_row_is_written_before_create_and_tracks_states(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite3")
    led.create_job("j-1", name="j", spec_json="{}", cache_key="k", bundle_sha256="s")
    led.record_instance(
        "lb-j-1-1",
        job_id="j-1",
        attempt=1,
        provider="runpod",
        gpu="RTX 4090",
        price_per_hour=0.74,
        billing_increment_s=1,
    )
    assert [i.state for i in led.instances(open_only=True)] == ["creating"]
    led.update_instance("lb-j-1-1", state="running", provider_id="pod123")
    led.update_instance("lb-j-1-1", state="terminated", billed_usd=0.01)
    assert led.instances(open_only=True) == []
    row = led.instance("lb-j-1-1")
    assert row is not None and row.provider_id == "pod123" and row.billed_usd == 0.01
    with sqlite3.connect(led.path) as c:
        states = [
            r[0]
            for r in c.execute(
                "SELECT state FROM instance_events WHERE tag = ? ORDER BY ts", ("lb-j-1-1",)
            )
        ]
    assert states == ["creating", "running", "terminated"]
    assert led.next_attempt("j-1") == 2


def test_tags_are_unique(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite3")
    kw = dict(
        job_id="j", attempt=1, provider="p", gpu=None, price_per_hour=1.0, billing_increment_s=1
    )
    led.record_instance("lb-j-1", **kw)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        led.record_instance("lb-j-1", **kw)  # type: ignore[arg-type]


def test_cache_lookup_only_returns_succeeded_jobs(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite3")
    led.create_job("a", name=None, spec_json="{}", cache_key="k", bundle_sha256=None)
    assert led.find_cached("k") is None
    led.update_job("a", status="succeeded", adapter_path="/x")
    hit = led.find_cached("k")
    assert hit is not None and hit.id == "a"


@pytest.mark.parametrize(
    ("price", "seconds", "inc", "expected"),
    [
        (3.6, 1.0, 1, 0.001),
        (3.6, 1.2, 1, 0.002),
        (3.6, 61, 60, 0.12),
        (3.6, 60, 60, 0.06),
        (0.0, 100, 1, 0.0),
        (1.0, 0, 60, 0.0),
    ],
)
def test_billed_cost_rounds_up_to_the_increment(
    price: float, seconds: float, inc: int, expected: float
) -> None:
    assert billed_cost(price, seconds, inc) == pytest.approx(expected)


def test_first_open_waits_for_a_writer_instead_of_failing(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection writes failed at once with
    "database is locked" (SQLite does not wait there); now it waits."""
    import threading

    path = tmp_path / "l.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of its own first open
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        led = Ledger(path)
    finally:
        release.join()
        other.close()
    led.create_job("j", name=None, spec_json="{}", cache_key=None, bundle_sha256=None)
    assert [j.id for j in led.jobs()] == ["j"]


def _open_and_write(path: str, barrier: Any, errors: Any) -> None:
    import os

    barrier.wait()
    try:
        led = Ledger(Path(path))
        led.create_job(
            f"j-{os.getpid()}", name=None, spec_json="{}", cache_key=None, bundle_sha256=None
        )
    except Exception as exc:  # the test reports whatever went wrong in any process
        errors.put(f"{type(exc).__name__}: {exc}")


def test_many_processes_create_a_new_ledger_at_once(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(4):
        path = tmp_path / f"l{trial}.sqlite3"
        n = 8
        barrier, errors = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_open_and_write, args=(str(path), barrier, errors)) for _ in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert found == [] and all(p.exitcode == 0 for p in procs)
        assert len(Ledger(path).jobs()) == n


def test_home_and_ledger_are_owner_only_even_when_the_home_existed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    root = tmp_path / "shared-home"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    (root / "ledger.sqlite3").touch(mode=0o644)
    (root / "ledger.sqlite3").chmod(0o644)
    monkeypatch.setenv("LORABURST_HOME", str(root))
    led = Ledger()
    # SQLite keeps -wal and -shm only while a connection is open: hold one.
    reader = sqlite3.connect(led.path)
    try:
        reader.execute("SELECT * FROM jobs").fetchall()
        led.create_job("j", name=None, spec_json="{}", cache_key=None, bundle_sha256=None)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
            assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    finally:
        reader.close()


def test_a_brand_new_ledger_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        led = Ledger(tmp_path / "new.sqlite3")
    finally:
        os.umask(old)
    assert stat.S_IMODE(led.path.stat().st_mode) == 0o600


def test_someone_elses_writable_home_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from loraburst import ConfigError
    from loraburst._state.home import home

    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    root = tmp_path / "theirs"
    root.mkdir()
    os.chown(root, 12345, 12345)
    root.chmod(0o777)
    monkeypatch.setenv("LORABURST_HOME", str(root))
    with pytest.raises(ConfigError, match="belongs to another user"):
        home()


def test_an_older_ledger_gains_the_estimate_and_actual_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(  # the jobs table as the first release wrote it
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, provider TEXT,"
        " gpu TEXT, cache_key TEXT, bundle_sha256 TEXT, spec_json TEXT NOT NULL, adapter_path"
        " TEXT, metrics_json TEXT, cost_usd REAL NOT NULL DEFAULT 0, error TEXT, created_at REAL"
        " NOT NULL, updated_at REAL NOT NULL)"
    )
    conn.execute("INSERT INTO jobs (id, status, spec_json, created_at, updated_at)"
                 " VALUES ('old', 'succeeded', '{}', 1, 1)")  # fmt: skip
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    old = ledger.job("old")
    assert old is not None and old.estimate == {} and old.actual == {}
    ledger.update_job("old", estimate_json='{"cost_usd": 1.5}', actual_json='{"cost_usd": 2}')
    assert ledger.outcomes() == [("succeeded", {"cost_usd": 1.5}, {"cost_usd": 2})]
