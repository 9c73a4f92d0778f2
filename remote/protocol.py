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
    exports/            merged weights, GGUF files and report.json (remote/export.py)
    manifest.json       Manifest of adapter/, metrics.json and exports (sha256 per file)
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
# The agent's word to the trainer's ranks (torchrun: separate processes): the reason to stop,
# written once the watchdog has one. Rank 0 reads it each step and all ranks agree on it.
RANK_STOP_FILE = "rank_stop"
ENV_AGENT_PID = "LORABURST_AGENT_PID"  # the agent that started torchrun: gone => stop
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
EXPORTS_DIR = "exports"  # merged weights, GGUF files and their checks (remote/export.py)
BUNDLE_DIR = "bundle"
LOG_FILE = "agent.log"

# Environment the client passes to the agent (never secrets in files: keys travel as env only).
ENV_DEADLINE = "LORABURST_DEADLINE"  # unix time: checkpoint, save and stop at this instant
ENV_DEADLINE_REASON = "LORABURST_DEADLINE_REASON"  # which cap set it: "budget", "max_runtime"
ENV_HEARTBEAT_GRACE = "LORABURST_HEARTBEAT_GRACE_S"  # client silent this long => client gone
ENV_ARTIFACTS = "LORABURST_ARTIFACTS"  # s3://bucket/prefix for checkpoints (boto3, AWS_* env)
# A local model folder uploaded once per instance (content-addressed), used when the bundle
# carries no model of its own.
ENV_MODEL_DIR = "LORABURST_MODEL_DIR"
# What train.backend: auto resolved to on the client, when the provider knows its machine (the
# local provider on a Mac: "mlx"); absent, the instance resolves "auto" itself.
ENV_BACKEND = "LORABURST_BACKEND"
# GPUs of the instance that train (the offer's gpu_count): above 1 the agent starts the trainer
# under torchrun, one process per GPU. Unset: the agent counts the CUDA GPUs itself.
ENV_GPUS = "LORABURST_GPUS"

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
PHASES = (
    "preparing",
    "loading",
    "training",
    "evaluating",
    "saving",
    "exporting",
    "done",
    "failed",
    "stopped",
)
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
    # The objective's own numbers for the last step (preference: reward_margin, ...).
    metrics: dict[str, float] | None = None
    error: dict[str, str] | None = None
    stop_reason: str | None = None
    gpu_util: float | None = None  # mean GPU utilisation (%), newest sample (remote/telemetry.py)
    gpu_mem_gb: float | None = None  # GPU memory in use, GiB
    pid: int | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    protocol_version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> State:
        """Parse ``state.json``, checking every known field's type (the client reads it from
        an instance it does not trust; unknown fields are ignored for newer agents).

        Raises:
            ValueError: not a JSON object, or a field of the wrong type (naming it).
        """
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("state.json is nested too deeply") from None
        if not isinstance(raw, dict):
            raise ValueError("state.json is not a JSON object")
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if not _STATE_TYPES[f.name](value):
                raise ValueError(f"state.json field {f.name!r} has a bad value {value!r:.80}")
            fields[f.name] = value
        return cls(**fields)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _text(v: Any) -> bool:
    return v is None or isinstance(v, str)


_STATE_TYPES = {
    "phase": lambda v: v in PHASES,
    "step": lambda v: _int(v) and v >= 0,
    "total_steps": lambda v: _int(v) and v >= 0,
    "loss": _num,
    "tokens_per_s": _num,
    "eta_s": _num,
    "epoch": _num,
    "metrics": lambda v: (
        v is None
        or (isinstance(v, dict) and all(isinstance(k, str) and _num(x) for k, x in v.items()))
    ),
    "error": lambda v: (
        v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
    ),
    "stop_reason": _text,
    "gpu_util": _num,
    "gpu_mem_gb": _num,
    "pid": lambda v: v is None or _int(v),
    "started_at": _num,
    "updated_at": lambda v: _num(v) and v is not None,
    "protocol_version": _int,
}


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


class ManifestError(ValueError):
    """A manifest that is malformed, empty, or names a path outside the folders it covers."""


