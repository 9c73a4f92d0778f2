"""A local model folder: found, fingerprinted cheaply, content-hashed once.

Model weights never travel inside a job's bundle. The ``local`` provider trains from the folder
in place; a remote instance receives the folder once and finds it again by its content hash
(``providers`` call :func:`content_digest` only when they must upload). Hashing 16 GB takes tens
of seconds, so the digest is remembered per folder under ``$LORABURST_HOME``, keyed by the
folder's :func:`fingerprint` (every file's relative path, size and modification time): the same
files, untouched, are never hashed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._state.home import home

__all__ = ["content_digest", "fingerprint", "local_model_dir", "model_files"]


def local_model_dir(model: str) -> Path | None:
    """The model's local folder when ``model`` names one with a config.json, else None."""
    p = Path(model).expanduser()
    return p.resolve() if (p / "config.json").is_file() else None


def model_files(folder: Path) -> list[Path]:
    """The folder's regular files (links and hidden files left out), sorted."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not p.is_symlink()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path, size and mtime: cheap, changes when a file does."""
    h = hashlib.sha256()
    for p in model_files(folder):
        st = p.stat()
        h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _digest_cache() -> Path:
    return home() / "model-digests.json"


def content_digest(folder: Path) -> str:
    """sha256 over every file's relative path and content sha256; remembered per fingerprint."""
    from loraburst.remote.protocol import sha256_file

    folder = folder.resolve()
    key = f"{folder}\0{fingerprint(folder)}"
    cache = _digest_cache()
    try:
        known: dict[str, str] = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for p in model_files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    digest = h.hexdigest()
    known[key] = digest
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(known, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache, not a record: the digest is still right
    return digest
