"""Datasets: every source parses, every format normalises, every bad row is named by its place."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loraburst import ConfigError, DatasetError
from loraburst._data.dataset import PreparedDataset, prepare_dataset
from loraburst.remote.protocol import DEFAULT_CHAT_TEMPLATE

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
CHAT_NORMALISED = CHAT


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(ds: PreparedDataset) -> tuple[dict[str, Any], ...]:
    return tuple(ds.iter_rows())


def problems_of(source: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(DatasetError) as info:
        prepare_dataset(source, **kwargs)
    return info.value.problems


def one_problem(source: Any) -> str:
    problems = problems_of(source)
    assert len(problems) == 1, problems
    return problems[0]


# --- sources ---------------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_counts_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(CHAT)}\n\n   \n{json.dumps(CHAT)}\n", encoding="utf-8")
    ds = prepare_dataset(path)
    assert (ds.kind, ds.stats.format, ds.stats.rows) == ("messages", "messages", 2)
    assert rows_of(ds) == (CHAT_NORMALISED, CHAT_NORMALISED)
    assert ds.source == str(path) and ds.hub_id is None


@pytest.mark.parametrize(
    "doc",
    [[CHAT, CHAT], {"data": [CHAT, CHAT]}, {"meta": {"n": 2}, "train": [CHAT, CHAT]}],
    ids=["array", "wrapped", "wrapped-with-meta"],
)
def test_json_array_or_object_with_one_list(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    ds = prepare_dataset(path)
    assert rows_of(ds) == (CHAT_NORMALISED, CHAT_NORMALISED)


def test_json_single_row_object_is_one_row(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(CHAT), encoding="utf-8")
    assert rows_of(prepare_dataset(path)) == (CHAT_NORMALISED,)


def test_csv_alpaca_and_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output", "source"])
        w.writerow(["Add", "1 and 2", "3", "web"])
        w.writerow(["Say hi\nin French", "", "Bonjour", "web"])
    ds = prepare_dataset(path)
    assert ds.stats.format == "alpaca"
    assert rows_of(ds)[0]["messages"][0] == {"role": "user", "content": "Add\n\n1 and 2"}
    assert rows_of(ds)[1]["messages"] == [
        {"role": "user", "content": "Say hi\nin French"},
        {"role": "assistant", "content": "Bonjour"},
    ]


def test_csv_messages_column_holds_json(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT["messages"])])
    assert rows_of(prepare_dataset(path)) == (CHAT_NORMALISED,)


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2=", "completion": "4"}] * 3), path)
    ds = prepare_dataset(path)
    assert (ds.kind, ds.stats.rows) == ("prompt_completion", 3)
    assert rows_of(ds)[0] == {"prompt": "2+2=", "completion": "4"}


def test_save_to_disk_folder_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(4)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ds = prepare_dataset(tmp_path / "saved")
    assert (ds.stats.format, ds.stats.rows) == ("sharegpt", 4)
    assert rows_of(ds)[3]["messages"][0] == {"role": "user", "content": "q3"}

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert prepare_dataset(tmp_path / "dict").stats.rows == 2


def test_python_list_of_dicts() -> None:
    ds = prepare_dataset([{"text": "hello"}, {"text": "world", "id": 7}])
    assert (ds.source, ds.kind) == ("<rows>", "text")
    assert rows_of(ds) == ({"text": "hello"}, {"text": "world"})


@pytest.mark.parametrize("hub_id", ["tatsu-lab/alpaca", "HuggingFaceH4/ultrachat_200k", "squad"])
def test_hub_id_is_not_loaded_locally(hub_id: str) -> None:
    ds = prepare_dataset(hub_id)
    assert (ds.kind, ds.hub_id, ds.source, rows_of(ds)) == ("hub", hub_id, hub_id, ())
    assert (ds.jsonl_path, ds.sha256, ds.size) == (None, None, 0)
    assert ds.stats.tokens is None and not ds.stats.tokens_exact
    assert "unknown" in ds.stats.describe()
    assert ds.open().read() == b""


@pytest.mark.parametrize("missing", ["data/train.jsonl", "train.csv", "./train", "/no/such/dir"])
def test_missing_path_is_a_config_error_naming_it(missing: str) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        prepare_dataset(missing, field="eval_dataset")
    assert not isinstance(info.value, DatasetError)
    assert repr(missing) in str(info.value) and "eval_dataset" in str(info.value)


def test_unsupported_file_and_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"notes\.txt: unsupported file type '\.txt'"):
        prepare_dataset(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="not a datasets.save_to_disk folder"):
        prepare_dataset(tmp_path / "folder")


# --- formats ---------------------------------------------------------------------------------

FORMATS = [
    ("messages", {**CHAT, "id": 3}, "messages", CHAT),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A", "weight": 1},
            ]
        },
        "messages",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
    ),
    (
        "alpaca",
        {"instruction": "Translate", "input": "", "output": "Traduire", "system": "You translate."},
        "messages",
        {
            "messages": [
                {"role": "system", "content": "You translate."},
                {"role": "user", "content": "Translate"},
                {"role": "assistant", "content": "Traduire"},
            ]
        },
    ),
    ("prompt_completion", {"prompt": "P", "completion": "C", "x": 1}, "prompt_completion", None),
    ("text", {"text": "Once upon a time.", "meta": "drop"}, "text", {"text": "Once upon a time."}),
]


@pytest.mark.parametrize(("fmt", "row", "kind", "expected"), FORMATS, ids=[f[0] for f in FORMATS])
def test_format_detected_and_normalised(
    tmp_path: Path, fmt: str, row: dict[str, Any], kind: str, expected: dict[str, Any] | None
) -> None:
    ds = prepare_dataset(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert (ds.stats.format, ds.kind) == (fmt, kind)
    assert rows_of(ds)[0] == (expected or {"prompt": "P", "completion": "C"})


def test_sharegpt_accepts_openai_role_names() -> None:
    row = {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    assert rows_of(prepare_dataset([row]))[0]["messages"][1] == {
        "role": "assistant",
        "content": "A",
    }


# --- bad inputs: each names its place --------------------------------------------------------


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f'{json.dumps(CHAT)}\n\n{{"messages": [\n', encoding="utf-8")
    problem = one_problem(path)
    assert problem.startswith(f"{path}:3: malformed JSON")


def test_malformed_json_file_uses_jsons_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n', encoding="utf-8")
    assert one_problem(path).startswith(f"{path}:4: malformed JSON")


def test_json_object_with_two_lists(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": [CHAT], "test": [CHAT]}), encoding="utf-8")
    problem = one_problem(path)
    assert problem.startswith(f"{path}:1: a JSON object must hold exactly one list")
    assert "'test', 'train'" in problem


def test_row_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([CHAT, ["user", "hi"], "text"]), encoding="utf-8")
    assert problems_of(path) == [
        f"{path}:row 2: row is a list, not an object; each row must be a dict",
        f"{path}:row 3: row is a str, not an object; each row must be a dict",
    ]


def test_unknown_fields() -> None:
    problem = one_problem([{"frage": "q", "antwort": "a"}])
    assert problem.startswith("<rows>:row 1: no known fields (found: 'antwort', 'frage')")
    assert "columns: {prompt: <field>, response: <field>}" in problem


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "messages[0] 'content' is missing",
        ),
        (
            {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages[0] has no 'role'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "  \n"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages[0] 'content' is empty",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
            "messages[1] 'content' must be a string, got int",
        ),
        (
            {"messages": "hello"},
            "'messages' must be a list of {'role', 'content'} objects, got str",
        ),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": ["hi"]}, "messages[0] is str; each turn must be an object"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
            "conversations[1] 'value' is missing",
        ),
        ({"instruction": "do it"}, "'output' is missing; an alpaca row needs"),
        ({"instruction": "", "output": "x"}, "'instruction' is empty"),
        ({"instruction": "i", "input": 3, "output": "x"}, "'input' must be a string"),
        ({"prompt": "p", "completion": None}, "'completion' is missing"),
        ({"prompt": "p", "completion": [1]}, "'completion' must be a string, got list"),
        ({"text": "   "}, "'text' is empty"),
    ],
)
def test_missing_empty_or_non_string_fields(tmp_path: Path, row: Any, reason: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT, CHAT, row] if "messages" in row else [row])
    line = 3 if "messages" in row else 1
    problem = one_problem(path)
    assert problem.startswith(f"{path}:{line}: {reason}"), problem


def test_unknown_role_names_role_and_allowed(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}
    problem = one_problem(write_jsonl(tmp_path / "data.jsonl", [CHAT, row]))
    assert problem == (
        f"{tmp_path / 'data.jsonl'}:2: messages[1] has unknown role 'tool'; "
        "allowed: system, user, assistant"
    )
    bad = {"conversations": [{"from": "bot", "value": "x"}]}
    assert "unknown from 'bot'; allowed: system, human, gpt, user, assistant" in one_problem([bad])


def turns(*roles: str) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": f"{r} text"} for r in roles]}


@pytest.mark.parametrize(
    ("roles", "reasons"),
    [
        (("user", "system", "assistant"), ["messages[1] is a system turn; only the first"]),
        (
            ("assistant", "user", "assistant"),
            ["messages[0] is 'assistant' where 'user' was expected"],
        ),
        (("user", "user", "assistant"), ["messages[1] is 'user' where 'assistant' was expected"]),
        (("system", "user"), ["messages has no assistant turn"]),
        (("user",), ["messages has no assistant turn"]),
        (("user", "assistant", "user"), ["messages ends with a user turn; the last turn must be"]),
        (("user", "user"), ["messages[1] is 'user' where", "messages has no assistant turn"]),
    ],
)
def test_turn_order(tmp_path: Path, roles: tuple[str, ...], reasons: list[str]) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, turns(*roles)])
    problems = problems_of(path)
    assert len(problems) == len(reasons), problems
    for problem, reason in zip(problems, reasons, strict=True):
        assert problem.startswith(f"{path}:2: {reason}"), problem


def test_mixed_formats_name_row_and_both_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT, {"prompt": "p", "completion": "c"}, CHAT])
    problem = one_problem(path)
    assert problem.startswith(f"{path}:2: mixed formats: this row is prompt_completion")
    assert f"first row ({path}:1) is messages" in problem


@pytest.mark.parametrize(
    ("name", "content"),
    [("data.jsonl", ""), ("data.jsonl", "\n  \n\n"), ("data.json", "[]"), ("data.csv", "text\n")],
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert one_problem(path) == f"{path}: dataset is empty (no rows); add at least one row"


def test_empty_list() -> None:
    assert one_problem([]).startswith("<rows>: dataset is empty")


def test_csv_problems_name_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        'prompt,completion\n"multi\nline",ok\n,missing prompt\n"a,b"\nx,y,z\n', encoding="utf-8"
    )
    # Lines: 1 header, 2-3 one quoted row, 4 empty prompt, 5 one cell, 6 three cells.
    problems = problems_of(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:4", f"{path}:5", f"{path}:6"]
    assert "'prompt' is empty" in problems[0]
    assert "has 1 cells but the header has 2" in problems[1]


def test_csv_messages_cell_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}"\n', encoding="utf-8")
    assert one_problem(path).startswith(f"{path}:2: column 'messages' is not valid JSON")


def test_parquet_and_list_problems_name_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, {"text": ""}]), path)
    assert one_problem(path).startswith(f"{path}:row 2: 'text' is empty")
    assert one_problem([{"text": "ok"}, {"text": 1}]).startswith("<rows>:row 2: 'text' must be")


def test_bad_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    assert one_problem(path).startswith(f"{path}:2: not valid UTF-8")


def test_every_problem_is_collected_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(CHAT), "{oops", json.dumps(turns("user")), json.dumps({"text": "t"}), "7"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = problems_of(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5)]


def test_first_20_shown_then_the_count(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": ""}] * 25)
    with pytest.raises(DatasetError) as info:
        prepare_dataset(path)
    assert len(info.value.problems) == 25
    message = str(info.value)
    assert "has 25 problem(s)" in message
    assert f"{path}:20: 'text' is empty" in message
    assert f"{path}:21:" not in message
    assert message.rstrip().endswith("... and 5 more")


# --- token counts ----------------------------------------------------------------------------

SENTENCES = [
    "the cat sat on the mat",
    "what is the capital of france",
    "paris is the capital of france",
    "be brief and answer the question",
]


def build_tokenizer(folder: Path, chat_template: str | None = None) -> Any:
    """A real word-level tokenizer that adds a BOS to plain text, saved like a model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return folder


