"""Fixtures for the agent's tests: a fake cloud API (real HTTP) and a moto S3 server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.remote._cloud import Cloud


@pytest.fixture
def cloud() -> Iterator[Cloud]:
    """RunPod/Lambda terminate endpoints on 127.0.0.1, recording each call."""
    c = Cloud()
    yield c
    c.close()


# s3_url (a real moto S3 server) lives in tests/fakes/fixtures.py, shared by every suite.
