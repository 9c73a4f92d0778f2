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

from .._api.spec import JobSpec
from .._exceptions import ConfigError, EstimateError, LocalStorageError
from .home import runs_dir

__all__ = [
    "artifact_bytes",
    "check_outputs",
    "check_writable_dir",
    "local_io",
    "remove_quietly",
    "storage_error",
]

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


def artifact_bytes(spec: JobSpec) -> int | None:
    """A low estimate of the adapter's bytes (LoRA weights in fp32), or None when the model's
    shape is unknown. Tokenizer files and trained embedding rows come on top of it."""
    from loraburst.remote.memory import lora_params

    from .._cost.shapes import model_shape

    try:
        shape = model_shape(spec.model).shape
    except EstimateError:
        return None
    return 4 * lora_params(shape, spec.lora.r, spec.lora.target_modules)


def check_outputs(spec: JobSpec, *, pulls_checkpoints: bool) -> Path:
    """Check every folder this job writes to before anything is rented: ``output_dir`` (the
    verified adapter) and ``$LORABURST_HOME/runs`` (checkpoint copies, the pull), writable and
    with room for the expected artifacts (checked together when they share a disk).

    A checkpoint is the adapter plus Adam's two moments (3x); the runner keeps the newest one
    (two while the next arrives), a local run also has the trainer's own two, and the pull and
    the copy into ``output_dir`` take one adapter each.

    Returns:
        The absolute ``output_dir`` (created).

    Raises:
        ConfigError: naming the folder, what is wrong and how to fix it.
    """
    adapter = artifact_bytes(spec) or 0
    runs_need = adapter * (1 + 2 * 3 if pulls_checkpoints else 2 + 3 * 3)
    runs = check_writable_dir(runs_dir(), "the run folder ($LORABURST_HOME/runs)")
    output_dir = check_writable_dir(Path(spec.output_dir), "output_dir")
    if os.stat(runs).st_dev == os.stat(output_dir).st_dev:
        check_writable_dir(output_dir, "output_dir", need_bytes=runs_need + adapter)
    else:
        check_writable_dir(runs, "the run folder ($LORABURST_HOME/runs)", need_bytes=runs_need)
        check_writable_dir(output_dir, "output_dir", need_bytes=adapter)
    return output_dir
