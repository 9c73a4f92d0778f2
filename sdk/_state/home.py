"""Where loraburst keeps its state: ``$LORABURST_HOME`` (default ``~/.loraburst``).

The home holds per-job private keys, host-key pins and the ledger, so it is owner-only (0700)
whoever created it: a home that already existed with wider permissions is narrowed on use, and
one that others may write to and that we cannot narrow (not ours) is refused, since whoever can
write there can swap a pinned host key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .._exceptions import ConfigError

__all__ = ["home", "keys_dir", "owner_only", "runs_dir"]


def owner_only(path: Path, mode: int = 0o700) -> None:
    """Make ``path`` (ours) exactly ``mode`` when it grants anything to group or others.

    Raises:
        ConfigError: it is not ours and others may write to it.
    """
    st = path.stat()
    if not st.st_mode & 0o077:
        return
    if st.st_uid == os.geteuid():
        os.chmod(path, mode)
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path} belongs to another user and others may write to it; loraburst keeps "
            "private keys and host-key pins there. Point LORABURST_HOME at a folder of your own."
        )


def home() -> Path:
    """The state folder, created (or narrowed) to owner-only permissions (it holds private keys).

    Raises:
        ConfigError: it cannot be created, or it is someone else's folder others may write to.
    """
    root = Path(os.environ.get("LORABURST_HOME") or Path.home() / ".loraburst").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the loraburst home {root}: {exc.strerror or exc}; set "
            "LORABURST_HOME to a writable folder"
        ) from exc
    owner_only(root)
    return root


def runs_dir() -> Path:
    p = home() / "runs"
    p.mkdir(exist_ok=True)
    return p


def keys_dir() -> Path:
    p = home() / "keys"
    p.mkdir(exist_ok=True, mode=0o700)
    owner_only(p)
    return p
