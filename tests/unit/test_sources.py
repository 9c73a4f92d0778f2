"""Data as users have it: layouts detected, column mappings (with did-you-mean), sources with
splits and caps, weighted mixes, templates in the spec, and the data report's findings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loraburst import ConfigError, DatasetError, Job
from loraburst._cli import main
from loraburst.remote.mix import mix_counts, pick

from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"
OPENHERMES = DATA / "openhermes_sample.jsonl"
MAGICODER = DATA / "magicoder_sample.jsonl"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(path: Path | None) -> list[dict[str, Any]]:
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()]


def job(dataset: Any, max_seq_len: int = 128, **kw: Any) -> Job:
    return Job("tiny", dataset, train={"max_seq_len": max_seq_len}, **kw)


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "layout"),
    [
        (("instruction", "response"), "instruction_response"),
        (("question", "answer"), "question_answer"),
        (("query", "response"), "query_response"),
        (("prompt", "response"), "prompt_response"),
    ],
)
def test_common_pair_layouts_are_recognised_without_a_mapping(
    tmp_path: Path, fields: tuple[str, str], layout: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{fields[0]: "Q?", fields[1]: "A."}] * 2)
    train, _ = job(path).prepare()
    assert train.stats.format == layout and train.kind == "messages"
    assert rows_of(train.jsonl_path)[0] == {
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    }


def test_the_public_datasets_layouts_validate_with_their_layout_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sample, printed in ((OPENHERMES, "sharegpt"), (MAGICODER, "instruction/response")):
        spec = tmp_path / f"{sample.stem}.yaml"
        spec.write_text(f"model: tiny\ndataset: {sample}\n")
        assert main(["validate", str(spec)]) == 0
        out = capsys.readouterr().out
        assert "valid" in out and f"({printed}" in out, out


def test_a_column_mapping_reads_any_layout(tmp_path: Path) -> None:
    rows = [{"frage": "Wie spät?", "antwort": "Acht.", "rolle": "Sei kurz."}]
    path = write_jsonl(tmp_path / "de.jsonl", rows)
    source = {"path": str(path), "columns": {"prompt": "frage", "response": "antwort",
                                             "system": "rolle"}}  # fmt: skip
    train, _ = job(source).prepare()
    assert train.stats.format == "columns" and "mapped columns" in train.stats.describe()
    assert rows_of(train.jsonl_path)[0]["messages"] == [
        {"role": "system", "content": "Sei kurz."},
        {"role": "user", "content": "Wie spät?"},
        {"role": "assistant", "content": "Acht."},
    ]


def test_a_conversation_mapping_with_role_names(tmp_path: Path) -> None:
    turns = [{"speaker": "customer", "said": "Hi"}, {"speaker": "agent", "said": "Hello!"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": turns}])
    source = {
        "path": str(path),
        "columns": {"messages": "dialog", "role": "speaker", "content": "said",
                    "roles": {"customer": "user", "agent": "assistant"}},
    }  # fmt: skip
    train, _ = job(source).prepare()
    assert [m["role"] for m in rows_of(train.jsonl_path)[0]["messages"]] == ["user", "assistant"]


def test_a_mapped_conversation_column_in_csv_is_json(tmp_path: Path) -> None:
    turns = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    path = tmp_path / "d.csv"
    path.write_text('dialog\n"' + turns.replace('"', '""') + '"\n', encoding="utf-8")
    train, _ = job({"path": str(path), "columns": {"messages": "dialog"}}).prepare()
    assert rows_of(train.jsonl_path)[0]["messages"][1] == {"role": "assistant", "content": "Yo"}


def test_a_mapping_that_names_a_missing_field_says_did_you_mean(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "response": "A"}] * 3)
    with pytest.raises(ConfigError) as e:
        job(
            {"path": str(path), "columns": {"prompt": "instruction", "response": "respone"}}
        ).prepare()
    assert "columns.response: 'respone' is not a field of" in str(e.value)
    assert f"{path}:1" in str(e.value) and "did you mean 'response'?" in str(e.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "d.jsonl", "colums": {}}, "unknown key 'colums'; did you mean 'columns'?"),
        (
            {"path": "d.jsonl", "columns": {"promt": "q"}},
            "unknown key columns.'promt'; did you mean 'prompt'?",
        ),
        ({"path": "d.jsonl", "format": "sharegtp"}, "format"),
        ({"path": "d.jsonl", "columns": {"response": "a"}}, "add columns.prompt"),
        ({"path": "d.jsonl", "columns": {"messages": "m", "text": "t"}}, "messages and text"),
        ({"path": "d.jsonl", "split": "train[:x]"}, "is not a split expression"),
        ({"path": "org/ds", "split": "train[:10%]", "streaming": True}, "sliced by percent"),
        ({"path": "d.jsonl", "weight": 0}, "weight"),
    ],
)
def test_source_typos_and_bad_settings_fail_in_the_spec(
    source: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        job(source)
    assert message in str(e.value), str(e.value)


def test_a_chat_template_typo_says_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'llama-3'"):
        job("d.jsonl", chat_template="llama3")
    assert job("d.jsonl", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")


def test_yaml_source_paths_are_relative_to_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "qa.jsonl", [{"question": "Q", "answer": "A"}])
    spec = tmp_path / "sub" / "job.yaml"
    spec.write_text("model: tiny\ndataset:\n  - path: qa.jsonl\n    max_rows: 1\n")
    train, _ = Job.from_yaml(spec).prepare()
    assert train.stats.rows == 1 and train.source == str(tmp_path / "sub" / "qa.jsonl")


# --- sources and mixes -----------------------------------------------------------------------


def test_max_rows_and_a_split_slice_cut_a_local_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)])
    train, _ = job({"path": str(path), "split": "train[2:8]", "max_rows": 3}).prepare()
    assert [r["text"] for r in rows_of(train.jsonl_path)] == ["row 2", "row 3", "row 4"]
    with pytest.raises(ConfigError, match="a local file is one split"):
        job({"path": str(path), "split": "test"}).prepare()


def test_mix_counts_keep_the_weights_without_repeating_rows() -> None:
    assert mix_counts([100, 30], [None, None]) == [100, 30]
    assert mix_counts([100, 30], [3, 1]) == [90, 30]  # 75% / 25%, the smaller one all used
    assert mix_counts([100, 1000], [0.5, 0.5]) == [100, 100]
    with pytest.raises(ValueError, match="give every source a weight"):
        mix_counts([1, 2], [1.0, None])
    chosen = pick(100, 10, seed=42, salt=1)
    assert len(set(chosen)) == 10 and chosen == sorted(chosen) == pick(100, 10, 42, 1)


def test_a_weighted_two_source_mix_counts_its_proportions(tmp_path: Path) -> None:
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    )
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"t{i}"} for i in range(10)])
    train, _ = job([{"path": str(a), "weight": 0.8}, {"path": str(b), "weight": 0.2}]).prepare()
    assert train.kind == "mix" and [p.kind for p in train.parts] == ["messages", "text"]
    assert train.stats.rows == 50  # 40 : 10 is 80 : 20, so every row is used
    train, _ = job([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}]).prepare()
    assert (
        train.stats.rows == 20
        and "a.jsonl (question/answer) 10 of 40, b.jsonl (text) 10 of 10" in train.stats.describe()
    )
    # Estimated tokens are the parts' in proportion.
    parts = train.parts
    expected = round(parts[0].stats.tokens * 10 / 40) + parts[1].stats.tokens  # type: ignore[operator]
    assert train.stats.tokens == expected
    with pytest.raises(ConfigError, match="give every source a weight"):
        job([{"path": str(a), "weight": 1}, {"path": str(b)}]).prepare()


def test_a_mix_travels_as_sources_in_the_bundle(tmp_path: Path) -> None:
    from loraburst._data.bundle import _bundle_spec, _members
    from loraburst.remote.protocol import BundleSpec, SourceSpec

    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    j = job([{"path": str(a), "weight": 2}, {"path": "org/hub-data", "config": "en",
            "split": "train[:100]", "columns": {"prompt": "q", "response": "a"}, "weight": 1}])  # fmt: skip
    train, _ = j.prepare()
    doc = BundleSpec.from_dict(json.loads(_bundle_spec(j.spec, train, None)))
    sources = [SourceSpec.from_dict(s) for s in doc.spec.dataset]
    assert sources[0] == SourceSpec(path="data/train-0.jsonl", weight=2, kind="messages")
    assert (sources[1].path, sources[1].config, sources[1].split) == (
        "org/hub-data",
        "en",
        "train[:100]",
    )
    assert sources[1].columns == {"prompt": "q", "response": "a"} and sources[1].kind is None
    assert [m[0] for m in _members(j.spec, train, None) if m[0].startswith("data/")] == [
        "data/train-0.jsonl"
    ]
    # A plain eval file beside a mix travels as a source of its own kind.
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": "t"}])
    j = job([{"path": str(a), "weight": 2}, {"path": str(a), "weight": 1}], eval_dataset=ev)
    train, evald = j.prepare()
    doc = BundleSpec.from_dict(json.loads(_bundle_spec(j.spec, train, evald)))
    assert doc.spec.eval_dataset == [{"path": "data/eval-0.jsonl", "kind": "text"}]
    assert "data/eval-0.jsonl" in [m[0] for m in _members(j.spec, train, evald)]


# --- the data report -------------------------------------------------------------------------


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    long = " ".join(f"word{i}" for i in range(200))
    near = "the quick brown fox jumps over the lazy dog near the river bank today " * 3
    rows: list[dict[str, Any]] = [
        {"instruction": "Say hi.", "response": "Hi!"},  # 1
        {"instruction": "Explain tides.", "response": long},  # 2: truncated at 64 tokens
        {"instruction": "Say hi.", "response": "Hi!"},  # 3: exact duplicate of 1
        {
            "instruction": "Copy me please, exactly as written",
            "response": "Copy me please, exactly as written",
        },  # 4: echo
        {"instruction": "Describe.", "response": near + "end"},  # 5
        {"instruction": "Describe.", "response": near + "finish"},  # 6: near duplicate of 5
        {"instruction": "Caf\u00c3\u00a9?", "response": "Bad bytes\u0007 here."},  # 7: damage
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"instruction": "Describe.", "response": near + "end"}]
    )
    return train, evals


def test_the_report_finds_planted_problems_on_their_lines(tmp_path: Path) -> None:
    train, evals = _planted(tmp_path)
    j = job(str(train), eval_dataset=str(evals))
    j.prepare()
    report = j.report
    assert report is not None
    f = report.findings
    assert f["duplicates"].examples == [f"{train}:3: same as {train}:1"]
    assert [e.split(":")[1] for e in f["near_duplicates"].examples] == ["6"]
    assert f["truncated"].count == 1 and f["truncated"].examples[0].startswith(f"{train}:2: ")
    assert f["echoes"].examples == [f"{train}:4"]
    assert f["damaged"].count == 1 and f["damaged"].examples[0].startswith(f"{train}:7: ")
    assert f["eval_overlap"].examples == [f"{evals}:1: same as {train}:5"]
    assert report.sources[0]["rows"] == 7 and report.sources[1]["field"] == "eval_dataset"
    assert sum(n for _, n in report.histogram) == 7 and report.histogram[-1] == ("over 128", 1)
    assert report.violations == []


def test_empty_answers_are_errors_and_findings(tmp_path: Path) -> None:
    rows = [{"instruction": "Q", "response": "A"}, {"instruction": "Q2", "response": "  \n"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    j = job(str(path))
    with pytest.raises(DatasetError, match=f"{path}:2: 'response' is empty"):
        j.prepare()
    assert j.report is not None and j.report.findings["empty_answers"].examples == [f"{path}:2"]


def test_thresholds_turn_findings_into_errors(tmp_path: Path) -> None:
    train, _ = _planted(tmp_path)
    j = job(str(train), data_checks={"max_duplicate_share": 0.1, "max_truncated_share": 0.5})
    with pytest.raises(DatasetError) as e:
        j.prepare()
    (problem,) = e.value.problems
    assert "exact duplicate rows" in problem and "data_checks.max_duplicate_share = 0.1" in problem
    assert f"{train}:3" in problem


def test_validate_report_prints_findings_with_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, _ = _planted(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: tiny\ndataset: {train}\ntrain:\n  max_seq_len: 128\n")
    assert main(["validate", "--report", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "exact duplicate rows (training data): 1 (14.3% of 7)" in out
    assert f"{train}:3: same as {train}:1" in out and "over 128" in out


def test_the_readme_mapping_example_is_a_valid_spec() -> None:
    import yaml
    from loraburst import JobSpec

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Data as you have it", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = JobSpec.model_validate(yaml.safe_load(block))
    assert spec.chat_template == "llama-3" and isinstance(spec.dataset, list)
    assert spec.dataset[1].columns is not None and spec.dataset[1].columns.prompt == "task"
    assert spec.dataset[2].split == "train[:2000]"


_REPORT_PROBE = """
import json, sys
def peak_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from loraburst import Job
import loraburst._data.mix, loraburst._data.report, loraburst._data.tokens, sqlite3
before = peak_kb()
job = Job("org/model", sys.argv[1])
job.prepare()
print(json.dumps({"grew_kb": peak_kb() - before, "rows": job.report.sources[0]["rows"]}))
"""


@pytest.mark.slow
def test_the_report_keeps_client_memory_flat(tmp_path: Path) -> None:
    """Four times the rows (and bytes) through the checks and the report: the peak RSS grows by
    far less than the extra data (the hashes live in SQLite on disk)."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    grew, sizes = [], []
    for n in (1500, 6000):
        path = tmp_path / f"d{n}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                answer = " ".join(rng.choice(words) for _ in range(250))
                f.write(json.dumps({"instruction": f"q{i}", "response": answer}) + "\n")
        out = subprocess.run([sys.executable, "-c", _REPORT_PROBE, str(path)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        probe = json.loads(out.stdout)
        assert probe["rows"] == n
        grew.append(probe["grew_kb"] * 1024)
        sizes.append(path.stat().st_size)
    assert grew[1] - grew[0] < (sizes[1] - sizes[0]) / 4, (grew, sizes)
