"""Which client process follows a job: ``runs/<job>/client.pid``, claimed under a lock.

``loraburst run`` and ``loraburst attach`` claim a job before they follow it, so that
``loraburst cleanup`` leaves its instance alone while that process lives, and a second ``attach``
is refused instead of racing the first one for the same instance. A claim left by a dead
process (a client that was SIGKILLed) is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from loraburst.providers.local import pid_alive

from .._exceptions import JobError
from .._state.disk import local_io
from .._state.home import runs_dir

__all__ = ["claim", "client_alive", "follower", "release"]

_PID = "client.pid"


def _pid_file(job_id: str) -> Path:
    return runs_dir() / job_id / _PID


@contextlib.contextmanager
def _locked(job_id: str) -> Iterator[None]:
    folder = runs_dir() / job_id
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "client.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def follower(job_id: str) -> int | None:
    """The pid of the live process (other than this one) that follows ``job_id``, if any."""
    try:
        pid = int(_pid_file(job_id).read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or not pid_alive(pid):
        return None
    return pid


def client_alive(job_id: str) -> bool:
    """Whether another live client process is following ``job_id`` right now."""
    return follower(job_id) is not None


def claim(job_id: str) -> None:
    """Record this process as the one following ``job_id``.

    Raises:
        JobError: another live process follows it (naming its pid).
    """
    with local_io(_pid_file(job_id)), _locked(job_id):
        other = follower(job_id)
        if other is not None:
            raise JobError(
                f"job {job_id} is already followed by process {other} (a `loraburst run` or "
                "`loraburst attach`); wait for it to finish, or stop it and attach again",
                job_id=job_id,
            )
        tmp = _pid_file(job_id).with_name(f".{_PID}.{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, _pid_file(job_id))


def release(job_id: str) -> None:
    """Drop this process's claim on ``job_id`` (another process's claim is left alone).

    Never raises: it runs on the way out of teardown, where the first error matters more.
    """
    with contextlib.suppress(OSError, ValueError), _locked(job_id):
        if int(_pid_file(job_id).read_text()) == os.getpid():
            _pid_file(job_id).unlink()
