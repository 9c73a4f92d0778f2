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
    from loraburst._bundle import _bundle_spec
    from loraburst._dataset import prepare_dataset
    from loraburst.remote import protocol

    pairs = [
        (JobSpec, protocol.JobSpecData),
        (JobSpec.model_fields["lora"].annotation, protocol.LoraSpec),
        (JobSpec.model_fields["train"].annotation, protocol.TrainSpec),
        (JobSpec.model_fields["quant"].annotation, protocol.QuantSpec),
    ]
    for client, agent in pairs:
        assert set(client.model_fields) == {f.name for f in dataclasses.fields(agent)}, agent
        for f in dataclasses.fields(agent):
            default = client.model_fields[f.name].get_default(call_default_factory=True)
            if dataclasses.is_dataclass(f.type) or f.name in ("lora", "train", "quant"):
                continue
            if f.name in ("model", "dataset", "output_dir"):
                continue  # rewritten for the bundle
            assert f.default == default, (agent.__name__, f.name)
    spec = JobSpec(model="m", dataset="d.jsonl", train={"max_steps": 3, "packing": False})
    ds = prepare_dataset([{"text": "hello"}])
    doc = protocol.BundleSpec.from_dict(__import__("json").loads(_bundle_spec(spec, ds, None)))
    assert doc.spec.train.max_steps == 3 and doc.spec.train.packing is False
    assert doc.spec.quantized is spec.quantized
    with pytest.raises(ValueError, match="unknown key"):
        protocol.BundleSpec.from_dict({"spec": {"model": "m", "dataset": "d", "trian": {}}})
