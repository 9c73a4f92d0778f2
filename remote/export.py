"""Exports after training, on the instance and before teardown: merged weights, GGUF, the hub.

``python -m loraburst.remote.export WORKDIR`` runs them on their own (``loraburst export``);
the trainer calls :func:`run` once the adapter is saved. Layout under the work directory::

    exports/merged/              base + adapter, a standalone HF model folder (safetensors)
    exports/<name>.<quant>.gguf  one file per GGUF export
    exports/report.json          one entry per export: ok, checks, details, error
    exports/.work/               intermediates (a merge only GGUF needs, llama.cpp's 16-bit
                                 file), removed before the manifest is written

An export that fails (or fails a check) is reported with its reason and its files are removed,
so they are never pulled; the adapter and the other exports still come back. The export names
(:func:`parse_exports`) are shared with the client, which validates the spec with them.

Standard library only at module level; torch & co. inside the functions.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import ADAPTER_DIR, BUNDLE_DIR, EXPORTS_DIR, build_manifest, write_atomic

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = [
    "EXPORTS_DIR",
    "GGUF_QUANTS",
    "MERGE_BASES",
    "MERGE_DTYPES",
    "REPORT_FILE",
    "export_name",
    "main",
    "parse_exports",
    "run",
]

REPORT_FILE = f"{EXPORTS_DIR}/report.json"
EXPORTS_MANIFEST = f"{EXPORTS_DIR}/manifest.json"
_WORK = f"{EXPORTS_DIR}/.work"
# Written by the gguf package in pure Python / made by llama.cpp's converter and quantiser.
PURE_GGUF = ("f16", "bf16", "q8_0")
LLAMA_CPP_GGUF = ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q3_k_m", "q2_k")
GGUF_QUANTS = PURE_GGUF + LLAMA_CPP_GGUF
MERGE_DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                "f16": "float16", "float16": "float16", "fp32": "float32", "f32": "float32",
                "float32": "float32"}  # fmt: skip
MERGE_BASES = ("original", "dequantized")
_KINDS = ("adapter", "merged", "gguf")


def _suggest(value: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one(item: Any) -> dict[str, Any]:
    if isinstance(item, dict) and "kind" in item:  # already canonical (spec.json)
        kind, opts = item["kind"], {k: v for k, v in item.items() if k != "kind"}
    elif isinstance(item, dict) and len(item) == 1:
        kind, raw = next(iter(item.items()))
        opts = raw if isinstance(raw, dict) else {"quant" if kind == "gguf" else "dtype": raw}
    elif isinstance(item, str):
        kind, _, arg = item.strip().partition(":")
        opts = {"quant" if kind == "gguf" else "dtype": arg} if arg else {}
    else:
        raise ValueError(f"export {item!r} must be a name such as 'merged' or 'gguf:q4_k_m'")
    kind = str(kind).strip().lower()
    if kind not in _KINDS:
        raise ValueError(f"unknown export {kind!r}{_suggest(kind, _KINDS)} (known: adapter, "
                         f"merged[:dtype], gguf:<{'|'.join(GGUF_QUANTS)}>)")  # fmt: skip
    allowed = {"adapter": set(), "merged": {"dtype", "base"}, "gguf": {"quant"}}[kind]
    for key in opts:
        if key not in allowed:
            hint = _suggest(str(key), sorted(allowed))
            raise ValueError(f"export {kind!r} has no option {key!r}{hint}"
                             f" (options: {', '.join(sorted(allowed)) or 'none'})")  # fmt: skip
    if kind == "adapter":
        return {"kind": "adapter"}
    if kind == "merged":
        dtype = str(opts.get("dtype") or "auto").lower()
        if dtype not in MERGE_DTYPES:
            raise ValueError(f"merged dtype {dtype!r} is not one of auto, bfloat16, float16, "
                             f"float32{_suggest(dtype, list(MERGE_DTYPES))}")  # fmt: skip
        base = str(opts.get("base") or "original").lower()
        if base not in MERGE_BASES:
            raise ValueError(f"merged base {base!r} is not 'original' (the checkpoint's weights) "
                             f"or 'dequantized' (their 4-bit rounding, as trained)"
                             f"{_suggest(base, MERGE_BASES)}")  # fmt: skip
        return {"kind": "merged", "dtype": MERGE_DTYPES[dtype], "base": base}
    quant = str(opts.get("quant") or "").lower()
    if quant not in GGUF_QUANTS:
        raise ValueError(f"gguf quantisation {quant!r} is not one of {', '.join(GGUF_QUANTS)}"
                         f"{_suggest(quant, GGUF_QUANTS)}")  # fmt: skip
    return {"kind": "gguf", "quant": quant}


def parse_exports(items: list[Any]) -> list[dict[str, Any]]:
    """Canonical export entries from the spec's ``exports`` list.

    Accepts ``"adapter"``, ``"merged"``, ``"merged:bf16"``, ``"gguf:q4_k_m"``,
    ``{"merged": {"dtype": "bf16", "base": "dequantized"}}`` and ``{"gguf": "q8_0"}``.

    Raises:
        ValueError: an unknown name or option (with a did-you-mean), or a duplicate.
    """
    out: list[dict[str, Any]] = []
    for item in items:
        entry = _one(item)
        name = export_name(entry)
        if any(export_name(e) == name for e in out):
            raise ValueError(f"export {name!r} is listed twice")
        out.append(entry)
    return out


def export_name(entry: dict[str, Any]) -> str:
    """``adapter``, ``merged`` or ``gguf:<quant>``: how results and the CLI name an export."""
    return f"gguf:{entry['quant']}" if entry["kind"] == "gguf" else str(entry["kind"])


def _gguf_file(spec: dict[str, Any], quant: str) -> str:
    stem = spec.get("name") or Path(str(spec.get("base_model") or spec["model"])).name or "model"
    return f"{stem}.{quant}.gguf"


def _local_model(model_path: str, spec: dict[str, Any]) -> Path:
    """A local folder of the base weights (a hub model is already in the cache after training)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, revision=spec.get("model_revision"),
                                  allow_patterns=["*.json", "*.safetensors", "*.model",
                                                  "*.txt", "*.jinja"]))  # fmt: skip


