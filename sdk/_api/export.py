"""Exports on the client side: their results, their cost up front, and ``loraburst export``.

The work itself is :mod:`loraburst.remote.export`, the same code on a rented instance (called
by the trainer before teardown) and here (run in a subprocess by :func:`export` for a finished
job or any adapter folder). This module reads the report it writes, estimates the time and
disk an export list needs (:func:`export_cost`), and lays out a work directory for a later
export exactly as an instance has it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraburst.remote.export import (
    EXPORTS_DIR,
    LLAMA_CPP_GGUF,
    REPORT_FILE,
    export_name,
    parse_exports,
)
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    BUNDLE_DIR,
    PROTOCOL_VERSION,
    safe_extract,
    verify_manifest,
)

from .._exceptions import ArtifactError, ConfigError, JobError

__all__ = ["ExportCost", "ExportResult", "ExportRun", "export", "export_cost", "read_results"]

EXPORTS_MANIFEST = f"{EXPORTS_DIR}/manifest.json"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """One export of a job, as made and checked before teardown.

    Attributes:
        name: ``"adapter"``, ``"merged"`` or ``"gguf:<quant>"``.
        ok: made and every judged check passed; its files were pulled and verified.
        path: the local file or folder (None when it failed).
        checks: each ``{"name", "ok", "value", "limit", "detail"}``; ``ok`` None is a
            measurement reported but not judged (e.g. drift from the training-time model).
        details: what was done (merge base and dtype, tool and version, special ids).
        error: why it failed, naming the step or the failed check.
    """

    name: str
    kind: str
    ok: bool
    path: Path | None
    checks: tuple[dict[str, Any], ...] = ()
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    bytes: int = 0

    def describe(self) -> str:
        """One line: name, outcome, where, or why not."""
        if not self.ok:
            return f"{self.name}: FAILED: {self.error}"
        judged = [c for c in self.checks if c["ok"] is not None]
        where = f"{self.bytes / 1e6:.1f} MB at {self.path}" if self.path else "not kept"
        return f"{self.name}: ok ({len(judged)} checks passed, {where})"


def read_results(job_dir: Path) -> tuple[tuple[ExportResult, ...], dict[str, Any] | None]:
    """The export results (and the hub push's) under a pulled job folder; empty without any."""
    report_path = job_dir / REPORT_FILE
    if not report_path.is_file():
        return (), None
    report = json.loads(report_path.read_text())
    results = tuple(
        ExportResult(
            name=r["name"],
            kind=r["kind"],
            ok=bool(r["ok"]),
            path=job_dir / r["path"] if r["ok"] and r.get("path") else None,
            checks=tuple(r.get("checks") or ()),
            details=r.get("details") or {},
            error=r.get("error"),
            seconds=float(r.get("seconds") or 0.0),
            bytes=int(r.get("bytes") or 0),
        )
        for r in report.get("exports", [])
    )
    return results, report.get("hub")


# -- cost up front ---------------------------------------------------------------------------
# Rough throughputs of the export steps on a GPU instance (NVMe disk, tens of cores); not yet
# calibrated on one (benchmarks/ has no export run), so the estimate states that.
_MERGE_BPS = 0.4e9  # bytes of base weights merged (read, add, write) per second
_LOAD_BPS = 1.5e9  # bytes per second when a check loads a model
_GGUF_PARAMS_PS = 1.5e8  # parameters per second written by the pure-Python GGUF writer
_DEQUANT_PARAMS_PS = 1.0e8  # parameters per second dequantised by the weights check
_QUANTIZE_PARAMS_PS = 6.0e7  # parameters per second through llama-quantize
_LLAMA_CPP_BUILD_S = 300.0  # fetching and building llama.cpp once per instance
_GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q6_k": 0.82, "q5_k_m": 0.71,
                         "q5_0": 0.69, "q4_k_m": 0.61, "q4_0": 0.5625, "q3_k_m": 0.49,
                         "q2_k": 0.35}  # fmt: skip