def safe_relpath(rel: str) -> bool:
    """Whether ``rel`` is a plain relative POSIX path that stays inside its root: no absolute
    path, no empty, ``.`` or ``..`` component, no backslash or NUL."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def parse_manifest(
    text: str,
    covers: tuple[str, ...] = (ADAPTER_DIR, METRICS_FILE),
    optional: tuple[str, ...] = (EXPORTS_DIR,),
) -> dict[str, Any]:
    """Check a manifest the instance wrote before anything is pulled against it.

    It must be a JSON object whose ``files`` maps at least one path to
    ``{"sha256": <64 hex>, "size": <bytes>}``; every path must be safe (``safe_relpath``) and lie
    in ``covers`` or ``optional`` (a listed file, or inside a listed folder), and every folder
    of ``covers`` must hold at least one file.

    Raises:
        ManifestError: saying which entry is wrong and why.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise ManifestError('manifest must be a JSON object with a "files" mapping')
    if not files:
        raise ManifestError("manifest lists no files")
    for rel, meta in files.items():
        if not safe_relpath(rel):
            raise ManifestError(f"manifest entry {rel!r} is not a plain relative path")
        if not any(rel == c or rel.startswith(c + "/") for c in (*covers, *optional)):
            allowed = ", ".join((*covers, *optional))
            raise ManifestError(f"manifest entry {rel!r} is outside {allowed}")
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        size = meta.get("size") if isinstance(meta, dict) else None
        if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
            raise ManifestError(f"manifest entry {rel!r} has no valid sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"manifest entry {rel!r} has no valid size")
    for c in covers:
        if not any(rel == c or rel.startswith(c + "/") for rel in files):
            raise ManifestError(f"manifest lists nothing for {c}")
    checked: dict[str, Any] = doc
    return checked


def _is_hex(text: str) -> bool:
    return all(ch in "0123456789abcdef" for ch in text)


def verify_manifest(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Return the listed files under ``root`` that are unsafe names, missing, not regular files,
    or whose size or sha256 differs (empty = ok). ``unlisted_files`` checks the other way."""
    bad = []
    for rel, meta in manifest["files"].items():
        p = root / rel
        ok = (
            safe_relpath(rel)
            and p.is_file()
            and not p.is_symlink()
            and ("size" not in meta or p.stat().st_size == meta["size"])
            and sha256_file(p) == meta["sha256"]
        )
        if not ok:
            bad.append(rel)
    return bad


def unlisted_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Everything under ``root`` that is not a folder and that the manifest does not list
    (files, links, devices), as ``root``-relative POSIX paths."""
    listed = set(manifest["files"])
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(root).as_posix()
        if rel not in listed:
            found.append(rel)
    return found


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie, finished but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) is the best we have


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


# ------------------------------------------------------------------- the bundle's typed spec
# spec.json as both sides read it. The client writes it from its pydantic JobSpec
# (sdk/_spec.py; tests/unit/test_spec.py checks the two have the same fields); the agent reads
# it here, typed, instead of walking nested dicts.


def _typed(cls: Any, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a dict: every key known, nested dataclasses built too."""
    if not isinstance(raw, dict):
        raise ValueError(f"spec.json: {where or 'the spec'} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(
            f"spec.json: unknown key(s) {', '.join(map(repr, unknown))} in {where or 'the spec'} "
            "(the bundle and the agent's code come from different versions?)"
        )
    values = {}
    for name, value in raw.items():
        sub = _NESTED.get((cls.__name__, name))
        values[name] = _typed(sub, value, f"{where}{name}.") if sub else value
    return cls(**values)


def is_quantized(method: str, bits: int) -> bool:
    """The one rule for QLoRA/QDoRA: base weights in 4/8 bits unless the method is plain LoRA."""
    return method != "lora" and bits in (4, 8)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """``lora:`` — the adapter's shape."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """``quant:`` — how the base weights are loaded."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """``train:`` — optimisation and data shaping (see the client's ``TrainConfig``)."""

    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    micro_batch_size: int | str = "auto"
    grad_accum: int = 1
    max_seq_len: int = 2048
    packing: bool | str = "auto"
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    seed: int = 42
    eval_fraction: float = 0.0
    save_every_steps: int | None = 50
    gradient_checkpointing: bool | str = "auto"
    max_gpu_memory_gib: float | None = None
    distributed: str = "auto"
    backend: str = "auto"
    loss_on: str = "assistant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """``objective:`` — sft, or a preference objective and its options (the client's
    ``ObjectiveConfig`` says what each means)."""

    type: str = "sft"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "auto"
    max_prompt_len: int | None = None

    @property
    def preference(self) -> bool:
        """Rows are pairs: prompt, chosen, rejected."""
        return self.type in ("dpo", "orpo")


@dataclasses.dataclass(frozen=True)
class EvaluationSpec:
    """``evaluation:`` — base against tuned on the instance (see the client's
    ``EvaluationConfig``; remote/evaluate.py)."""

    enabled: bool | str = "auto"
    samples: int = 4
    max_new_tokens: int = 64
    tasks: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = 50
    min_loss_drop: float | None = None


@dataclasses.dataclass(frozen=True)
class DataChecksSpec:
    """``data_checks:`` — the data report's thresholds (the client enforces them before
    renting; the instance re-checks what only it can measure, for hub data)."""

    max_duplicate_share: float | None = None
    max_near_duplicate_share: float | None = None
    max_eval_overlap_share: float | None = None
    max_truncated_share: float | None = None
    max_echo_share: float | None = None
    max_damaged_share: float | None = None
    near_duplicate_similarity: float = 0.8
    near_duplicates: bool = True


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of a list-valued ``dataset``/``eval_dataset`` in spec.json: a source of a mix
    (see the client's ``DataSource``). A local file travels normalised in the bundle as
    ``data/<name>-<i>.jsonl`` with ``kind`` set; a hub dataset keeps its id and options."""

    path: str
    format: str | None = None
    columns: dict[str, Any] | None = None
    weight: float | None = None
    max_rows: int | None = None
    config: str | None = None
    split: str = "train"
    streaming: bool | str = "auto"
    # Written by the bundler: messages / prompt_completion / text for a normalised local file.
    kind: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> SourceSpec:
        """Parse one source.

        Raises:
            ValueError: an unknown key, or a source that is not an object.
        """
        source: SourceSpec = _typed(cls, raw, "dataset.")
        return source


