"""Ephemeral SSH keys: one ed25519 pair per instance tag, kept under ``$LORABURST_HOME/keys``.

The private key never leaves this machine; the runner deletes both files after teardown.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from loraburst._state.home import keys_dir

__all__ = ["delete_key", "generate_key", "key_path"]


def key_path(tag: str) -> Path:
    """Where the private key for ``tag`` lives (the public key is next to it, ``.pub``)."""
    if not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"invalid instance tag {tag!r} for a key file name")
    return Path(keys_dir()) / tag


def generate_key(tag: str) -> tuple[Path, str]:
    """Create a fresh ed25519 key pair for ``tag`` (replacing any old one).

    Returns:
        The private key's path (mode 0600) and the public key as an OpenSSH line
        (``ssh-ed25519 AAAA... loraburst-<tag>``).
    """
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = f"{public.decode()} loraburst-{tag}"
    path = key_path(tag)
    path.unlink(missing_ok=True)
    # Created 0600 from the first byte: never world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_suffix(".pub").write_text(public_line + "\n")
    return path, public_line


def delete_key(tag: str) -> None:
    """Remove the key pair of ``tag`` (no error when it is already gone)."""
    path = key_path(tag)
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
