"""The job spec: what to train, on what, and how. Pure data, validated by pydantic v2.

The YAML keys are the contract; ``tests/unit/test_spec.py`` loads every shipped YAML file.
Unknown keys are errors with a did-you-mean, because a typo such as ``learnig_rate`` would
otherwise silently train with the default. Every number is bounded to what the trainer (and the
estimator) accepts, and infinities and NaN are refused everywhere, so that a value that would
fail on the rented instance fails here, before anything is rented.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from loraburst.remote.backends import mlx_refusals
from loraburst.remote.columns import LAYOUTS, columns_for, parse_split
from loraburst.remote.templates import TEMPLATES, check_template
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .._exceptions import ConfigError

__all__ = [
    "ColumnMap",
    "DataChecks",
    "DataSource",
    "EvaluationConfig",
    "HubConfig",
    "JobSpec",
    "LoraConfig",
    "ObjectiveConfig",
    "QuantConfig",
    "TrainConfig",
    "spec_error",
]

# Upper bounds far beyond any real job, low enough that the estimator's and the trainer's
# arithmetic stays exact (a float of 1e300 epochs or steps turns into nonsense or overflows).
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
MAX_BATCH = 65_536
MAX_RUNTIME_S = 366 * 24 * 3600.0


class _Strict(BaseModel):
    """Forbid unknown keys and suggest the closest known one."""

    # allow_inf_nan: YAML spells infinity `.inf`; no field means anything by it, and the
    # estimator's arithmetic (math.ceil of steps) overflows on it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _did_you_mean(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    where = _SECTION.get(cls.__name__, "")
                    raise ValueError(
                        f"unknown key {where}{key!r}{hint} (known: {', '.join(sorted(known))})"
                    )
        return data


class LoraConfig(_Strict):
    """LoRA adapter shape."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, le=1e6, description="LoRA scaling numerator (scale = alpha / r)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear" or a list of module names such as ["q_proj"].'
    )

    @field_validator("target_modules")
    @classmethod
    def _modules_named(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names or any(not n.strip() for n in names):
            raise ValueError(
                'must be "all-linear" or a non-empty list of module names such as ["q_proj"]'
            )
        return value


class TrainConfig(_Strict):
    """Optimisation and data-shaping settings."""

    epochs: float = Field(
        1.0, gt=0, le=MAX_EPOCHS, description="Passes over the data (ignored with max_steps)."
    )
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Stop after this many optimizer steps."
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    micro_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Literal["auto"] = Field(
        "auto", description='Sequences per forward pass; "auto" picks the largest that fits.'
    )
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(2048, ge=8, le=1_048_576)
    packing: bool | Literal["auto"] = Field(
        "auto",
        description='Pack rows into full max_seq_len sequences; "auto" packs when rows average '
        "under half of max_seq_len. Rows never attend across each other either way.",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    # numpy's seed (which transformers.set_seed calls) takes 0 .. 2**32 - 1 and nothing else.
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed, 0 .. 4294967295.")
    eval_fraction: float = Field(0.0, ge=0, lt=0.5, description="Hold out this share for eval.")
    save_every_steps: int | None = Field(
        50, ge=1, le=MAX_STEPS, description="Checkpoint period (None: never)."
    )
    gradient_checkpointing: bool | Literal["auto", "offload"] = Field(
        "auto",
        description='"auto" recomputes only the layers whose activations would not fit; true '
        'recomputes every layer; "offload" also keeps the layer inputs in host memory (leanest).',
    )
    max_gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="Plan for and use at most this much GPU memory (share a card, or rehearse "
        "a smaller one on a bigger card).",
    )
    distributed: Literal["auto", "ddp", "fsdp", "fsdp+offload"] = Field(
        "auto",
        description="On an instance of several GPUs: DDP (every GPU holds the quantised model), "
        "FSDP-QLoRA (weights, gradients and optimizer sharded by decoder layer), or FSDP with "
        'the sharded weights in host memory; "auto" takes the first whose per-GPU plan fits '
        "(remote/sharding.py). One GPU: ignored.",
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Train on assistant/completion tokens only, or on every token."
    )
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    optim: str = Field("adamw_torch", description="transformers optimizer name.")
    backend: Literal["auto", "torch", "mlx"] = Field(
        "auto",
        description='The trainer: "torch" (transformers + peft + bitsandbytes), "mlx" (Apple\'s '
        'MLX + mlx-lm; pip install "loraburst[mlx]"), or "auto": MLX on Apple Silicon, torch '
        "elsewhere (resolved on the machine that trains).",
    )


class QuantConfig(_Strict):
    """Base-weight quantisation (bitsandbytes)."""

    bits: Literal[4, 8, 16] = Field(4, description="4 = NF4/FP4 QLoRA, 8 = LLM.int8, 16 = none.")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description='"auto": bfloat16 on a GPU that has it, float32 on CPU.'
    )