@dataclasses.dataclass(frozen=True)
class JobSpecData:
    """``spec`` of spec.json: the job as the agent runs it (paths rewritten for the bundle)."""

    model: str
    # A bundled file or hub id, or a list of sources (SourceSpec dicts); none for `loraburst
    # export`, which trains nothing.
    dataset: str | list[dict[str, Any]] = ""
    eval_dataset: str | list[dict[str, Any]] | None = None
    chat_template: str | None = None  # a name of templates.TEMPLATES or Jinja
    system_prompt: str | None = None
    data_checks: DataChecksSpec = dataclasses.field(default_factory=DataChecksSpec)
    method: str = "qlora"
    objective: ObjectiveSpec = dataclasses.field(default_factory=ObjectiveSpec)
    init_adapter: str | None = None  # "init_adapter": the bundled starting adapter
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    train: TrainSpec = dataclasses.field(default_factory=TrainSpec)
    quant: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    output_dir: str = "adapter"
    max_cost: float | None = None
    max_runtime: float | None = None
    name: str | None = None
    model_revision: str | None = None
    artifacts: str | None = None
    # What to ship (remote/export.py reads these as given).
    exports: list[Any] = dataclasses.field(default_factory=lambda: [{"kind": "adapter"}])
    hub: dict[str, Any] | None = None
    evaluation: EvaluationSpec = dataclasses.field(default_factory=EvaluationSpec)
    # Written by the bundler, not the user: names for exports and the model card.
    base_model: str | None = None
    dataset_name: str | None = None
    export_prompt: str | None = None  # `loraburst export --prompt`: the checks' prompt

    @property
    def quantized(self) -> bool:
        """Base weights in 4/8 bits (QLoRA, QDoRA); plain LoRA and bits=16 keep them as is."""
        return is_quantized(self.method, self.quant.bits)


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    """spec.json: what the agent is asked to run."""

    spec: JobSpecData
    job_id: str = "job"
    data_format: str = "messages"
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def from_dict(cls, raw: Any) -> BundleSpec:
        """Parse spec.json's content.

        Raises:
            ValueError: a key this code does not know, or a section that is not an object.
        """
        spec: BundleSpec = _typed(cls, raw, "")
        return spec

    @classmethod
    def read(cls, path: Path) -> BundleSpec:
        """Read and parse ``path`` (a bundle's spec.json)."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


_NESTED: dict[tuple[str, str], Any] = {
    ("BundleSpec", "spec"): JobSpecData,
    ("JobSpecData", "lora"): LoraSpec,
    ("JobSpecData", "objective"): ObjectiveSpec,
    ("JobSpecData", "train"): TrainSpec,
    ("JobSpecData", "quant"): QuantSpec,
    ("JobSpecData", "evaluation"): EvaluationSpec,
    ("JobSpecData", "data_checks"): DataChecksSpec,
}


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
