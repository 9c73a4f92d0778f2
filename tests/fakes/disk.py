"""Small real file systems for the full-disk tests: a tmpfs of a given size mounted in a test's
folder (read-only on request), unmounted at teardown.

Mounting needs root (CAP_SYS_ADMIN); where it is not allowed the tests that need it are
skipped, saying why. ``fill`` leaves a file system with only so many bytes free.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SmallDisk = Callable[..., Path]


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file on ``path``'s file system until about ``leave_bytes`` are free."""
    fd, name = tempfile.mkstemp(dir=path, prefix=".filler-")
    with os.fdopen(fd, "wb") as f, contextlib.suppress(OSError):
        remaining = max(0, free_bytes(path) - leave_bytes)
        while remaining > 0:
            remaining -= f.write(b"\0" * min(remaining, 1 << 20))
    return Path(name)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallDisk]:
    """``small_disk(size_bytes, read_only=False) -> mounted folder``."""
    mounts: list[Path] = []

    def make(size_bytes: int, read_only: bool = False) -> Path:
        where = tmp_path_factory.mktemp("disk")
        opts = f"size={size_bytes},mode=0755" + (",ro" if read_only else "")
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
