"""The job spec: defaults, YAML round trip, unknown keys with a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraburst import ConfigError, Job, JobSpec

ROOT = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    spec = JobSpec(model="m", dataset="d.jsonl")
    assert (spec.lora.r, spec.lora.alpha, spec.lora.target_modules) == (16, 32, "all-linear")
    assert (spec.quant.bits, spec.quant.quant_type, spec.quant.double_quant) == (4, "nf4", True)
    assert spec.quant.compute_dtype == "auto"  # bf16 on a GPU, fp32 on CPU
    assert spec.method == "qlora" and spec.quantized


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("model: m\ndataset: d.jsonl\nmax_cots: 3\n")
    with pytest.raises(ConfigError) as e:
        Job.from_yaml(f)
    assert "max_cots" in str(e.value) and "did you mean 'max_cost'" in str(e.value)
    assert str(f) in str(e.value)


def test_unknown_nested_key_suggests(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("model: m\ndataset: d.jsonl\ntrain:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        Job.from_yaml(f)
    assert "train.'learnig_rate'" in str(e.value) or "learnig_rate" in str(e.value)
    assert "did you mean 'learning_rate'" in str(e.value)


def test_bad_value_names_field() -> None:
    with pytest.raises(ConfigError) as e:
        Job("m", "d.jsonl", lora={"r": 0})
    assert "lora.r" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Job("m", "d.jsonl", method="qlor")  # type: ignore[arg-type]
    assert "method" in str(e.value)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("model: m\ndataset: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        Job.from_yaml(f)
    assert f"{f}:" in str(e.value)


def test_yaml_round_trip(tmp_path: Path) -> None:
    job = Job("org/model", "data.jsonl", lora={"r": 8}, train={"max_steps": 5})
    f = tmp_path / "job.yaml"
    f.write_text(job.to_yaml())
    again = Job.from_yaml(f)
    assert again.spec.lora.r == 8 and again.spec.train.max_steps == 5
    assert again.spec.model == "org/model"


def test_yaml_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.jsonl").write_text('{"text": "hi"}\n')
    f = tmp_path / "sub" / "job.yaml"
    f.write_text("model: org/model\ndataset: data.jsonl\n")
    assert Job.from_yaml(f).spec.dataset == str(tmp_path / "sub" / "data.jsonl")


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path) -> None:
    if "batch" in path.name:
        pytest.skip("batch files are loaded by the batch tests")
    Job.from_yaml(path)


def test_the_agent_reads_the_same_spec_the_client_writes() -> None:
    """protocol's typed spec (what the agent reads) has the JobSpec's fields and defaults, so a
    key added on one side and not the other fails here, not on a rented instance."""
    import dataclasses

    from loraburst import JobSpec
    from loraburst._api.spec import DataSource
    from loraburst._data.bundle import _bundle_spec
    from loraburst._data.dataset import prepare_dataset
    from loraburst.remote import protocol

    pairs = [
        (JobSpec, protocol.JobSpecData),
        (JobSpec.model_fields["lora"].annotation, protocol.LoraSpec),
        (JobSpec.model_fields["train"].annotation, protocol.TrainSpec),
        (JobSpec.model_fields["quant"].annotation, protocol.QuantSpec),
        (JobSpec.model_fields["objective"].annotation, protocol.ObjectiveSpec),
        (JobSpec.model_fields["evaluation"].annotation, protocol.EvaluationSpec),
        (JobSpec.model_fields["data_checks"].annotation, protocol.DataChecksSpec),
        (DataSource, protocol.SourceSpec),
    ]
    bundle_only = {
        "base_model",
        "dataset_name",
        "export_prompt",
        "kind",
    }  # the bundler writes them for the instance
    for client, agent in pairs:
        fields = {f.name for f in dataclasses.fields(agent)} - bundle_only
        assert set(client.model_fields) == fields, agent
        for f in dataclasses.fields(agent):
            if f.name in bundle_only:
                continue
            default = client.model_fields[f.name].get_default(call_default_factory=True)
            if dataclasses.is_dataclass(f.type) or f.name in (
                "lora",
                "train",
                "quant",
                "objective",
                "evaluation",
                "data_checks",
            ):
                continue
            if f.name in ("model", "dataset", "output_dir", "exports", "hub", "tasks", "path",
                          "columns"):  # fmt: skip
                continue  # rewritten for the bundle, or built by a factory
            assert f.default == default, (agent.__name__, f.name)
    spec = JobSpec(model="m", dataset="d.jsonl", train={"max_steps": 3, "packing": False})
    ds = prepare_dataset([{"text": "hello"}])
    doc = protocol.BundleSpec.from_dict(__import__("json").loads(_bundle_spec(spec, ds, None)))
    assert doc.spec.train.max_steps == 3 and doc.spec.train.packing is False
    assert doc.spec.quantized is spec.quantized
    with pytest.raises(ValueError, match="unknown key"):
        protocol.BundleSpec.from_dict({"spec": {"model": "m", "dataset": "d", "trian": {}}})


def test_non_utf8_job_file_is_a_config_error_naming_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_bytes(b"model: m\ndataset: d.jsonl\nname: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        Job.from_yaml(f)
    assert f"{f}:3:" in str(e.value) and "UTF-8" in str(e.value)


def test_job_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "job.yaml"
    link.symlink_to("/dev/zero")  # would be read forever
    with pytest.raises(ConfigError, match="not a regular file"):
        Job.from_yaml(link)
    big = tmp_path / "big.yaml"
    big.write_text("model: m\ndataset: d.jsonl\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="over 1 MiB"):
        Job.from_yaml(big)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("model: " + "[" * 3_000)
    with pytest.raises(ConfigError, match=str(f)):
        Job.from_yaml(f)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("train:\n  epochs: .inf\n", "train.epochs"),
        ("train:\n  epochs: .nan\n", "train.epochs"),
        ("train:\n  learning_rate: .nan\n", "train.learning_rate"),
        ("lora:\n  alpha: .inf\n", "lora.alpha"),
        ("max_cost: .inf\n", "max_cost"),
        ("max_runtime: .inf\n", "max_runtime"),
        ("train:\n  seed: 100000000000000000000000\n", "train.seed"),
        ("train:\n  seed: -1\n", "train.seed"),
        ("train:\n  seed: 4294967296\n", "train.seed"),
        ("train:\n  epochs: 1.0e+300\n", "train.epochs"),
        ("train:\n  max_steps: 100000000000000000000000\n", "train.max_steps"),
        ("train:\n  micro_batch_size: 0\n", "train.micro_batch_size"),
        ("train:\n  micro_batch_size: -4\n", "train.micro_batch_size"),
        ("train:\n  grad_accum: 100000000000000000000000\n", "train.grad_accum"),
        ("lora:\n  target_modules: []\n", "lora.target_modules"),
        ("model: ''\n", "model"),
    ],
)
def test_values_the_trainer_cannot_take_are_refused_here(
    tmp_path: Path, yaml_text: str, field: str
) -> None:
    f = tmp_path / "job.yaml"
    base = "" if yaml_text.startswith("model:") else "model: m\n"
    f.write_text(base + "dataset: d.jsonl\n" + yaml_text)
    with pytest.raises(ConfigError) as e:
        Job.from_yaml(f)
    assert field in str(e.value), str(e.value)


def test_seed_bounds_are_inclusive() -> None:
    assert Job("m", "d.jsonl", train={"seed": 0}).spec.train.seed == 0
    assert Job("m", "d.jsonl", train={"seed": 2**32 - 1}).spec.train.seed == 2**32 - 1


def test_infinite_epochs_no_longer_crash_the_estimate_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "job.yaml"
    f.write_text("model: meta-llama/Llama-3.1-8B\ndataset: org/data\ntrain:\n  epochs: .inf\n")
    res = subprocess.run(
        [sys.executable, "-m", "loraburst._cli", "estimate", str(f)], capture_output=True, text=True
    )
    assert res.returncode == 2, res.stderr
    assert "train.epochs" in res.stderr and "Traceback" not in res.stderr


def test_batch_file_with_bad_bytes_or_infinite_budget_is_a_config_error(tmp_path: Path) -> None:
    from loraburst import Batch

    f = tmp_path / "batch.yaml"
    f.write_bytes(b"budget: 5\njobs: [caf\xe9.yaml]\n")
    with pytest.raises(ConfigError, match=f"{f}:2: batch file is not valid UTF-8"):
        Batch.from_yaml(f)
    f.write_text("budget: .inf\njobs: []\n")
    with pytest.raises(ConfigError, match="budget must be a positive number"):
        Batch.from_yaml(f)
    f.write_text("budget: 5\nmax_concurrent: two\njobs: []\n")
    with pytest.raises(ConfigError, match="max_concurrent"):
        Batch.from_yaml(f)
