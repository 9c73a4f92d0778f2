"""The ledger and the billing arithmetic the budget relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from loraburst._ledger import Ledger
from loraburst._runner import billed_cost


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
