"""The fault suite's summary: faults injected, jobs completed, instances leaked, adapters lost.

Each case calls ``record(...)``; at the end of the session the table is printed and its last
line is ``leaked=N lost=M`` (``leaked=0 lost=0`` when every promise held).

A case's row travels on its test report (``user_properties``), so the table is the same whether
the cases ran in this process or in pytest-xdist workers: the hooks that gather and print it
live in ``tests.faults.summary``, a plugin the root conftest loads in every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tests.faults.summary import PROPERTY, Outcome


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    def add(case: str, fault: str, *, completed: bool, leaked: int, lost: int) -> None:
        outcome = Outcome(case, fault, completed, leaked, lost)
        request.node.user_properties.append((PROPERTY, dataclasses.asdict(outcome)))

    return add
