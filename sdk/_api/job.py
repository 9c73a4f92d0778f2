"""``Job``: the user's handle on a fine-tune — validate, estimate, run, attach."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ValidationError

from .._data.bundle import init_adapter_files
from .._data.dataset import PreparedDataset
from .._exceptions import ConfigError
from .spec import (
    DataChecks,
    DataSource,
    EvaluationConfig,
    HubConfig,
    JobSpec,
    LoraConfig,
    ObjectiveConfig,
    QuantConfig,
    TrainConfig,
    spec_error,
)

if TYPE_CHECKING:
    from loraburst.providers import Provider

    from .._cost.estimate import Estimate
    from .._data.report import DataReport
    from .result import JobResult

__all__ = ["Job"]


class Job:
    """A QLoRA/LoRA/DoRA fine-tuning job.

    Example::

        job = Job("meta-llama/Llama-3.1-8B", "data.jsonl", train={"max_steps": 500})
        print(job.estimate())
        result = job.run(provider=["runpod", "lambda", "local"], max_cost=5.0)

    Args:
        model: a hub id or a local folder with config.json (shipped inside the bundle).
        dataset: a JSONL/JSON/CSV/Parquet file, a ``save_to_disk`` folder, a list of dicts, or a
            hub id (loaded on the instance); or a source, ``{"path": ..., "columns":
            {"prompt": "instruction", "response": "response"}, "max_rows": 2000}`` (see
            ``DataSource``), or a list of sources (a mix, with optional ``weight`` shares).
        eval_dataset: the same, held out for evaluation.
        chat_template, system_prompt, data_checks: see ``JobSpec``.
        method: ``"qlora"`` (4-bit NF4 base, the default), ``"lora"`` (bf16 base) or ``"dora"``.
        objective: ``"sft"`` (the default), ``"dpo"`` or ``"orpo"``, or a mapping with ``type``
            and options (``beta``, ``loss_type``, ``reference``, ``max_prompt_len``); dpo/orpo
            datasets hold ``prompt``/``chosen``/``rejected`` pairs.
        init_adapter: start from this adapter (a folder, or a previous job's ``JobResult``)
            instead of a fresh one.
        lora, train, quant: sections of the spec, as dicts or config objects.
        output_dir: where the verified adapter lands (``<output_dir>/<job id>/adapter``).
        max_cost: dollar cap; refused before launch when the estimate could exceed it, and
            enforced at runtime (the partial adapter comes back with ``budget_exhausted``).
        exports: what to ship besides the adapter, made and checked on the instance before
            teardown: ``["merged", "gguf:q4_k_m"]`` (see ``JobSpec.exports``); results in
            ``JobResult.exports``.
        hub: ``{"repo": "user/name", "private": True}``: push the verified exports there with a
            model card (token from ``HF_TOKEN``).
        evaluation: base against tuned on the instance before teardown (held-out loss,
            samples, optional lm-eval ``tasks``, a ``min_loss_drop`` threshold); on whenever
            there are held-out rows (see ``EvaluationConfig``); results in
            ``JobResult.evaluation`` and the report.

    Raises:
        ConfigError: any invalid field, naming it and how to fix it.
    """

    def __init__(
        self,
        model: str,
        dataset: str | Path | DataSource | Mapping[str, Any] | Sequence[Any],
        *,
        eval_dataset: str | Path | DataSource | Mapping[str, Any] | Sequence[Any] | None = None,
        method: Literal["qlora", "lora", "dora"] = "qlora",
        objective: str | ObjectiveConfig | Mapping[str, Any] | None = None,
        init_adapter: str | Path | Any = None,
        lora: LoraConfig | Mapping[str, Any] | None = None,
        train: TrainConfig | Mapping[str, Any] | None = None,
        quant: QuantConfig | Mapping[str, Any] | None = None,
        output_dir: str | Path = "outputs",
        max_cost: float | None = None,
        max_runtime: float | None = None,
        name: str | None = None,
        artifacts: str | None = None,
        model_revision: str | None = None,
        exports: Sequence[Any] | None = None,
        hub: HubConfig | Mapping[str, Any] | None = None,
        evaluation: EvaluationConfig | Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        data_checks: DataChecks | Mapping[str, Any] | None = None,
    ) -> None:
        raw: dict[str, Any] = {
            "chat_template": chat_template,
            "system_prompt": system_prompt,
            "model": str(model),
            "dataset": _dataset_value(dataset),
            "eval_dataset": _dataset_value(eval_dataset),
            "method": method,
            "output_dir": str(output_dir),
            "max_cost": max_cost,
            "max_runtime": max_runtime,
            "name": name,
            "artifacts": artifacts,
            "model_revision": model_revision,
        }
        if objective is not None:
            raw["objective"] = objective.model_dump() if isinstance(objective, ObjectiveConfig) else (
                objective if isinstance(objective, str) else dict(objective))  # fmt: skip
        if init_adapter is not None:
            raw["init_adapter"] = init_adapter
        if exports is not None:
            raw["exports"] = exports if isinstance(exports, str) else list(exports)
        sections = (
            ("lora", lora), ("train", train), ("quant", quant), ("hub", hub),
            ("evaluation", evaluation), ("data_checks", data_checks),
        )  # fmt: skip
        for key, section in sections:
            if section is not None:
                raw[key] = section.model_dump() if hasattr(section, "model_dump") else dict(section)
        self.spec = self._validate(raw)
        self._prepared: tuple[PreparedDataset, PreparedDataset | None] | None = None
        self.report: DataReport | None = None

    @staticmethod
    def _validate(raw: Mapping[str, Any], source: str | Path | None = None) -> JobSpec:
        try:
            return JobSpec.model_validate(dict(raw))
        except ValidationError as exc:
            raise spec_error(exc, source) from None

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Job:
        job = cls.__new__(cls)
        job.spec = spec
        job._prepared = None
        job.report = None
        return job

    @classmethod
    def from_yaml(cls, path: str | Path) -> Job:
        """Load a job from YAML; relative dataset/model/output paths are relative to the file.

        Raises:
            ConfigError: unreadable YAML, unknown keys (with a did-you-mean) or bad values.
        """
        path = Path(path)
        raw = load_yaml_file(path, "job file")
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: a job file must be a mapping of keys such as model:, dataset:, train:"
            )
        base = path.resolve().parent
        for key in ("dataset", "eval_dataset", "model", "output_dir", "init_adapter"):
            if key in raw:
                raw[key] = _relative_to(base, raw[key], key)
            for source in _source_dicts(raw.get(key)):
                source["path"] = _relative_to(base, source.get("path"), key)
        return cls.from_spec(cls._validate(raw, path))

    def to_yaml(self) -> str:
        """The spec as YAML (defaults included), loadable with ``Job.from_yaml``."""
        data = self.spec.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    # -- data -----------------------------------------------------------------------------
    def prepare(self) -> tuple[PreparedDataset, PreparedDataset | None]:
        """Validate every row of the datasets (cached) and build the data report
        (``self.report``, kept even when rows fail).

        Raises:
            DatasetError: rows that fail their checks (naming file:line), or a
                ``data_checks`` threshold the report exceeds.
        """
        if self._prepared is None:
            from .._data.mix import prepare_field
            from .._data.report import ReportBuilder

            s = self.spec
            mix = isinstance(s.dataset, list) and any(isinstance(v, DataSource) for v in s.dataset)
            if s.objective.preference and mix:
                raise ConfigError(
                    f"objective: {s.objective.type} trains on pairs from one dataset; dataset: is "
                    "a mix of sources. Give one file (or hub dataset) of prompt/chosen/rejected"
                )
            builder = ReportBuilder(s.train.max_seq_len, s.data_checks)
            common: dict[str, Any] = {
                "max_seq_len": s.train.max_seq_len,
                "tokenizer": s.model,
                "chat_template": s.chat_template,
                "system_prompt": s.system_prompt,
                "observer": builder,
                "pairs": s.objective.preference,
            }
            try:
                train = prepare_field(s.dataset, field="dataset", **common)
                ev = None
                if s.eval_dataset is not None:
                    ev = prepare_field(s.eval_dataset, field="eval_dataset", **common)
            finally:
                self.report = builder.finish()
            self.report.enforce()
            init_adapter_files(s)  # a missing starting adapter fails here, before renting
            self._prepared = (train, ev)
        return self._prepared

    def validate(self) -> PreparedDataset:
        """Check the spec and every dataset row; return the training set with its stats."""
        return self.prepare()[0]

    def cache_key(self) -> str:
        """Hash of (base model id + revision or local folder, dataset bytes, spec, trainer code).

        Fields that do not change the trained adapter (name, output_dir, budgets) are left out.
        """
        from .._data.bundle import _code_files
        from .._data.model_folder import fingerprint, local_model_dir

        train, ev = self.prepare()
        h = hashlib.sha256()
        spec = self.spec.model_dump(
            mode="json",
            exclude={
                "name",
                "output_dir",
                "max_cost",
                "max_runtime",
                "artifacts",
                "dataset",
                "eval_dataset",
            },
        )
        h.update(json.dumps(spec, sort_keys=True).encode())
        for ds in (train, ev):
            # The normalised rows' sha256 stands for their bytes (they are never all in memory).
            h.update(b"|" + str(ds and (ds.sha256 or ds.hub_id)).encode())
        model_dir = local_model_dir(self.spec.model)
        if model_dir is not None:
            # Path, sizes and mtimes: hashing 16 GB of weights for every run costs more than a
            # cache miss after a copy or a touch.
            h.update(f"|{model_dir}:{fingerprint(model_dir)}".encode())
        for rel, p in init_adapter_files(self.spec):  # the starting adapter's content
            h.update(f"|{rel}:".encode() + p.read_bytes())
        for _, p in _code_files():
            h.update(p.read_bytes())
        return h.hexdigest()

    # -- estimate -------------------------------------------------------------------------
    def estimate(
        self,
        gpus: Sequence[str] | None = None,
        providers: Sequence[str] | None = None,
        *,
        live: bool = True,
        history: bool = True,
    ) -> Estimate:
        """Time, peak VRAM and dollars on every GPU of every provider, before renting.

        Live prices replace the dated snapshot for providers whose API key is configured.
        With ``history`` (the default) each row is corrected by what your finished jobs
        measured on the same provider, GPU and model family, and a note says so.
        """
        from .._cost.placement import estimate_job

        return estimate_job(self, gpus=gpus, providers=providers, live=live, history=history)

    # -- run ------------------------------------------------------------------------------
    def run(
        self,
        provider: Any = "local",
        *,
        gpu: str | Sequence[str] | float | None = None,
        max_price_per_hour: float | None = None,
        prefer: Literal["cheapest", "fastest"] = "cheapest",
        deadline: float | None = None,
        max_cost: float | None = None,
        cache: bool = True,
        progress: bool = True,
        env: Mapping[str, str] | None = None,
        allow_partial: bool = False,
    ) -> JobResult:
        """Run the job: validate, bundle, place, train, pull the verified adapter, tear down.

        Args:
            provider: a name (``"runpod"``), a provider object, an ordered fallback chain
                (``["runpod", "lambda", "local"]``) or ``"auto"`` (every configured provider
                plus local).
            gpu: GPU name(s) to allow, each optionally with a count (``"2x RTX 3090"``: only
                instances of two, trained on under torchrun), or a minimum VRAM in GB.
            max_price_per_hour: skip offers above this $/h.
            prefer: rank feasible offers by estimated total cost or by time.
            deadline: seconds the job may take end to end (offers that cannot meet it are
                skipped).
            max_cost: overrides the spec's ``max_cost``.
            cache: return an identical finished job's adapter at $0.
            allow_partial: start even when the estimate's upper bound exceeds ``max_cost``;
                training then stops at the cap and the partial adapter comes back
                (``status="budget_exhausted"``). By default such a job is refused up front.
            env: extra environment for the agent (e.g. ``AWS_*`` for ``artifacts=``); values
                travel over SSH only, never into the bundle or the ledger.

        Raises:
            DatasetError, ConfigError: before anything is rented.
            BudgetExceededError: the estimate's upper bound exceeds ``max_cost``.
            PlacementError: every offer failed (the message has a table of attempts).
            TeardownError: an instance could not be confirmed terminated (run cleanup).
        """
        from .._lifecycle.run import execute

        return execute(
            self,
            provider,
            gpu=gpu,
            max_price_per_hour=max_price_per_hour,
            prefer=prefer,
            deadline=deadline,
            max_cost=max_cost if max_cost is not None else self.spec.max_cost,
            cache=cache,
            progress=progress,
            env=env,
            allow_partial=allow_partial,
        )

    @classmethod
    def attach(
        cls, job_id: str, *, providers: Mapping[str, Provider] | None = None, progress: bool = True
    ) -> JobResult:
        """Finish a job another client left (it died, or its disk was full): follow it, pull
        the adapter, tear down; if its instance is gone, resume from the checkpoints kept in
        ``$LORABURST_HOME/runs/<job>`` on the same provider and GPU.

        Raises:
            JobError: another live process follows the job, or it cannot be finished.
            LocalStorageError: this machine still cannot store the adapter (the instance is
                kept for another attach).
        """
        from .._lifecycle.run import attach

        return attach(job_id, providers=providers, progress=progress)

    def __repr__(self) -> str:
        return (
            f"Job(model={self.spec.model!r}, dataset={_short(self.spec.dataset)}, "
            f"method={self.spec.method!r})"
        )


# A job or batch file holds settings, never data: anything bigger is a wrong path (a dataset,
# /dev/zero) and is refused before it is read into memory.
MAX_YAML_BYTES = 1 << 20


def load_yaml_file(path: Path, what: str) -> Any:
    """Parse a small YAML settings file, with every failure a ConfigError naming ``path``.

    Raises:
        ConfigError: not a regular file, over 1 MiB, unreadable, not UTF-8, or invalid YAML
            (naming the line).
    """
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{what} {path} is not a regular file; give a .yaml file")
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path: the OS cannot even be asked
        raise ConfigError(f"cannot read {what} {path!r}: {exc}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{what} {path} is over {MAX_YAML_BYTES >> 20} MiB; it should hold settings only "
            "(put rows in a dataset file and name it under dataset:)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: {what} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    except RecursionError:
        # PyYAML recurses once per nesting level: a few thousand "[" exhaust the stack.
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None


def _dataset_value(value: Any) -> Any:
    """A dataset argument as the spec takes it: paths as strings, sources as they are."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping) and not isinstance(value, DataSource):
        return dict(value)
    if isinstance(value, (list, tuple)):
        return [_dataset_value(v) if isinstance(v, (Path, Mapping)) else v for v in value]
    return value


def _relative_to(base: Path, value: Any, key: str) -> Any:
    """A relative local path in a job file, made relative to the file's folder (a hub id, or
    anything that is not a string, is left as it is)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    candidate = base / value
    looks_local = value.startswith(".") or candidate.exists() or key == "output_dir"
    if looks_local or Path(value).suffix in {".jsonl", ".json", ".csv", ".parquet"}:
        return str(candidate)
    return value


def _source_dicts(value: Any) -> list[dict[str, Any]]:
    """The source mappings (``{path: ...}``) of a dataset value: itself, or its list items."""
    items = value if isinstance(value, list) else [value]
    fields = set(DataSource.model_fields)
    return [
        v
        for v in items
        if isinstance(v, dict) and isinstance(v.get("path"), str) and set(v) <= fields
    ]


def _short(value: object) -> str:
    if isinstance(value, DataSource):
        return repr(value.path)
    if isinstance(value, list):
        sources = all(isinstance(v, DataSource) for v in value)
        return f"<{len(value)} {'sources' if sources else 'rows'}>"
    return repr(value)


def new_job_id(name: str | None) -> str:
    """``<name>-<8 hex>``: readable in `loraburst ls` and unique per run."""
    return f"{name or 'job'}-{secrets.token_hex(4)}"
