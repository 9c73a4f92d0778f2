"""Preference data and the ``objective:`` key, checked before anything is rented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loraburst import ConfigError, DatasetError, Job, JobSpec
from loraburst._data.dataset import prepare_dataset

from tests.conftest import ROOT


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


GOOD_CHAT = {"chosen": _turns("Capital of Peru?", "Lima."), "rejected": _turns("Capital of Peru?", "Quito.")}  # fmt: skip
# Each bad row, and what the message must say about it.
BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    ({"chosen": _turns("Q?", "A.")}, "'rejected' is missing"),
    ({"chosen": _turns("Q?", "A."), "rejected": _turns("Q?", "A.")}, "the same answer"),
    (
        {
            "chosen": _turns("Q?", "A."),
            "rejected": [*_turns("Q?", "B."), {"role": "user", "content": "and?"}],
        },
        "ends with a user turn",
    ),  # fmt: skip
    ({"chosen": _turns("Q?", "A."), "rejected": _turns("Other?", "B.")}, "differ at turn 0"),
    ({"chosen": "A.", "rejected": _turns("Q?", "B.")}, "give both as text or both as lists"),
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _validate(job: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraburst._cli", "validate", str(job)],
        capture_output=True,
        text=True,
    )


def test_validate_names_every_bad_pair_by_line(tmp_path: Path) -> None:
    """One CLI run over a file with a good row then each bad case: exit 2, every bad line named
    with what is wrong; the shipped example file validates."""
    data = _write(tmp_path / "pairs.jsonl", [GOOD_CHAT, *(row for row, _ in BAD_ROWS)])
    job = tmp_path / "job.yaml"
    job.write_text(f"model: org/model\nobjective: dpo\ndataset: {data}\n")
    res = _validate(job)
    assert res.returncode == 2, res.stdout + res.stderr
    err = " ".join(res.stderr.split())  # rich wraps long lines
    for line, (_, expected) in enumerate(BAD_ROWS, start=2):
        assert f"{data}:{line}: " in err and expected in err, (line, expected, err)
    assert f"{data}:1:" not in err and "Traceback" not in err
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(f"model: org/model\nobjective: orpo\ndataset: {ROOT / 'examples/data/preference.jsonl'}\n")  # fmt: skip
    ok = _validate(shipped)
    assert ok.returncode == 0, ok.stderr
    assert "64 pairs (preference)" in " ".join(ok.stdout.split())


@pytest.mark.parametrize(
    ("row", "normalised"),
    [
        # Text with an explicit prompt.
        ({"prompt": "Q?", "chosen": "A.", "rejected": "B."},
         {"prompt": "Q?", "chosen": "A.", "rejected": "B."}),
        # UltraFeedback-binarized: whole conversations plus a redundant prompt string and scores.
        ({"prompt": "Q?", "prompt_id": "x", "score_chosen": 9.0, **GOOD_CHAT},
         {"prompt": _turns("Capital of Peru?", "x")[:1], "chosen": GOOD_CHAT["chosen"][1:],
          "rejected": GOOD_CHAT["rejected"][1:]}),
        # An explicit prompt of turns, answers as one assistant turn each.
        ({"prompt": [{"role": "user", "content": "Q?"}],
          "chosen": [{"role": "assistant", "content": "A."}],
          "rejected": [{"role": "assistant", "content": "B."}]},
         {"prompt": [{"role": "user", "content": "Q?"}],
          "chosen": [{"role": "assistant", "content": "A."}],
          "rejected": [{"role": "assistant", "content": "B."}]}),
    ],
)  # fmt: skip
def test_each_pair_shape_is_normalised(row: dict[str, Any], normalised: dict[str, Any]) -> None:
    ds = prepare_dataset([row], pairs=True)
    assert ds.kind == "preference" and list(ds.iter_rows()) == [normalised]
    assert ds.stats.tokens and ds.stats.tokens > 0


def test_parquet_pairs_are_checked_by_row(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "pairs.parquet"
    table = pa.Table.from_pylist([GOOD_CHAT, {"chosen": GOOD_CHAT["chosen"], "rejected": GOOD_CHAT["chosen"]}])  # fmt: skip
    pq.write_table(table, path)
    with pytest.raises(DatasetError) as e:
        prepare_dataset(path, pairs=True)
    assert "the same answer" in str(e.value) and str(e.value).count("problem") == 1


def test_sft_rows_under_dpo_and_pairs_under_sft_say_what_to_change() -> None:
    with pytest.raises(DatasetError, match="not a preference row"):
        Job("org/m", [{"text": "hello"}], objective="dpo").validate()
    with pytest.raises(DatasetError, match="set objective: dpo or orpo"):
        Job("org/m", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}]).validate()


def test_objective_key_and_its_options() -> None:
    spec = JobSpec(model="m", dataset="d.jsonl", objective="dpo")
    assert spec.objective.type == "dpo" and spec.objective.beta == 0.1
    assert spec.train.learning_rate == 5e-6  # TRL's LoRA DPO rate, not SFT's 2e-4
    given = JobSpec(model="m", dataset="d.jsonl", objective={"type": "orpo", "beta": 0.5},
                    train={"learning_rate": 1e-4})  # fmt: skip
    assert given.train.learning_rate == 1e-4 and given.objective.beta == 0.5
    assert JobSpec(model="m", dataset="d.jsonl").train.learning_rate == 2e-4
    with pytest.raises(ConfigError, match=r"unknown key objective.'bta'; did you mean 'beta'"):
        Job("m", "d.jsonl", objective={"type": "dpo", "bta": 0.2})
    with pytest.raises(ConfigError, match="apply to dpo and orpo, not sft"):
        Job("m", "d.jsonl", objective={"type": "sft", "beta": 0.2})
    with pytest.raises(ConfigError, match="reference apply to dpo only"):
        Job("m", "d.jsonl", objective={"type": "orpo", "reference": "live"})
    with pytest.raises(ConfigError, match="objective.type"):
        Job("m", "d.jsonl", objective="kto")
    with pytest.raises(ConfigError, match=r"max_prompt_len \(512\) must be below"):
        Job("m", "d.jsonl", objective={"type": "dpo", "max_prompt_len": 512},
            train={"max_seq_len": 256})  # fmt: skip
    with pytest.raises(ConfigError, match="packing: true and train.loss_on: all apply to sft"):
        Job("m", "d.jsonl", objective="orpo", train={"packing": True})
    with pytest.raises(ConfigError, match="objective: dpo is trained by the torch recipe only"):
        Job("m", "d.jsonl", objective="dpo", train={"backend": "mlx"})


def test_a_missing_starting_adapter_fails_before_renting(tmp_path: Path) -> None:
    pairs = [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}]
    job = Job("org/m", pairs, objective="dpo", init_adapter=tmp_path / "nope")
    with pytest.raises(ConfigError, match="init_adapter: .* does not exist"):
        job.validate()