_DISK_HEADROOM_GB = 10.0  # the image, pip caches, logs
_TRAIN_DISK_GB = 50  # what jobs without exports rent (providers' LaunchRequest default)


@dataclasses.dataclass(frozen=True)
class ExportCost:
    """Seconds the exports add to a job and the disk the instance needs for them."""

    seconds: float
    disk_gb: int
    note: str


def export_cost(exports: Sequence[Any], params: int, base_bytes: float) -> ExportCost:
    """Time and disk for ``exports`` of a model of ``params`` parameters (``base_bytes`` on
    disk): merge, its checks, each GGUF with its checks, llama.cpp's build when a K-quant
    needs it. Zero for the adapter alone."""
    entries = parse_exports(list(exports))
    merged = next((e for e in entries if e["kind"] == "merged"), None)
    ggufs = [e["quant"] for e in entries if e["kind"] == "gguf"]
    if merged is None and not ggufs:
        return ExportCost(0.0, _TRAIN_DISK_GB, "")
    dtype = (merged or {}).get("dtype", "auto")
    merged_bytes = base_bytes if dtype == "auto" else params * (4 if dtype == "float32" else 2)
    seconds = 2 * base_bytes / _MERGE_BPS + (3 * base_bytes + merged_bytes) / _LOAD_BPS
    disk = base_bytes + merged_bytes
    k_quants = [q for q in ggufs if q in LLAMA_CPP_GGUF]
    if k_quants:
        seconds += _LLAMA_CPP_BUILD_S + 2 * params / _MERGE_BPS  # + the 16-bit conversion
        disk += 2 * params
    for q in ggufs:
        write = params / (_QUANTIZE_PARAMS_PS if q in LLAMA_CPP_GGUF else _GGUF_PARAMS_PS)
        seconds += write + params / _DEQUANT_PARAMS_PS + params * 4 / _LOAD_BPS
        disk += params * _GGUF_BYTES_PER_PARAM[q]
    disk_gb = max(_TRAIN_DISK_GB, math.ceil(disk / 1e9 + _DISK_HEADROOM_GB))
    names = ", ".join(export_name(e) for e in entries if e["kind"] != "adapter")
    note = (f"exports ({names}): ~{seconds / 60:.0f} min and {disk_gb} GB of instance disk "
            "(rough: export speed not yet measured on a GPU instance)")  # fmt: skip
    return ExportCost(round(seconds, 1), disk_gb, note)


# -- later, locally --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportRun:
    """What ``loraburst export`` made: the folder holding ``exports/``, each result, the hub's."""

    folder: Path
    results: tuple[ExportResult, ...]
    hub: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """Every export made and checked (and the hub push, when asked)."""
        return all(r.ok for r in self.results) and (self.hub is None or bool(self.hub.get("ok")))


def _from_job(job_id: str, work: Path) -> tuple[Path, dict[str, Any], str]:
    """The job's adapter, its spec, and its bundle's rows laid out in ``work``."""
    from .._state.home import home
    from .._state.ledger import Ledger

    row = Ledger().job(job_id)
    if row is None:
        raise ConfigError(f"no job {job_id!r} in the ledger; `loraburst ls` lists jobs")
    if not row.adapter_path or not Path(row.adapter_path).is_dir():
        raise JobError(f"job {job_id} has no adapter on this machine ({row.status})", job_id=job_id)
    spec: dict[str, Any] = json.loads(row.spec_json)
    data_format = "messages"
    bundle = home() / "bundles" / f"{row.bundle_sha256}.tar"
    if row.bundle_sha256 and bundle.is_file():
        # The bundle holds the job's normalised rows: the checks prompt with its first row.
        safe_extract(bundle, work / BUNDLE_DIR)
        data_format = json.loads((work / BUNDLE_DIR / "spec.json").read_text())["data_format"]
    return Path(row.adapter_path), spec, data_format