def _ensure_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        import subprocess

        from .gguf_export import GGUF_REQUIREMENT

        subprocess.run([sys.executable, "-m", "pip", "install", "-q", GGUF_REQUIREMENT],
                       check=True, capture_output=True)  # fmt: skip


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Exporter:
    """One run of a job's exports; each step records its own result."""

    def __init__(self, workdir: Path, doc: dict[str, Any], model_path: str,
                 reporter: Reporter | None) -> None:  # fmt: skip
        self.workdir, self.doc, self.spec = workdir, doc, doc["spec"]
        self.model_path, self.reporter = model_path, reporter
        self.adapter = workdir / ADAPTER_DIR
        self.results: list[dict[str, Any]] = []
        self.tools: Any = None
        self._made_by = ""
        self.prompt: tuple[str, int, str] | None = None

    def _event(self, kind: str, **fields: Any) -> None:
        if self.reporter is not None:
            self.reporter.event(kind, **fields)

    def _stopped(self) -> str | None:
        return self.reporter.stop_reason if self.reporter is not None else None

    def _record(self, name: str, kind: str, t0: float, *, path: Path | None = None,
                checks: list[dict[str, Any]] | None = None, details: dict[str, Any] | None = None,
                error: str | None = None) -> dict[str, Any]:  # fmt: skip
        checks = checks or []
        failed = [c for c in checks if c["ok"] is False]
        if failed and error is None:
            error = "; ".join(f"check {c['name']} failed: {c['detail']}" for c in failed)
        ok = error is None
        if not ok and path is not None and path.exists():
            # A failed export is never pulled: it would cost the transfer and mislead.
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        result = {
            "name": name, "kind": kind, "ok": ok,
            "path": path.relative_to(self.workdir).as_posix() if ok and path else None,
            "bytes": _size(path) if ok and path else 0,
            "seconds": round(time.time() - t0, 2), "checks": checks,
            "details": details or {}, "error": error,
        }  # fmt: skip
        self.results.append(result)
        self._event("export", name=name, ok=ok, seconds=result["seconds"],
                    **({"error": error[:300]} if error else {}))  # fmt: skip
        return result

    def _prompt(self, folder: Path) -> tuple[str, int, str]:
        if self.prompt is None:
            from transformers import AutoTokenizer

            from .export_checks import job_prompt

            override = self.spec.get("export_prompt")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            self.prompt = job_prompt(self.workdir, self.doc, tokenizer)
            if override:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": override}], tokenize=False,
                    add_generation_prompt=True,
                ) if tokenizer.chat_template else override  # fmt: skip
                self.prompt = (str(text), self.prompt[1], "export prompt")
        return self.prompt

    def merge(self, entry: dict[str, Any], requested: bool) -> Path | None:
        from . import export_checks, merge

        t0 = time.time()
        out = self.workdir / (f"{EXPORTS_DIR}/merged" if requested else f"{_WORK}/merged")
        self._event("export_started", name="merged", base=entry["base"], dtype=entry["dtype"])
        try:
            base = _local_model(self.model_path, self.spec)
            report = merge.merge(base, self.adapter, out, into=entry["base"],
                                 dtype=entry["dtype"], quant=self.spec.get("quant"))  # fmt: skip
            prompt, limit, source = self._prompt(out)
            checks = export_checks.check_merged(
                out, base, self.adapter, into=entry["base"], quant=self.spec.get("quant", {}),
                quantized_job=self.spec.get("method") != "lora"
                and self.spec.get("quant", {}).get("bits") in (4, 8),
                prompt=prompt, limit=limit,
            )  # fmt: skip
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)
            self._record("merged", "merged", t0, path=out if requested else None,
                         error=f"merge: {type(exc).__name__}: {exc}")  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            return None
        details = {**report.to_dict(), "prompt_source": source, "token_limit": limit,
                   "statement": _statement(report.into, self.spec)}  # fmt: skip
        result = self._record("merged", "merged", t0, path=out if requested else None,
                              checks=checks, details=details)  # fmt: skip
        if not requested and any(c["ok"] is False for c in checks):
            return None  # GGUF of a merge that failed its checks would only repeat the failure
        return out if result["ok"] or not requested else None

    def gguf(self, quant: str, merged: Path) -> None:
        from . import export_checks, gguf_export, llama_cpp

        name = f"gguf:{quant}"
        t0 = time.time()
        path = self.workdir / EXPORTS_DIR / _gguf_file(self.spec, quant)
        self._event("export_started", name=name)
        step = "write"
        try:
            _ensure_gguf()
            details: dict[str, Any] = {}
            written = False
            if quant in PURE_GGUF:
                try:
                    details = gguf_export.write(merged, path, quant, name=path.stem)
                    written = True
                except gguf_export.Unsupported as why:
                    details = {"pure_python_refused": f"pure-Python writer: {why}"}
            if not written:
                step = "llama.cpp"
                self.tools = self.tools or llama_cpp.install()
                if quant in PURE_GGUF:
                    self.tools.convert(merged, path, quant)
                    details = {**details, "tool": f"llama.cpp {self.tools.version}",
                               "converter": "convert_hf_to_gguf.py"}  # fmt: skip
                else:
                    base16, made_by = self._intermediate(merged)
                    self.tools.quantize(base16, path, quant)
                    details = {**details, "tool": f"llama.cpp {self.tools.version}",
                               "quantizer": "llama-quantize", "16-bit source": made_by}  # fmt: skip
            step = "check"
            prompt, limit, _ = self._prompt(merged)
            tools = self.tools or llama_cpp.find()
            checks = export_checks.check_gguf(path, merged, quant, prompt=prompt, limit=limit,
                                              tools=tools)  # fmt: skip
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)
            self._record(name, "gguf", t0, path=path, error=f"{step}: {type(exc).__name__}: {exc}")
            return
        self._record(name, "gguf", t0, path=path, checks=checks, details=details)

    def _intermediate(self, merged: Path) -> tuple[Path, str]:
        """The 16-bit GGUF that llama-quantize starts from, made once per run: by the
        pure-Python writer where it knows the model (its tokenizer metadata is what the checks
        verify, and it needs no entry in the converter's table of known tokenizers, the usual
        way conversions break), else by llama.cpp's converter."""
        from . import gguf_export

        config = json.loads((merged / "config.json").read_text())
        bf16 = str(config.get("torch_dtype", config.get("dtype"))) == "bfloat16"
        outtype = "bf16" if bf16 else "f16"  # f16 would overflow some bf16 weights
        path = self.workdir / _WORK / f"model.{outtype}.gguf"
        if path.is_file():
            return path, self._made_by
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            gguf_export.write(merged, path, outtype, name=_gguf_file(self.spec, outtype)[:-5])
            self._made_by = f"gguf-py ({gguf_export.GGUF_REQUIREMENT})"
        except gguf_export.Unsupported:
            self.tools.convert(merged, path, outtype)
            self._made_by = "convert_hf_to_gguf.py"
        return path, self._made_by

    def hub(self, hub: dict[str, Any]) -> dict[str, Any]:
        from . import hub as hub_push

        t0 = time.time()
        files: dict[str, Path] = {}
        ok = {r["name"]: r for r in self.results if r["ok"]}
        merged = self.workdir / EXPORTS_DIR / "merged"
        if "merged" in ok and merged.is_dir():
            files.update(
                {p.relative_to(merged).as_posix(): p for p in merged.rglob("*") if p.is_file()}
            )
        for r in self.results:
            if r["kind"] == "gguf" and r["ok"]:
                p = self.workdir / r["path"]
                files[p.name] = p
        if "adapter" in ok:
            prefix = "adapter/" if files else ""
            # peft's own README is a placeholder card naming a local path: ours replaces it.
            files.update({f"{prefix}{p.relative_to(self.adapter).as_posix()}": p
                          for p in self.adapter.rglob("*")
                          if p.is_file() and p.name != "README.md"})  # fmt: skip
        metrics_path = self.workdir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        card = hub_push.model_card(self.spec, self.doc, metrics, self.results)
        result = hub_push.push(hub, files, card)
        result["seconds"] = round(time.time() - t0, 2)
        self._event("hub", ok=result["ok"], repo=hub.get("repo"), **(
            {"error": result["error"][:300]} if result.get("error") else {}))  # fmt: skip
        return result


