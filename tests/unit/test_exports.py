"""Exports in the spec (names, options, did-you-mean), their cost up front, their results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from loraburst import ConfigError, ExportResult, Job, JobResult
from loraburst._api.export import export_cost
from loraburst._cli import main as cli
from loraburst.remote.export import parse_exports
from loraburst.remote.gguf_export import GGUF_REQUIREMENT

ROOT = Path(__file__).resolve().parents[2]


def test_export_names_and_forms_are_canonicalised() -> None:
    assert parse_exports(
        [
            "adapter",
            "merged:bf16",
            "gguf:Q4_K_M",
            {"gguf": "q8_0"},
        ]
    ) == [  # fmt: skip
        {"kind": "adapter"},
        {"kind": "merged", "dtype": "bfloat16", "base": "original"},
        {"kind": "gguf", "quant": "q4_k_m"},
        {"kind": "gguf", "quant": "q8_0"},
    ]
    assert parse_exports([{"merged": {"base": "dequantized"}}]) == [
        {"kind": "merged", "dtype": "auto", "base": "dequantized"}
    ]
    job = Job("m", [{"text": "x"}], exports=["merged", "gguf:q5_k_m"], hub={"repo": "me/x"})
    assert job.spec.hub is not None and job.spec.hub.private  # private unless asked otherwise
    assert Job("m", [{"text": "x"}]).spec.exports == [{"kind": "adapter"}]


@pytest.mark.parametrize(
    ("exports", "message"),
    [
        (["gguf:q4_km"], "did you mean 'q4_k_m'"),
        (["mergd"], "did you mean 'merged'"),
        ([{"merged": {"dtyp": "bf16"}}], "did you mean 'dtype'"),
        (["merged:int4"], "merged dtype 'int4'"),
        ([{"merged": {"base": "nf4"}}], "'dequantized'"),
        (["gguf:q8_0", "gguf:q8_0"], "listed twice"),
        ("merged", "must be a list"),
    ],
)
def test_bad_exports_name_the_field_and_the_fix(exports: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        Job("m", [{"text": "x"}], exports=exports)  # type: ignore[arg-type]
    assert "exports" in str(info.value)


def test_a_misspelt_hub_key_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key hub\.'repp'; did you mean 'repo'"):
        Job("m", [{"text": "x"}], hub={"repp": "me/x"})
    with pytest.raises(ConfigError, match=r"hub\.repo"):
        Job("m", [{"text": "x"}], hub={"repo": "no-namespace"})


def test_exports_cost_time_and_disk_up_front() -> None:
    params, base = 8_000_000_000, 16e9
    assert export_cost(["adapter"], params, base).seconds == 0
    merged = export_cost(["merged"], params, base)
    more = export_cost(["merged", "gguf:q8_0", "gguf:q4_k_m"], params, base)
    assert 0 < merged.seconds < more.seconds and 50 <= merged.disk_gb < more.disk_gb
    # base 16 GB + merged 16 GB + q8_0 8.5 GB + the 16-bit source 16 GB + q4_k_m 4.9 GB
    assert more.disk_gb >= 61 and "gguf:q4_k_m" in more.note
    job = Job("meta-llama/Llama-3.1-8B", [{"text": "x"}], train={"max_steps": 100},
              exports=["merged", "gguf:q4_k_m"])  # fmt: skip
    plain = Job("meta-llama/Llama-3.1-8B", [{"text": "x"}], train={"max_steps": 100})
    with_exports = job.estimate(gpus=["H100 SXM"], live=False)
    row, base_row = with_exports.rows[0], plain.estimate(gpus=["H100 SXM"], live=False).rows[0]
    assert row.export_s > 0 and row.total_s == pytest.approx(base_row.total_s + row.export_s, abs=1)
    assert row.cost_usd > base_row.cost_usd and row.disk_gb > base_row.disk_gb
    assert any("exports (merged, gguf:q4_k_m)" in n for n in with_exports.notes)


def test_job_result_finds_exports_by_name() -> None:
    ok = ExportResult("merged", "merged", True, Path("m"))
    bad = ExportResult("gguf:q4_k_m", "gguf", False, None, error="check generates_and_stops failed")
    result = JobResult("j", "succeeded", Path("a"), {}, None, None, 0.0, {}, exports=(ok, bad))
    assert result.ok and not result.exports_ok  # the adapter came back; one export did not
    assert result.export("merged") is ok and "FAILED: check" in bad.describe()
    with pytest.raises(KeyError, match="this job has"):
        result.export("gguf:f16")


def test_cli_export_refuses_an_unknown_quantisation(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["export", "some-job", "--to", "gguf:q4_kk"]) == 2
    assert "did you mean 'q4_k_m'" in capsys.readouterr().err


def test_the_gguf_pin_is_the_one_the_package_installs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"{GGUF_REQUIREMENT}"' in pyproject
