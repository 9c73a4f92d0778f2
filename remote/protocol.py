"""The wire between client and agent: files and JSON, nothing pickled.

A run's work directory (``WORKDIR``) on the instance holds::

    bundle/             the extracted bundle: spec.json, data/, model/ (local models), code/
    state.json          the agent's current State, replaced atomically
    events.jsonl        one Event per line, appended
    heartbeat           the client touches it; its mtime is the client's last sign of life
    control.json        client -> agent requests, e.g. {"stop": "budget"} or a new deadline
    checkpoints/        trainer checkpoints (checkpoint-<step>/)
    adapter/            the final (or partial) adapter
    metrics.json        final metrics
    manifest.json       Manifest of adapter/ and metrics.json (sha256 per file)
    agent.log           the agent's stdout/stderr

Standard library only: the agent runs before the trainer's dependencies are known to exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1

STATE_FILE = "state.json"
EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = "heartbeat"
CONTROL_FILE = "control.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
BUNDLE_DIR = "bundle"
LOG_FILE = "agent.log"

# Environment the client passes to the agent (never secrets in files: keys travel as env only).
ENV_DEADLINE = "LORABURST_DEADLINE"  # unix time: checkpoint, save and stop at this instant
ENV_HEARTBEAT_GRACE = "LORABURST_HEARTBEAT_GRACE_S"  # client silent this long => client gone
ENV_ARTIFACTS = "LORABURST_ARTIFACTS"  # s3://bucket/prefix for checkpoints (boto3, AWS_* env)
# A local model folder uploaded once per instance (content-addressed), used when the bundle
# carries no model of its own.
ENV_MODEL_DIR = "LORABURST_MODEL_DIR"
# What train.backend: auto resolved to on the client, when the provider knows its machine (the
# local provider on a Mac: "mlx"); absent, the instance resolves "auto" itself.
ENV_BACKEND = "LORABURST_BACKEND"

# What the trainer needs on the instance; installed by the bootstrap only where missing.
TRAINER_REQUIREMENTS = (
    "transformers>=4.56",
    "peft>=0.17",
    "bitsandbytes>=0.46",
    "datasets>=3",
    "accelerate>=1.0",
)


def missing_requirements(requirements: tuple[str, ...] | None = None) -> list[str]:
    """Names of ``requirements`` (default :data:`TRAINER_REQUIREMENTS`, the torch recipe's;
    ``backends.requirements("mlx")`` for the MLX one) this interpreter lacks or has below the
    floor.

    Looked up in package metadata, never imported: fast, and safe before anything is known.
    """
    import importlib.metadata
    import importlib.util
    import re

    def nums(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

    missing = []
    for requirement in TRAINER_REQUIREMENTS if requirements is None else requirements:
        name, _, floor = requirement.partition(">=")
        try:
            ok = nums(importlib.metadata.version(name)) >= nums(floor)
        except importlib.metadata.PackageNotFoundError:
            ok = False
        # A distribution's module is its name with "_" for "-" (mlx-lm -> mlx_lm).
        if not ok or importlib.util.find_spec(name.replace("-", "_")) is None:
            missing.append(name)
    return missing


# Phases in the order a healthy run walks through them.
PHASES = ("preparing", "loading", "training", "saving", "done", "failed", "stopped")
TERMINAL_PHASES = frozenset({"done", "failed", "stopped"})


@dataclasses.dataclass
class State:
    """The agent's state, as written to ``state.json``.

    ``stop_reason`` is set when training ended early on purpose (``"budget"``, ``"deadline"``,
    ``"client_gone"``); the phase is then ``"stopped"`` and the adapter is partial.
    """

    phase: str = "preparing"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    epoch: float | None = None
    error: dict[str, str] | None = None
    stop_reason: str | None = None
    pid: int | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    protocol_version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> State:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


def error_dict(exc: BaseException) -> dict[str, str]:
    """How an error crosses the wire: its type name and message, never a pickle."""
    return {"type": type(exc).__name__, "message": str(exc)}


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_event(workdir: Path, kind: str, **fields: Any) -> None:
    """Append one structured event (``{"ts", "kind", ...}``) to ``events.jsonl``."""
    line = json.dumps({"ts": round(time.time(), 3), "kind": kind, **fields}, sort_keys=True)
    with open(workdir / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_events(text: str) -> Iterator[dict[str, Any]]:
    """Parse events, skipping a torn last line that is still being written."""
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(workdir: Path, paths: list[str]) -> dict[str, Any]:
    """A manifest of every file under the given workdir-relative paths (files or folders)."""
    files: dict[str, dict[str, Any]] = {}
    for rel in paths:
        root = workdir / rel
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in candidates:
            key = p.relative_to(workdir).as_posix()
            files[key] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {"protocol_version": PROTOCOL_VERSION, "files": files}


def verify_manifest(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Return the files under ``root`` that are missing or whose sha256 differs (empty = ok)."""
    bad = []
    for rel, meta in manifest["files"].items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != meta["sha256"]:
            bad.append(rel)
    return bad


# The chat template used when the tokenizer has none: ChatML, with {% generation %} markers so
# that the loss mask covers exactly the assistant turns (and their end-of-turn token).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


class UnsafeArchiveError(ValueError):
    """A tar member would escape the destination (absolute path, ``..``) or is a link."""


def safe_extract(tar_path: Path | str, dest: Path | str) -> list[str]:
    """Extract a bundle, refusing absolute paths, ``..`` components, links and devices.

    Every member is checked before anything is written, so a bad archive leaves nothing behind.

    Raises:
        UnsafeArchiveError: naming the offending member.
    """
    dest = Path(dest)
    with tarfile.open(tar_path, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = m.name
            if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
                raise UnsafeArchiveError(f"{tar_path}: member {name!r} has an absolute path")
            if ".." in Path(name).parts:
                raise UnsafeArchiveError(f"{tar_path}: member {name!r} contains '..'")
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"{tar_path}: member {name!r} is a link")
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"{tar_path}: member {name!r} is not a file or folder")
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # isfile() was checked above
            with src, open(target, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
    return [m.name for m in members]


def _main(argv: list[str]) -> int:
    """``python protocol.py extract TAR DEST``: run standalone on an instance before the
    bundle's code exists there (the transport pipes this file's source to the interpreter)."""
    if len(argv) == 3 and argv[0] == "extract":
        safe_extract(argv[1], argv[2])
        return 0
    print("usage: protocol.py extract TAR DEST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