def _statement(into: str, spec: dict[str, Any]) -> str:
    quantized = spec.get("method") != "lora" and spec.get("quant", {}).get("bits") in (4, 8)
    if into == "dequantized":
        return ("merged into the 4-bit rounding of the base weights the adapter was trained on "
                "(bitsandbytes' own quantise/dequantise), then stored unquantised")  # fmt: skip
    if quantized:
        return ("merged into the base checkpoint's original weights (not a dequantised 4-bit "
                "copy); the adapter was trained against their 4-bit rounding, see "
                "drift_from_training_model")  # fmt: skip
    return "merged into the base checkpoint's original weights (the ones it was trained on)"


def run(workdir: Path, doc: dict[str, Any], model_path: str,
        reporter: Reporter | None = None) -> list[str]:  # fmt: skip
    """Run the job's exports; returns the work-directory-relative paths to add to the
    manifest (empty when the job asks for the adapter alone)."""
    spec = doc["spec"]
    entries = parse_exports(spec.get("exports") or ["adapter"])
    hub = spec.get("hub")
    if all(e["kind"] == "adapter" for e in entries) and not hub:
        return []
    root = workdir / EXPORTS_DIR
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if reporter is not None:
        reporter.update(phase="exporting")
    ex = _Exporter(workdir, doc, model_path, reporter)
    if any(e["kind"] == "adapter" for e in entries):
        ex.results.append({"name": "adapter", "kind": "adapter", "ok": True, "path": ADAPTER_DIR,
                           "bytes": _size(workdir / ADAPTER_DIR), "seconds": 0.0, "checks": [],
                           "details": {}, "error": None})  # fmt: skip
    merged_entry = next((e for e in entries if e["kind"] == "merged"), None)
    ggufs = [e["quant"] for e in entries if e["kind"] == "gguf"]
    merged: Path | None = None
    if merged_entry or ggufs:
        entry = merged_entry or {"kind": "merged", "dtype": "auto", "base": "original"}
        merged = ex.merge(entry, requested=merged_entry is not None)
    for quant in ggufs:
        reason = ex._stopped()
        if merged is None or reason:
            why = f"stopped ({reason})" if reason else "the merge it is made from failed"
            ex.results.append({"name": f"gguf:{quant}", "kind": "gguf", "ok": False, "path": None,
                               "bytes": 0, "seconds": 0.0, "checks": [], "details": {},
                               "error": f"skipped: {why}"})  # fmt: skip
            continue
        ex.gguf(quant, merged)
    shutil.rmtree(workdir / _WORK, ignore_errors=True)
    report: dict[str, Any] = {"exports": ex.results, "hub": None}
    if hub:
        report["hub"] = ex.hub(hub)
    write_atomic(workdir / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True))
    paths = [r["path"] for r in ex.results if r["ok"] and r["path"] and r["kind"] != "adapter"]
    return [*paths, REPORT_FILE]


def main(argv: list[str] | None = None) -> int:
    """``python -m loraburst.remote.export WORKDIR``: the exports of a finished job, on their
    own (the work directory holds ``bundle/spec.json`` and ``adapter/``); writes
    ``exports/manifest.json``. Exit 0 when the report was written, 1 when it could not be."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m loraburst.remote.export WORKDIR", file=sys.stderr)
        return 2
    from .protocol import BundleSpec
    from .training.loading import model_path

    workdir = Path(args[0]).resolve()
    doc = json.loads((workdir / BUNDLE_DIR / "spec.json").read_text())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        paths = run(workdir, doc, model_path(workdir, BundleSpec.from_dict(doc).spec))
    except Exception as exc:
        traceback.print_exc()
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    manifest = build_manifest(workdir, paths)
    write_atomic(workdir / EXPORTS_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