def _from_adapter(folder: Path, model: str | None) -> tuple[Path, dict[str, Any], str]:
    config = json.loads((folder / "adapter_config.json").read_text())
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{folder}/adapter_config.json names no base model; pass --model")
    metrics_path = folder.parent / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    bits = metrics.get("quantized_bits")
    spec = {"model": str(base), "method": metrics.get("method", "lora" if bits is None else "qlora"),
            "quant": {"bits": bits or 16, "quant_type": "nf4", "double_quant": True,
                      "compute_dtype": "auto"}}  # fmt: skip
    return folder, spec, "messages"


def export(
    source: str | Path,
    to: Sequence[Any],
    *,
    model: str | None = None,
    prompt: str | None = None,
    hub: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ExportRun:
    """Export a finished job's adapter (by job id) or any adapter folder, on this machine.

    The same code as on an instance runs in a subprocess, so this process never imports
    torch; every export is checked, and the files are verified against their manifest.

    Args:
        source: a job id from ``loraburst ls`` or an adapter folder.
        to: exports, as in the spec (``["merged", "gguf:q4_k_m"]``).
        model: the base model (default: the job's, or the adapter's ``base_model_name_or_path``).
        prompt: the user turn the generation checks start from (default: the job's first row).
        hub: ``{"repo": "user/name", "private": True}`` to push the verified exports
            (``HF_TOKEN`` from the environment).
        output_dir: where ``exports/`` lands (default: beside the adapter).

    Raises:
        ConfigError: unknown source or export name.
        JobError: the export process failed before writing its report.
        ArtifactError: a produced file does not match its manifest.
    """
    from .._state.home import runs_dir

    try:
        entries = parse_exports(list(to))
    except ValueError as exc:
        raise ConfigError(f"--to: {exc}") from None
    if hub is not None:
        from .spec import HubConfig

        hub = HubConfig.model_validate(dict(hub)).model_dump()
    work = runs_dir() / f"export-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work.mkdir(parents=True)
    folder = Path(source).expanduser()
    if (folder / "adapter_config.json").is_file():
        adapter, spec, data_format = _from_adapter(folder.resolve(), model)
    else:
        adapter, spec, data_format = _from_job(str(source), work)
    if model:
        spec["model"] = model
    local = Path(str(spec["model"])).expanduser()
    spec.update(exports=entries, hub=hub, export_prompt=prompt)
    if local.is_dir():
        spec["model"] = str(local.resolve())
        spec.setdefault("base_model", local.name)
    doc = {"protocol_version": PROTOCOL_VERSION, "data_format": data_format, "spec": spec}
    (work / BUNDLE_DIR).mkdir(exist_ok=True)
    (work / BUNDLE_DIR / "spec.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    (work / ADAPTER_DIR).symlink_to(adapter, target_is_directory=True)
    if (adapter.parent / "metrics.json").is_file():  # steps and loss for the model card
        shutil.copyfile(adapter.parent / "metrics.json", work / "metrics.json")
    log = work / "export.log"
    with open(log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "loraburst.remote.export", str(work)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **dict(env or {})},
        ).returncode  # fmt: skip
    manifest_path = work / EXPORTS_MANIFEST
    if rc != 0 or not manifest_path.is_file():
        tail = log.read_text(errors="replace")[-1500:]
        raise JobError(f"the export process failed (exit {rc}); its log {log} ends:\n{tail}")
    manifest = json.loads(manifest_path.read_text())
    dest = Path(output_dir).expanduser() if output_dir else adapter.parent
    target = dest / EXPORTS_DIR
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work / EXPORTS_DIR), str(target))
    bad = verify_manifest(dest, manifest)
    if bad:
        raise ArtifactError(f"exports in {dest} do not match their manifest: {bad}")
    results, hub_result = read_results(dest)
    shutil.rmtree(work, ignore_errors=True)
    return ExportRun(dest, results, hub_result)