class HubConfig(_Strict):
    """Where the verified exports are pushed (token from ``HF_TOKEN``, never in the spec)."""

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description='"user/name" of a model repo.')
    private: bool = Field(True, description="Create the repo private (an existing one is kept).")
    revision: str | None = Field(None, description="Branch to commit to (default: main).")
    commit_message: str | None = None
    endpoint: str | None = Field(None, description="Another hub's URL (default: HF_ENDPOINT).")


# TRL's LoRA recipe for DPO (trl/scripts/dpo.py: 5e-6 with --use_peft, 10x its full-tuning
# 5e-7); preference objectives move a policy that already answers well, so a tenth of SFT's
# step would undo it. Used when train.learning_rate is not given.
PREFERENCE_LEARNING_RATE = 5e-6
PREFERENCE_OBJECTIVES = ("dpo", "orpo")


class ObjectiveConfig(_Strict):
    """``objective:`` — what the adapter is trained to do: imitate (``sft``) or prefer
    (``dpo``, ``orpo``). Write ``objective: dpo`` or a mapping with ``type:`` and options."""

    type: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description='"sft": learn the assistant turns; "dpo": Direct Preference Optimization '
        'against a reference (the base, or the starting adapter); "orpo": odds-ratio preference '
        "with an SFT term, no reference. dpo/orpo rows hold prompt, chosen and rejected.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="DPO: how far the policy may move from the reference (higher: closer); "
        "ORPO: the weight of the odds-ratio term (TRL's lambda). TRL's default, 0.1.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description='DPO loss: "sigmoid" (the paper\'s), "ipo" (squared, for near-deterministic '
        'preferences), "hinge" (SLiC).',
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="DPO sigmoid only: the share of pairs assumed mislabelled (cDPO).",
    )
    reference: Literal["auto", "live", "precompute"] = Field(
        "auto",
        description='DPO\'s reference log-probabilities: "live" runs the model with the adapter '
        'disabled beside each step (one more forward); "precompute" runs one pass over the '
        'data before training; "auto": live from a fresh adapter, precompute from init_adapter '
        "(whose reference is the starting adapter itself). No second copy of the weights.",
    )
    max_prompt_len: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Prompt tokens kept (the end, nearest the answer); default half of "
        "train.max_seq_len. Prompt + answer is cut to train.max_seq_len.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _options_apply(self) -> ObjectiveConfig:
        # Options set away from their defaults (a dumped spec writes the defaults back).
        fields = type(self).model_fields
        given = {
            k for k in self.model_fields_set - {"type"} if getattr(self, k) != fields[k].default
        }
        if self.type == "sft" and given:
            raise ValueError(
                f"{', '.join(sorted(given))} apply to dpo and orpo, not sft; "
                "remove them or set objective.type"
            )
        dpo_only = given & {"loss_type", "label_smoothing", "reference"}
        if self.type == "orpo" and dpo_only:
            raise ValueError(
                f"{', '.join(sorted(dpo_only))} apply to dpo only (orpo has no "
                "reference model); remove them"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type: sigmoid only")
        return self

    @property
    def preference(self) -> bool:
        """Whether rows are preference pairs (prompt, chosen, rejected)."""
        return self.type in PREFERENCE_OBJECTIVES


class EvaluationConfig(_Strict):
    """Evaluation on the instance before teardown (remote/evaluate.py): base against tuned."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description='"auto": evaluate whenever there is an eval split (eval_dataset or '
        "train.eval_fraction); true: require one; false: skip.",
    )
    samples: int = Field(
        4, ge=0, le=64, description="Eval prompts answered by base and tuned, side by side."
    )
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Token limit of each sample (greedy, stops at EOS)."
    )
    tasks: list[str] = Field(
        default_factory=list,
        description='lm-eval benchmark tasks run on base and tuned (e.g. ["arc_easy"]; needs '
        "lm-eval on the instance and the task's data).",
    )
    limit: int | None = Field(
        50, ge=1, le=1_000_000, description="Examples per lm-eval task (keeps them cheap)."
    )
    min_loss_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="The tuned eval loss must be below the base's by at least this much, or the "
        "result is marked not passing (the adapter still comes back).",
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not t or not t.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"task names are lm-eval task ids such as 'arc_easy'; got {bad}")
        return value


class ColumnMap(_Strict):
    """``columns:`` of a dataset source: which field of a row holds what (as LLaMA-Factory's
    ``columns``/``tags`` and Axolotl's ``field_*`` say it). Name a conversation, a pair, raw
    prompt + completion, or text."""

    messages: str | None = Field(None, description="The field holding the list of turns.")
    role: str | None = Field(None, description='Key of a turn holding its role ("from").')
    content: str | None = Field(None, description='Key of a turn holding its text ("value").')
    roles: dict[str, Literal["system", "user", "assistant"]] | None = Field(
        None, description="The dataset's role names, e.g. {bot: assistant, human: user}."
    )
    prompt: str | None = Field(None, description="The field holding the prompt/instruction.")
    input: str | None = Field(None, description="Optional field appended to the prompt.")
    response: str | None = Field(None, description="The field holding the answer to learn.")
    system: str | None = Field(None, description="Optional field holding a system prompt.")
    completion: str | None = Field(None, description="With prompt: raw prompt + completion.")
    text: str | None = Field(None, description="The field holding raw text.")


_LAYOUT = Literal[
    "messages",
    "sharegpt",
    "alpaca",
    "instruction_response",
    "prompt_completion",
    "prompt_response",
    "question_answer",
    "query_response",
    "text",
]
# Keys that only rows have: a list holding them is rows, not sources.
_ROW_FIELDS = {f for cols in LAYOUTS.values() for f in cols.required}


class DataSource(_Strict):
    """One dataset of a job: a file, a folder or a hub id, with how to read it and how much of
    it goes into the mix."""

    path: str = Field(min_length=1, description="A .jsonl/.json/.csv/.parquet file, a "
                      "save_to_disk folder, or a hub dataset id.")  # fmt: skip
    format: _LAYOUT | None = Field(
        None, description="The row layout; detected from the rows when left out."
    )
    columns: ColumnMap | None = Field(None, description="Which field holds what.")
    weight: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Share of the mix (relative to the other sources' weights); every source "
        "or none has one. The mix takes rows in these proportions without repeating one.",
    )
    max_rows: int | None = Field(None, ge=1, le=10**10, description="Use at most this many rows.")
    config: str | None = Field(None, min_length=1, description="A hub dataset's config name.")
    split: str = Field(
        "train", description='A split expression: "train", "train[:2000]", "test[10%:]".'
    )
    streaming: bool | Literal["auto"] = Field(
        "auto",
        description="Read a hub dataset as a stream on the instance (no full download); "
        '"auto" streams when only the first rows are used (max_rows, or a split slice).',
    )

    @model_validator(mode="after")
    def _readable(self) -> DataSource:
        mapping = self.columns.model_dump(exclude_none=True) if self.columns else None
        try:
            if self.format is not None or mapping is not None:
                columns_for(self.format, mapping)
            _, start, stop = parse_split(self.split)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        percent = any(b and b.endswith("%") for b in (start, stop))
        if percent and self.streaming is True:
            raise ValueError(
                f"split {self.split!r}: a streamed dataset cannot be sliced by percent (its "
                "size is unknown until read); use row numbers ('train[:2000]') or max_rows"
            )
        return self

    def options(self) -> dict[str, Any]:
        """The settings the instance needs to read the source (the rest is defaults)."""
        return self.model_dump(mode="json", exclude_defaults=True, exclude={"path"})


class DataChecks(_Strict):
    """``data_checks:``: thresholds that turn the data report's findings into errors, checked
    before anything is rented (each a share of the rows, 0..1; unset = reported only)."""

    max_duplicate_share: float | None = Field(
        None, ge=0, le=1, description="Exact duplicate rows within the training data."
    )
    max_near_duplicate_share: float | None = Field(
        None, ge=0, le=1, description="Near-duplicate rows (see near_duplicate_similarity)."
    )
    max_eval_overlap_share: float | None = Field(
        None, ge=0, le=1, description="Eval rows that (nearly) duplicate a training row."
    )
    max_truncated_share: float | None = Field(
        None, ge=0, le=1, description="Rows longer than train.max_seq_len (cut short)."
    )
    max_echo_share: float | None = Field(
        None, ge=0, le=1, description="Answers that repeat the prompt."
    )
    max_damaged_share: float | None = Field(
        None, ge=0, le=1, description="Rows with control characters or encoding damage."
    )
    near_duplicate_similarity: float = Field(
        0.8, ge=0.5, le=1, description="Word 5-gram Jaccard similarity that counts as near."
    )
    near_duplicates: bool = Field(
        True,
        description="Look for near duplicates (MinHash; most of the report's time on millions "
        "of rows). Exact duplicates are always found.",
    )


def _source(value: Any, where: str) -> DataSource:
    try:
        return DataSource.model_validate(value)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(msg if "unknown key" in msg or not loc else f"{loc}: {msg}")
        raise ValueError(f"{where}: " + "; ".join(lines)) from None


def _as_sources(value: Any) -> Any:
    """A mapping with ``path`` is a source; a list of them is a mix; anything else is left as
    it is (a path, a hub id, or a list of rows)."""
    if isinstance(value, dict) and "path" in value:
        return _source(value, "source")
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(v, DataSource)
            or (isinstance(v, dict) and "path" in v and not _ROW_FIELDS & set(v))
            for v in value
        )
    ):
        return [v if isinstance(v, DataSource) else _source(v, f"source {i + 1}")
                for i, v in enumerate(value)]  # fmt: skip
    return value


DatasetValue = str | DataSource | list[DataSource] | list[dict[str, Any]]


class JobSpec(_Strict):
    """Everything that defines a fine-tuning job; serialised into the bundle as spec.json."""

    model: str = Field(
        min_length=1, description="Hub id (e.g. meta-llama/Llama-3.1-8B) or local folder."
    )
    dataset: DatasetValue = Field(
        description="File, folder, hub id or rows; or a source ({path, format, columns, "
        "weight, max_rows, config, split, streaming}), or a list of sources (a mix)."
    )
    eval_dataset: DatasetValue | None = None
    chat_template: str | None = Field(
        None,
        description=f"The chat template to train with: {', '.join(TEMPLATES)}, or a Jinja "
        "string. Unset: the model's own, else chatml. Saved with the adapter.",
    )
    system_prompt: str | None = Field(
        None, description="System turn given to every conversation that has none."
    )
    data_checks: DataChecks = Field(default_factory=DataChecks)  # type: ignore[arg-type]
    method: Literal["qlora", "lora", "dora"] = "qlora"
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig,  # type: ignore[arg-type]
        description='"sft" (default), "dpo" or "orpo", or a mapping with type: and options.',
    )
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="Start from this adapter (a folder a previous job wrote, or its JobResult) "
        "instead of a fresh one; it is trained further, and is DPO's reference.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    quant: QuantConfig = Field(default_factory=QuantConfig)  # type: ignore[arg-type]
    output_dir: str = Field(
        "outputs", min_length=1, description="Where the verified adapter is copied."
    )
    max_cost: float | None = Field(None, gt=0, le=1e7, description="Dollar cap for this job.")
    max_runtime: float | None = Field(
        None, gt=0, le=MAX_RUNTIME_S, description="Hard wall-clock cap, seconds."
    )
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    model_revision: str | None = None
    artifacts: str | None = Field(None, description="s3://bucket/prefix for checkpoints.")
    # -- exports (sdk/_export.py, remote/export.py) ----------------------------------------
    exports: list[Any] = Field(
        default_factory=lambda: [{"kind": "adapter"}],
        description='What to ship, made and verified before teardown: "adapter", "merged" '
        '(or "merged:bf16", {merged: {dtype, base: original|dequantized}}), "gguf:<quant>" '
        "(f16, bf16, q8_0, q4_k_m, q5_k_m, ...).",
    )
    hub: HubConfig | None = Field(None, description="Push the verified exports to this repo.")
    # -- evaluation before teardown (remote/evaluate.py) -----------------------------------
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)  # type: ignore[arg-type]

    @field_validator("dataset", "eval_dataset", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        return _as_sources(value)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value)
        return value

    @field_validator("exports", mode="before")
    @classmethod
    def _exports(cls, value: Any) -> Any:
        from loraburst.remote.export import parse_exports

        if not isinstance(value, list):
            raise ValueError('must be a list such as ["adapter", "merged", "gguf:q4_k_m"]')
        return parse_exports(value)

    @field_validator("init_adapter", mode="before")
    @classmethod
    def _adapter_path(cls, value: Any) -> Any:
        # A JobResult (or anything with an adapter folder) stands for its adapter.
        folder = getattr(value, "adapter_path", value)
        if folder is None and value is not None:
            raise ValueError("that job result has no adapter (did the job fail?)")
        return str(folder) if isinstance(folder, Path) else folder

    @model_validator(mode="after")
    def _objective_defaults(self) -> JobSpec:
        # Preference objectives move an already good policy: TRL's lower LoRA learning rate
        # unless the user chose one.
        if not self.objective.preference:
            return self
        if self.train.packing is True or self.train.loss_on == "all":
            raise ValueError(
                f"objective {self.objective.type} trains each pair's answers as one unit: "
                "train.packing: true and train.loss_on: all apply to sft only; remove them"
            )
        cap = self.objective.max_prompt_len
        if cap is not None and cap >= self.train.max_seq_len:
            raise ValueError(
                f"objective.max_prompt_len ({cap}) must be below train.max_seq_len "
                f"({self.train.max_seq_len}), or no answer token would fit"
            )
        if "learning_rate" not in self.train.model_fields_set:
            self.train.learning_rate = PREFERENCE_LEARNING_RATE
        return self

    @model_validator(mode="after")
    def _mlx_can_train(self) -> JobSpec:
        # train.backend: mlx is known now, before anything runs: refuse what MLX cannot do
        # (an "auto" job is checked once its machine is known; see _execute.py).
        if self.train.backend == "mlx":
            refusals = mlx_refusals(self.model_dump(mode="json"))
            if refusals:
                raise ValueError(
                    "train.backend: mlx cannot train this job:\n    " + "\n    ".join(refusals)
                )
        return self

    @model_validator(mode="after")
    def _evaluation_has_data(self) -> JobSpec:
        if (
            self.evaluation.enabled is True
            and self.eval_dataset is None
            and self.train.eval_fraction == 0
        ):
            raise ValueError(
                "evaluation.enabled: true needs held-out rows: set eval_dataset or "
                "train.eval_fraction (e.g. 0.1)"
            )
        return self

    @property
    def quantized(self) -> bool:
        """Whether base weights are loaded quantised (QLoRA / QDoRA)."""
        return self.method != "lora" and self.quant.bits in (4, 8)


_SECTION = {
    "LoraConfig": "lora.",
    "TrainConfig": "train.",
    "QuantConfig": "quant.",
    "HubConfig": "hub.",
    "ObjectiveConfig": "objective.",
    "EvaluationConfig": "evaluation.",
    "ColumnMap": "columns.",
    "DataSource": "",
    "DataChecks": "data_checks.",
    "JobSpec": "",
}


def spec_error(exc: ValidationError, source: str | Path | None = None) -> ConfigError:
    """Turn pydantic's error into one ConfigError naming each field and how to fix it."""
    where = f"{source}: " if source else ""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        # Unknown keys and whole-spec checks name their fields in the message itself.
        named = "unknown key" in msg or not err["loc"]
        lines.append(f"{where}{msg}" if named else f"{where}{loc}: {msg}")
    return ConfigError("invalid job spec:\n  " + "\n  ".join(lines), source=str(source))
