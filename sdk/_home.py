"""Where loraburst keeps its state: ``$LORABURST_HOME`` (default ``~/.loraburst``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["home", "keys_dir", "runs_dir"]


def home() -> Path:
    """The state folder, created with owner-only permissions (it holds private keys)."""
    root = Path(os.environ.get("LORABURST_HOME") or Path.home() / ".loraburst").expanduser()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def runs_dir() -> Path:
    p = home() / "runs"
    p.mkdir(exist_ok=True)
    return p


def keys_dir() -> Path:
    p = home() / "keys"
    p.mkdir(exist_ok=True, mode=0o700)
    return p
