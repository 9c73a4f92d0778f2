"""Fuzzing what users and instances hand us: job files, dataset files, manifests.

The property is the same everywhere: whatever the input, the answer is a result or one of our
errors (``ConfigError``/``DatasetError`` for user files, ``ManifestError`` for an instance's
manifest) — never a traceback from json, yaml, csv, pydantic or the OS, and never a value that
would fail later on the rented instance. Bounded so the default suite stays fast: a fixed number
of examples per test, derandomised (the same examples on every run, so a failure reproduces),
with a per-example deadline.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loraburst import ConfigError, Job
from loraburst._data.dataset import prepare_dataset
from loraburst.remote.protocol import ManifestError, parse_manifest, safe_relpath

from tests.conftest import SAMPLE_DATA

# LORABURST_FUZZ_EXAMPLES=5000 runs a deeper, randomised session by hand.
_DEEP = int(os.environ.get("LORABURST_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_DEEP or 100,
    deadline=2000,
    derandomize=not _DEEP,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Text that has broken things before: markup brackets, NUL, paths, huge and odd numbers.
_nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["[/x]", "\x00", "../../etc", "/proc/self", ".inf", "nan", "~", "", " "]),
)
_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**32, 2**32 - 1, 1e300, -0.0]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _nasty_text)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_SECTIONS = {
    "lora": ["r", "alpha", "dropout", "target_modules"],
    "train": [
        "epochs",
        "max_steps",
        "learning_rate",
        "micro_batch_size",
        "grad_accum",
        "max_seq_len",
        "seed",
        "save_every_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
    ],
    "quant": ["bits", "quant_type", "compute_dtype"],
}
_TOP = ["model", "dataset", "output_dir", "max_cost", "max_runtime", "name", "method", "artifacts"]


@st.composite
def _job_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Job mappings with the real keys (and now and then a wrong one) and values of any type."""
    doc: dict[str, Any] = {"model": "meta-llama/Llama-3.1-8B", "dataset": str(SAMPLE_DATA)}
    for key in draw(st.lists(st.sampled_from(_TOP), max_size=2, unique=True)):
        doc[key] = draw(_values)
    # Mostly numbers where numbers go, so that many documents are valid but for one value.
    for section, keys in _SECTIONS.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys), max_size=2, unique=True))
            doc[section] = {k: draw(st.one_of(_numbers, _numbers, _values)) for k in chosen}
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=10))] = draw(_values)
    return doc


@contextlib.contextmanager
def _file(data: bytes | str, suffix: str) -> Iterator[Path]:
    """``data`` in a file of its own, removed after the example."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"f{suffix}"
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
        path.write_bytes(raw)
        yield path


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_as_a_job_file_load_or_raise_config_error(data: bytes) -> None:
    with _file(data, ".yaml") as path, contextlib.suppress(ConfigError):
        Job.from_yaml(path)


@FUZZ
@given(_job_docs())
def test_any_job_mapping_loads_within_bounds_or_raises_config_error(doc: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable in YAML: nothing a user could write
    try:
        with _file(text, ".yaml") as path:
            job = Job.from_yaml(path)
    except ConfigError:
        return
    spec = job.spec
    for section in (spec.lora, spec.train, spec.quant, spec):
        assert all(_finite(v) for v in section.model_dump().values())
    assert 0 <= spec.train.seed <= 2**32 - 1
    assert 0 < spec.train.epochs <= 10_000
    assert spec.train.micro_batch_size == "auto" or spec.train.micro_batch_size >= 1
    # What a valid spec feeds the estimator must not crash it (`epochs: .inf` once did).
    with contextlib.suppress(ConfigError):
        est = job.estimate(live=False)
        assert all(math.isfinite(r.cost_high_usd) for r in est.rows)


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
# Rows that look almost right: the real keys, with values of any shape.
_rowish = st.one_of(
    _json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "messages": st.one_of(
                _json_values,
                st.lists(
                    st.fixed_dictionaries(
                        {}, optional={"role": _json_values, "content": _json_values}
                    ),
                    max_size=4,
                ),
            ),
            "conversations": _json_values,
            "instruction": _json_values,
            "input": _json_values,
            "output": _json_values,
            "prompt": _json_values,
            "completion": _json_values,
            "text": _json_values,
        },
    ),
)


def _prepare(data: bytes | str, suffix: str) -> None:
    with _file(data, suffix) as path, contextlib.suppress(ConfigError):  # DatasetError is one
        prepare_dataset(path)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_bytes_as_a_dataset_read_or_raise_dataset_error(data: bytes, suffix: str) -> None:
    _prepare(data, suffix)


@FUZZ
@given(st.lists(_rowish, max_size=6))
def test_any_jsonl_rows_check_or_raise_dataset_error(rows: list[Any]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    _prepare(text, ".jsonl")
    _prepare(json.dumps(rows), ".json")


@FUZZ
@given(st.lists(st.lists(st.text(max_size=15), max_size=4), max_size=5))
def test_any_csv_table_reads_or_raises_dataset_error(table: list[list[str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["instruction", "output", "messages"])
    writer.writerows(table)
    _prepare(buf.getvalue(), ".csv")


_paths = st.one_of(
    st.text(max_size=30),
    st.builds(
        "/".join,
        st.lists(
            st.sampled_from(["adapter", "..", ".", "", "a", "metrics.json", "\\"]), max_size=4
        ),
    ),
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.dictionaries(
            _paths,
            st.one_of(
                _json_values,
                st.fixed_dictionaries(
                    {"sha256": st.one_of(st.just("0" * 64), st.text(max_size=70)), "size": _numbers}
                ),
            ),
            max_size=4,
        ).map(lambda files: json.dumps({"files": files}, allow_nan=True)),
    )
)
def test_any_manifest_is_refused_or_names_only_safe_files(text: str) -> None:
    try:
        manifest = parse_manifest(text)
    except ManifestError:
        return
    assert manifest["files"]
    for rel, meta in manifest["files"].items():
        assert safe_relpath(rel) and (rel == "metrics.json" or rel.startswith("adapter/"))
        assert len(meta["sha256"]) == 64 and isinstance(meta["size"], int) and meta["size"] >= 0


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.fixed_dictionaries(
            {"budget": _values},
            optional={"max_concurrent": _values, "jobs": _values, "sweep": _values},
        ).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    )
)
def test_any_batch_file_loads_or_raises_config_error(data: bytes | str) -> None:
    from loraburst import Batch

    with _file(data, ".yaml") as path, contextlib.suppress(ConfigError):
        Batch.from_yaml(path)