def test_exact_counts_match_what_the_trainer_tokenises(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chats = [CHAT, turns("user", "assistant", "user", "assistant")]
    ds = prepare_dataset(chats, tokenizer=str(tokenizer_dir), max_seq_len=20)
    # What TRL's SFTTrainer does: render with the template and tokenise in one call.
    want = [
        len(
            tok.apply_chat_template(
                c["messages"], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for c in chats
    ]
    assert ds.stats.tokens_exact
    assert (ds.stats.tokens, ds.stats.max_tokens) == (sum(want), max(want))
    assert ds.stats.over_max_seq_len == sum(w > 20 for w in want) > 0
    assert "exact" in ds.stats.describe() and "estimated" not in ds.stats.describe()

    pc = prepare_dataset(
        [{"prompt": "the cat", "completion": " sat"}], tokenizer=str(tokenizer_dir)
    )
    assert pc.stats.tokens == len(tok("the cat sat</s>")["input_ids"]) == 5  # <s> + 3 + </s>
    text = prepare_dataset([{"text": "paris is the capital"}], tokenizer=str(tokenizer_dir))
    assert text.stats.tokens == len(tok("paris is the capital</s>")["input_ids"]) == 6


def test_tokenizers_own_chat_template_wins(tmp_path: Path, tokenizer_dir: Path) -> None:
    terse = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok = build_tokenizer(tmp_path / "terse", chat_template=terse)
    default = prepare_dataset([CHAT], tokenizer=str(tokenizer_dir)).stats.tokens
    own = prepare_dataset([CHAT], tokenizer=str(tmp_path / "terse")).stats.tokens
    want = tok.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert own == len(want)
    # ChatML adds <|im_start|>, the role and <|im_end|> to each of the 3 turns.
    assert default == own + 3 * 3


def test_estimate_when_no_tokenizer_is_on_disk(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    rows = [{"text": "word " * 2000}, {"text": "short"}]
    for tokenizer in (None, "org/not-in-cache", str(broken), str(tmp_path)):
        stats = prepare_dataset(rows, tokenizer=tokenizer, max_seq_len=512).stats
        assert not stats.tokens_exact
        assert stats.tokens is not None and stats.max_tokens is not None
        assert 10_000 / 4 < stats.max_tokens < 10_000 / 3  # chars / ~3.6
        assert stats.over_max_seq_len == 1
        assert stats.chars == 10_005
        assert "estimated" in stats.describe() and "will be truncated" in stats.describe()


# --- output ----------------------------------------------------------------------------------


def test_normalised_jsonl_is_deterministic_and_content_addressed(tmp_path: Path) -> None:
    rows = [{"text": "héllo", "z": 1}, {"text": "wörld"}]
    reordered = [{"z": 1, "text": "héllo"}, {"text": "wörld"}]
    first = prepare_dataset(rows)
    again = prepare_dataset(write_jsonl(tmp_path / "d.jsonl", reordered))
    assert first.jsonl_path is not None and again.jsonl_path == first.jsonl_path
    data = first.jsonl_path.read_bytes()
    assert data == '{"text": "héllo"}\n{"text": "wörld"}\n'.encode()
    assert first.sha256 == again.sha256 == hashlib.sha256(data).hexdigest()
    assert first.jsonl_path.name == f"{first.sha256}.jsonl" and first.size == len(data)
    with prepare_dataset([CHAT]).open() as f:
        chat = f.read()
    assert chat.endswith(b"\n") and chat.count(b"\n") == 1
    assert json.loads(chat) == CHAT
    assert isinstance(prepare_dataset([CHAT]), PreparedDataset)


def test_importing_the_module_stays_light() -> None:
    code = (
        "import sys, loraburst._data.dataset; "
        "print(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_pyarrow_says_what_to_install(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}]), path)
    # A None entry in sys.modules makes the import fail, as on a light client install.
    code = (
        "import sys; sys.modules['pyarrow'] = sys.modules['pyarrow.parquet'] = None\n"
        "from loraburst._data.dataset import prepare_dataset\n"
        "from loraburst import ConfigError\n"
        "try:\n    prepare_dataset(sys.argv[1])\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert "pip install pyarrow" in out.stdout


# --- streaming -------------------------------------------------------------------------------


def test_failed_prepare_leaves_no_spill_file(tmp_path: Path) -> None:
    from loraburst._state.home import home

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": ""}])
    problems_of(path)
    assert list((home() / "datasets").iterdir()) == []


def test_every_bad_utf8_line_is_named_and_a_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xff"}\n{"text": "b"}\n{"text": "\xfe"}\n'
    )
    problems = problems_of(path)
    # Byte offsets are of the file: the BOM and the earlier lines count.
    assert problems == [
        f"{path}:2: not valid UTF-8 (byte 27); re-save the file as UTF-8",
        f"{path}:4: not valid UTF-8 (byte 55); re-save the file as UTF-8",
    ]


def test_csv_bad_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbftext\nfine\nbad \xff here\n")
    assert one_problem(path).startswith(f"{path}:3: not valid UTF-8")


def test_exact_counts_cross_batch_boundaries(tokenizer_dir: Path) -> None:
    from loraburst._data.dataset import count_tokens

    rows = [{"text": " ".join(SENTENCES[: 1 + i % 4])} for i in range(2500)]
    counts, exact = count_tokens(rows, "text", str(tokenizer_dir))
    stats = prepare_dataset(rows, tokenizer=str(tokenizer_dir), max_seq_len=12).stats
    assert exact and stats.tokens_exact
    assert (stats.tokens, stats.max_tokens) == (sum(counts), max(counts))
    assert stats.over_max_seq_len == sum(c > 12 for c in counts) > 0


# VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak across fork+exec into
# ru_maxrss, which would hide the child's own growth.
_RSS_PROBE = """
import json, sys
def peak_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from loraburst._data.bundle import build_bundle
from loraburst._data.dataset import prepare_dataset
from loraburst._api.spec import JobSpec
before = peak_kb()
ds = prepare_dataset(sys.argv[1])
bundle = build_bundle(JobSpec(model="org/model", dataset=sys.argv[1]), ds, None)
after = peak_kb()
print(json.dumps({"grew_kb": after - before, "rows": ds.stats.rows, "size": bundle.size}))
"""


def test_prepare_and_bundle_keep_memory_flat(tmp_path: Path) -> None:
    """Preparing and bundling a 40 MB JSONL grows the peak RSS by far less than its size."""
    path = tmp_path / "big.jsonl"
    answer = "word " * 400
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20_000):
            chat = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": chat}) + "\n")
    size = path.stat().st_size
    assert size > 40e6
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    probe = json.loads(out.stdout)
    assert probe["rows"] == 20_000 and probe["size"] > size
    assert probe["grew_kb"] * 1024 < size / 4, probe


# --- bounded reads ---------------------------------------------------------------------------


def test_a_line_over_the_row_limit_is_named_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORABURST_MAX_ROW_MB", "1")
    path = tmp_path / "d.jsonl"
    long_row = json.dumps({"text": "x" * (2 << 20)})
    path.write_text(json.dumps({"text": "ok"}) + "\n" + long_row + "\n{not json\n")
    problems = problems_of(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:2: line is longer than 1 MiB")
    assert "LORABURST_MAX_ROW_MB" in problems[0] and "split it" in problems[0]
    assert problems[1].startswith(f"{path}:3: malformed JSON")  # numbering carries on
    # The limit is the user's to raise when the rows really are that long.
    monkeypatch.setenv("LORABURST_MAX_ROW_MB", "4")
    ok = tmp_path / "ok.jsonl"
    ok.write_text(long_row + "\n")
    assert prepare_dataset(ok).stats.rows == 1


def test_a_csv_cell_over_csvs_limit_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(f'text\n"{"y" * 200_000}"\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:2: malformed CSV") and "write long rows as JSONL" in problem


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null"])
def test_a_dataset_that_is_a_device_is_refused(tmp_path: Path, target: str) -> None:
    link = tmp_path / "data.jsonl"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as e:
        prepare_dataset(link)
    assert "is a device" in str(e.value) and target in str(e.value)


def test_a_dataset_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    with pytest.raises(ConfigError, match="is a FIFO"):
        prepare_dataset(fifo)


def test_a_json_document_over_the_limit_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraburst._data import read as _dataset_read

    monkeypatch.setattr(_dataset_read, "MAX_JSON_BYTES", 1 << 20)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "x" * 1000}] * 2000))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:1:") and "jq -c" in problem and "JSONL" in problem


def test_rows_too_long_for_one_tokenizer_call_are_counted_in_pieces(
    tokenizer_dir: Path,
) -> None:
    from loraburst._data import tokens as _dataset_tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = " ".join(SENTENCES * (3 * _dataset_tokens._CHUNK_CHARS // 100))
    assert len(text) > 2 * _dataset_tokens._CHUNK_CHARS
    ds = prepare_dataset([{"text": text}, {"text": "the cat"}], tokenizer=str(tokenizer_dir))
    whole = len(tok(text + tok.eos_token)["input_ids"])  # BOS + words + EOS, as the trainer
    assert ds.stats.tokens_exact
    assert ds.stats.max_tokens == whole
    assert ds.stats.tokens == whole + len(tok("the cat" + tok.eos_token)["input_ids"])


_BIG_LINE_PROBE = """
import json, sys
def peak_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from loraburst._data.dataset import prepare_dataset
from loraburst._exceptions import DatasetError
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[2])  # the libraries' own memory is not the row's
before = peak_kb()
try:
    prepare_dataset(sys.argv[1], tokenizer=sys.argv[2])
    problems = []
except DatasetError as e:
    problems = e.problems
print(json.dumps({"grew_kb": peak_kb() - before, "problems": problems}))
"""


def test_a_50_mb_single_line_is_refused_in_flat_memory(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Before: read whole and tokenised whole with the model's tokenizer, 10 GB of RAM."""
    path = tmp_path / "one.jsonl"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 10**7}]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    assert path.stat().st_size > 50e6
    out = subprocess.run(
        [sys.executable, "-c", _BIG_LINE_PROBE, str(path), str(tokenizer_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    probe = json.loads(out.stdout.splitlines()[-1])
    assert [p.split(": ", 1)[0] for p in probe["problems"]] == [f"{path}:1"]
    assert "row limit" in probe["problems"][0]
    assert probe["grew_kb"] * 1024 < 32e6, probe
