"""Content-addressed, deterministic bundles: spec + normalised data + agent code.

The tar has sorted entries, fixed mtimes/owners/modes and no compression, so the same job gives
the same bytes and therefore the same sha256 — which is also its name. The normalised dataset
JSONL that ``prepare_dataset`` spilled to disk is streamed into the tar and hashed on the way, so
client memory stays flat whatever the dataset's size.

A local model folder is not in the bundle: ``Bundle.model_dir`` names it, and the runner gives
it to the host separately (in place on the ``local`` provider; uploaded once per instance and
found again by content hash elsewhere; see :mod:`._model_folder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import loraburst.remote as _remote_pkg
from loraburst.remote.protocol import PROTOCOL_VERSION, safe_extract

from .._api.spec import DataSource, JobSpec
from .._exceptions import ConfigError
from .._state.home import home
from .dataset import PreparedDataset
from .model_folder import local_model_dir

__all__ = ["Bundle", "build_bundle", "extract_bundle", "init_adapter_files", "local_model_dir"]

INIT_ADAPTER = "init_adapter"  # the starting adapter's folder in the bundle

_EPOCH = 0  # every member's mtime: bytes must not depend on when the bundle was built


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A built bundle: ``path`` is ``<bundles>/<sha256>.tar``; ``model_dir`` is the local model
    folder that travels beside it (None for a hub model)."""

    path: Path
    sha256: str
    size: int
    files: int
    model_dir: Path | None = None


def _bundle_spec(spec: JobSpec, train: PreparedDataset, eval_ds: PreparedDataset | None) -> bytes:
    data = spec.model_dump(mode="json")
    data["dataset"] = _bundled(train, "train", train.kind)
    if eval_ds is not None:
        data["eval_dataset"] = _bundled(eval_ds, "eval", train.kind)
    if local_model_dir(spec.model) is not None:
        data["model"] = "model"
        data["base_model"] = Path(spec.model).name  # names exports and the model card
    if isinstance(spec.dataset, str) and train.kind != "hub":
        data["dataset_name"] = Path(spec.dataset).name  # for the model card
    elif train.kind == "mix" or isinstance(spec.dataset, DataSource):
        parts = train.parts or (train,)
        data["dataset_name"] = " + ".join(p.hub_id or Path(p.source).name for p in parts)
    if spec.init_adapter:
        data["init_adapter"] = INIT_ADAPTER
    # output_dir is a client-side path; it has no meaning on the instance.
    data["output_dir"] = "adapter"
    doc = {
        "protocol_version": PROTOCOL_VERSION,
        "job_id": spec.name or "job",
        "data_format": train.kind,
        "spec": data,
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def _sources(ds: PreparedDataset, data_format: str) -> tuple[PreparedDataset, ...] | None:
    """A dataset that travels as a list of sources (a mix, a hub source with settings, or a
    file whose kind is not the bundle's ``data_format``, such as the eval file of a mixed
    job), or None for one plain file or hub id."""
    if ds.kind == "mix":
        return ds.parts
    if ds.options or ds.kind not in ("hub", data_format):
        return (ds,)
    return None


def _bundled(ds: PreparedDataset, name: str, data_format: str) -> str | list[dict[str, Any]] | None:
    """spec.json's ``dataset``/``eval_dataset``: the bundled file or hub id, or the sources
    (``protocol.SourceSpec``): a local one as its normalised file, a hub one with its settings."""
    parts = _sources(ds, data_format)
    if parts is None:
        return ds.hub_id if ds.kind == "hub" else f"data/{name}.jsonl"
    return [
        {**p.options, "path": p.hub_id}
        if p.kind == "hub"
        else {**p.options, "path": f"data/{name}-{i}.jsonl", "kind": p.kind}
        for i, p in enumerate(parts)
    ]


def _data_members(
    ds: PreparedDataset | None, name: str, data_format: str
) -> list[tuple[str, bytes | Path]]:
    if ds is None:
        return []
    parts = _sources(ds, data_format)
    if parts is None:
        return [(f"data/{name}.jsonl", ds.jsonl_path)] if ds.jsonl_path is not None else []
    return [
        (f"data/{name}-{i}.jsonl", p.jsonl_path)
        for i, p in enumerate(parts)
        if p.jsonl_path is not None
    ]


def _code_files() -> Iterator[tuple[str, Path]]:
    """The agent's code: every module of ``loraburst.remote``, its sub-packages included."""
    root = Path(_remote_pkg.__file__).parent
    for p in sorted(root.rglob("*.py")):
        if "__pycache__" not in p.parts:
            yield f"code/loraburst/remote/{p.relative_to(root).as_posix()}", p


def _members(
    spec: JobSpec, train: PreparedDataset, eval_ds: PreparedDataset | None
) -> list[tuple[str, bytes | Path]]:
    members: list[tuple[str, bytes | Path]] = [("spec.json", _bundle_spec(spec, train, eval_ds))]
    # The normalised rows are already on disk (content-addressed): streamed like model files.
    members += _data_members(train, "train", train.kind)
    members += _data_members(eval_ds, "eval", train.kind)
    # A package marker so `python -m loraburst.remote.agent` resolves to the bundled code.
    members += [(f"{INIT_ADAPTER}/{rel}", p) for rel, p in init_adapter_files(spec)]
    members.append(("code/loraburst/__init__.py", b'"""Bundled loraburst agent code."""\n'))
    members.extend(_code_files())
    return sorted(members, key=lambda m: m[0])


def init_adapter_files(spec: JobSpec) -> list[tuple[str, Path]]:
    """The starting adapter's files (``init_adapter``), folder-relative: they travel in the
    bundle (an adapter is megabytes, not the base's gigabytes).

    Raises:
        ConfigError: the folder is missing or holds no PEFT adapter.
    """
    if not spec.init_adapter:
        return []
    folder = Path(spec.init_adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no adapter_config.json"
        raise ConfigError(
            f"init_adapter: {folder} {what}; give the adapter folder a previous job wrote "
            "(its JobResult.adapter_path)",
            source=str(folder),
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return [(p.relative_to(folder).as_posix(), p) for p in files]


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        self._f.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _EPOCH
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_bundle(
    spec: JobSpec,
    train: PreparedDataset,
    eval_ds: PreparedDataset | None = None,
    *,
    dest: Path | None = None,
) -> Bundle:
    """Write the job's bundle into ``dest`` (default ``$LORABURST_HOME/bundles``).

    Raises:
        ConfigError: a data file cannot be read.
    """
    dest = dest or home() / "bundles"
    dest.mkdir(parents=True, exist_ok=True)
    members = _members(spec, train, eval_ds)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".bundle-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, content in members:
                    if isinstance(content, bytes):
                        tar.addfile(_tarinfo(name, len(content)), io.BytesIO(content))
                    else:
                        try:
                            with open(content, "rb") as f:
                                tar.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)
                        except OSError as exc:
                            raise ConfigError(
                                f"cannot read {content} for the bundle: {exc}"
                            ) from exc
        digest = writer.sha.hexdigest()
        final = dest / f"{digest}.tar"
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Bundle(
        path=final,
        sha256=digest,
        size=writer.size,
        files=len(members),
        model_dir=local_model_dir(spec.model),
    )


def extract_bundle(bundle: Path, dest: Path) -> list[str]:
    """Safely extract (no absolute paths, no ``..``, no links); see ``protocol.safe_extract``."""
    names: list[str] = safe_extract(bundle, dest)
    return names
