"""This machine's disk: local writes whose failures are ``LocalStorageError``, never transport
errors, and the check of every output path before anything is rented.

A full disk (``ENOSPC``), a quota (``EDQUOT``), a read-only file system (``EROFS``) or a
permission error while pulling an artifact is not a dropped connection: reconnecting cannot fix
it, and treating it as one once cost 37 reconnects, stray partial folders and — worst — the
only copy of a finished adapter when the instance was then terminated. Writes to local paths go
through ``local_io`` so that the runner can tell the two apart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ._exceptions import ConfigError, LocalStorageError

__all__ = ["check_writable_dir", "local_io", "remove_quietly", "storage_error"]

_HINTS = {
    errno.ENOSPC: "the disk is full; free space",
    errno.EDQUOT: "your disk quota is used up; free space",
    errno.EROFS: "the file system is read-only; pick another folder",
    errno.EACCES: "permission denied; pick a folder you can write to",
    errno.EPERM: "permission denied; pick a folder you can write to",
    errno.EFBIG: "the file is larger than this file system allows",
}


def storage_error(exc: OSError, path: Path | str, doing: str = "writing") -> LocalStorageError:
    """The ``LocalStorageError`` for ``exc``, naming the path and what to do about it."""
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno or 0)
    message = f"{doing} {path} on this machine failed: {what}" + (f" ({hint})" if hint else "")
    return LocalStorageError(message, path=str(path), errno=exc.errno)


@contextlib.contextmanager
def local_io(path: Path | str, doing: str = "writing") -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a ``LocalStorageError`` about ``path``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, path, doing) from exc


def remove_quietly(path: Path) -> None:
    """Remove a file or folder we were writing, whatever state it is in (best effort: this
    runs while another error is on its way to the user)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_writable_dir(path: Path, what: str, need_bytes: int = 0) -> Path:
    """Make sure files can be created in ``path`` (creating it), with ``need_bytes`` free.

    The check writes a real file: permission bits say nothing for root, and only a write finds
    a read-only mount or a pseudo file system such as ``/proc``.

    Returns:
        The absolute folder.

    Raises:
        ConfigError: naming ``what``, the path and the fix.
    """
    path = Path(os.path.abspath(path.expanduser()))
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{what} {path} exists and is not a folder; remove it or choose another {what}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".loraburst-probe-")
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(path).free
    except OSError as exc:
        hint = _HINTS.get(exc.errno or 0, "choose a folder you can write to")
        raise ConfigError(
            f"{what} {path} is not writable: {exc.strerror or exc} ({hint}); nothing was rented"
        ) from None
    if need_bytes and free < need_bytes:
        raise ConfigError(
            f"{what} {path} has {_mb(free)} free but this job's artifacts need about "
            f"{_mb(need_bytes)}; free space or choose another {what}. Nothing was rented."
        )
    return path


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"
