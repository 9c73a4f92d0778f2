"""Money in one place: billed time, the stop margin, the deadline and its reason."""

from __future__ import annotations

import pytest
from loraburst._cost import billing


@pytest.mark.parametrize(
    ("seconds", "inc", "billed"),
    [(0, 60, 0), (1, 60, 60), (60, 60, 60), (61, 60, 120), (7.2, 1, 8)],
)
def test_billed_seconds_round_up_to_the_increment(seconds: float, inc: int, billed: int) -> None:
    assert billing.billed_seconds(seconds, inc) == billed
    assert billing.billed_cost(3.6, seconds, inc) == pytest.approx(billed / 1000)


def test_the_budget_deadline_leaves_the_wrap_up_margin_and_says_why() -> None:
    # $1 at $3.60/h buys 1000 s; stopping costs WRAP_UP_S plus one (60 s) increment.
    d = billing.deadline(started_at=100.0, now=150.0, price_per_hour=3.6, increment_s=60,
                         max_cost=1.0)  # fmt: skip
    assert d == billing.Deadline(100.0 + 1000 - billing.WRAP_UP_S - 60, "budget")
    # What earlier attempts spent is gone from the cap.
    later = billing.deadline(started_at=100.0, now=150.0, price_per_hour=3.6, increment_s=60,
                             max_cost=1.0, spent_before=0.5)  # fmt: skip
    assert later is not None and later.at == d.at - 500
    # A runtime cap that comes first wins, and says so.
    short = billing.deadline(started_at=100.0, now=150.0, price_per_hour=3.6, increment_s=60,
                             max_cost=1.0, max_runtime=60)  # fmt: skip
    assert short == billing.Deadline(210.0, "max_runtime")
    assert billing.deadline(started_at=0, now=0, price_per_hour=0.0, increment_s=1,
                            max_cost=1.0) is None  # free: no budget deadline  # fmt: skip


def test_must_stop_once_only_the_stop_margin_is_left() -> None:
    price, inc = 3.6, 60  # the margin (105 s) costs $0.105
    assert not billing.must_stop(spent=0.80, max_cost=1.0, price_per_hour=price, increment_s=inc)
    assert billing.must_stop(spent=0.90, max_cost=1.0, price_per_hour=price, increment_s=inc)
    assert not billing.must_stop(spent=99.0, max_cost=None, price_per_hour=price, increment_s=inc)


def test_affordable_steps_pays_setup_first() -> None:
    steps = billing.affordable_steps(max_cost=1.0, price_per_hour=3.6, increment_s=60,
                                     setup_s=40.0, seconds_per_step=9.0)  # fmt: skip
    assert steps == int((1000 - 60 - 40) / 9.0) == 100
