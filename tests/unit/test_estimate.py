"""The estimator: rows, costs, billing, ranges, filters and its error messages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from loraburst import EstimateError, JobSpec
from loraburst._cost.estimate import Estimate, estimate, model_shape, resolve_gpu
from loraburst._cost.gpus import setup_model
from loraburst.providers import Offer
from rich.console import Console

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def _spec(model: str = "llama-3-8b", **train: Any) -> JobSpec:
    return JobSpec(model=model, dataset="data.jsonl", train=train)


def _offer(provider: str, gpu: str, price: float, inc: int, count: int = 1) -> Offer:
    return Offer(provider, gpu, count, 80.0, price, f"{gpu}-type", billing_increment_s=inc,
                 price_source="api")  # fmt: skip


def test_snapshot_rows_are_labelled_and_sorted_cheapest_first() -> None:
    est = estimate(_spec(max_seq_len=1024), tokens=2_000_000, rows=4000, tokens_exact=True)
    providers = {r.provider for r in est.rows}
    assert {"runpod", "lambda"} <= providers
    assert all(r.price_source.startswith("snapshot") for r in est.rows)
    feasible = est.feasible()
    assert [r.cost_usd for r in feasible] == sorted(r.cost_usd for r in feasible)
    assert est.cheapest() == min(feasible, key=lambda r: (r.cost_usd, r.total_s))
    assert est.fastest() == min(feasible, key=lambda r: (r.total_s, r.cost_usd))
    assert est.fastest() is not None and est.cheapest() is not None
    assert est.fastest().total_s <= est.cheapest().total_s  # type: ignore[union-attr]


@pytest.mark.parametrize("inc", [1, 60, 3600])
def test_cost_is_price_times_billed_time_rounded_up_to_the_increment(inc: int) -> None:
    est = estimate(_spec(max_seq_len=1024), tokens=1_000_000, rows=2000, tokens_exact=True,
                   offers=[_offer("acme", "A100 80GB", 3.6, inc)])  # fmt: skip
    (row,) = est.rows
    billed = math.ceil(row.total_s / inc) * inc
    assert row.billing_increment_s == inc
    assert row.cost_usd == pytest.approx(3.6 * billed / 3600, abs=1e-3)
    if inc == 3600:
        assert row.cost_usd == pytest.approx(3.6 * math.ceil(row.total_s / 3600))


def test_range_brackets_the_cost_and_widens_when_tokens_are_guessed() -> None:
    kw: dict[str, Any] = {"tokens": 3_000_000, "rows": 6000}
    exact = estimate(_spec(), **kw, tokens_exact=True)
    guess = estimate(_spec(), **kw, tokens_exact=False)
    for r in exact.rows + guess.rows:
        assert r.cost_low_usd <= r.cost_usd <= r.cost_high_usd
    by_key = {(r.provider, r.gpu, r.gpu_count): r for r in exact.rows}
    for r in guess.rows:
        e = by_key[(r.provider, r.gpu, r.gpu_count)]
        if r.fits and r.price_per_hour > 0:
            # In seconds: a per-minute bill of a short 8-GPU run can round both to one price.
            assert r.total_high_s - r.total_low_s > e.total_high_s - e.total_low_s
            assert r.cost_high_usd - r.cost_low_usd >= e.cost_high_usd - e.cost_low_usd


def test_steps_from_rows_epochs_and_batch() -> None:
    spec = _spec(micro_batch_size=2, grad_accum=4, epochs=2, eval_fraction=0.1, max_seq_len=512)
    est = estimate(spec, tokens=1_000_000, rows=1000, tokens_exact=True, gpus=["H200"])
    assert {r.steps for r in est.rows} == {math.ceil(1000 * 0.9 * 2 / 8)}
    fixed = estimate(_spec(max_steps=123), tokens=10**6, rows=10**3, tokens_exact=True)
    assert {r.steps for r in fixed.rows} == {123} and fixed.steps == 123


def test_packing_replays_the_trainers_batches() -> None:
    """Rows of 123 tokens pack 16 to a 2,048-token sequence (a row never straddles two, as in
    the trainer): 313 steps, not the 300 that tokens / max_seq_len would say."""
    spec = _spec(micro_batch_size=1, packing=True, max_seq_len=2048)
    est = estimate(spec, tokens=2048 * 300, rows=5000, tokens_exact=True, gpus=["1x H100"])
    assert {r.steps for r in est.rows} == {math.ceil(5000 / 16)}


def test_padding_comes_from_the_rows_not_their_mean() -> None:
    """Gemma-2 trains padded, with eager attention: a skewed set of rows (a few long ones among
    short ones) is slower per real token than rows all of the mean length, though both hold the
    same tokens: on a 40 GB card the longest padded micro-batch (2 x 1,900, its attention scores
    kept) sets the memory plan for the whole run."""
    spec = _spec(model="gemma-2-9b", micro_batch_size=2, packing=False, max_seq_len=2048)
    skewed = [100] * 950 + [1900] * 50
    flat = [190] * 1000
    kw: dict[str, Any] = {
        "tokens": 190_000, "rows": 1000, "tokens_exact": True, "gpus": ["A100 40GB"],
    }  # fmt: skip
    a = estimate(spec, lengths=skewed, **kw).rows[0]
    b = estimate(spec, lengths=flat, **kw).rows[0]
    assert a.mean_tokens == pytest.approx(b.mean_tokens, rel=0.05)
    assert a.tokens_per_s < 0.8 * b.tokens_per_s


def test_filters_by_gpu_spelling_and_provider() -> None:
    est = estimate(_spec(), tokens=10**6, rows=10**3, tokens_exact=True,
                   gpus=["NVIDIA GeForce RTX 4090", "h100"], providers=["RunPod"])  # fmt: skip
    assert {(r.provider, r.gpu) for r in est.rows} == {("runpod", "RTX 4090"),
                                                       ("runpod", "H100 SXM")}  # fmt: skip


def test_gpu_with_no_price_gets_an_unpriced_row_never_chosen() -> None:
    est = estimate(_spec(model="llama-3.2-1b"), tokens=10**6, rows=10**3, tokens_exact=True,
                   gpus=["RTX 5080"])  # fmt: skip
    (row,) = est.rows
    assert row.price_source == "unpriced" and row.fits and row.tokens_per_s > 0
    assert est.cheapest() is None


def test_offers_replace_the_snapshot_and_unknown_gpus_are_skipped() -> None:
    offers = [_offer("runpod", "RTX 4090", 0.31, 1), _offer("runpod", "Mystery 9000", 0.1, 1),
              _offer("lambda", "A100 80GB", 14.32, 60, count=8)]  # fmt: skip
    est = estimate(_spec(), tokens=10**6, rows=10**3, tokens_exact=True, offers=offers)
    assert [(r.gpu, r.price_source) for r in est.rows if r.gpu == "RTX 4090"] == [
        ("RTX 4090", "api")
    ]
    assert any("Mystery 9000" in n for n in est.notes)
    eight = next(r for r in est.rows if r.gpu_count == 8)
    assert eight.strategy == "ddp" and "ddp on 8 GPUs" in eight.note


def test_local_tiny_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    shape = model_shape(str(folder))
    assert shape.shape.hidden == 64 and shape.source.endswith("config.json")
    est = estimate(_spec(model=str(folder), max_seq_len=256), tokens=50_000, rows=200,
                   tokens_exact=True, offers=[], local_gpus=[("RTX 4090", 24.0)])  # fmt: skip
    (row,) = est.rows
    assert (row.provider, row.price_per_hour, row.cost_usd, row.fits) == ("local", 0, 0, True)
    # No boot, image, install or download: only starting and loading, as on the real path.
    assert row.setup_s < setup_model("runpod").boot_s and est.cheapest() == row
    assert "tiny-llama" in est.table()


def test_folder_without_config_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match="config.json"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(EstimateError, match=r"config.json.*num_hidden_layers"):
        model_shape(str(tmp_path))


def test_unknown_model_says_how_to_give_a_config() -> None:
    with pytest.raises(EstimateError) as err:
        model_shape("SuperLM-13B")  # neither a folder, nor owner/name, nor in the registry
    assert "config.json" in str(err.value) and "llama-3.1-8b" in str(err.value)
    with pytest.raises(EstimateError) as err:  # a hub id, offline (the suite runs offline)
        model_shape("acme/SuperLM-13B")
    assert "offline mode" in str(err.value) and "config.json --local-dir" in str(err.value)


def test_unknown_gpu_lists_known_names_closest_first() -> None:
    with pytest.raises(EstimateError) as err:
        resolve_gpu("RTX 4080")
    listed = str(err.value).split(": ", 1)[1].split(", ")
    assert listed[0] in ("RTX 4090", "RTX 5080", "RTX 3090")
    assert listed.index("RTX 4090") < listed.index("H200") < len(listed)
    assert resolve_gpu("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert resolve_gpu("nvidia geforce rtx 3090").name == "RTX 3090"


def test_job_that_fits_nowhere_says_what_would_make_it_fit() -> None:
    spec = _spec(model="llama-3.1-70b", max_seq_len=8192, micro_batch_size=4,
                 gradient_checkpointing=False)  # fmt: skip
    with pytest.raises(EstimateError) as err:
        estimate(spec, tokens=10**6, rows=10**3, tokens_exact=True, gpus=["RTX 3090"])
    msg = str(err.value)
    assert "micro_batch_size: 1" in msg and "gradient_checkpointing" in msg
    assert "max_seq_len" in msg and "larger GPU" in msg
    assert isinstance(err.value.context["estimate"], Estimate)


def test_table_dicts_and_rich_render() -> None:
    est = estimate(_spec(model="mistral-7b"), tokens=10**6, rows=10**3, tokens_exact=False,
                   gpus=["RTX 4090", "L40S"])  # fmt: skip
    dicts = est.to_dicts()
    assert {d["gpu"] for d in dicts} == {"RTX 4090", "L40S"}
    assert json.loads(json.dumps(dicts)) == dicts
    assert "estimated" in est.table() and "RTX 4090" in est.table()
    console = Console(record=True, width=200)
    console.print(est)
    assert "L40S" in console.export_text()


@pytest.mark.parametrize("width", [80, 60])
def test_table_fits_a_narrow_terminal(width: int) -> None:
    """An 80-column terminal gets the compact columns; narrower, a block of lines per offer.
    Either way no line is wider than the terminal and every offer is still there."""
    est = estimate(_spec(), tokens=10**6, rows=10**3, tokens_exact=True,
                   gpus=["RTX 4090", "H100", "RTX 5080"])  # fmt: skip
    console = Console(width=width, record=True)
    console.print(est)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for r in est.rows:
        assert r.gpu in text
    assert "no price" in text  # the RTX 5080 has none in the snapshot, and says so
    assert "$0.00" not in text


@pytest.mark.parametrize(
    "model", ["mistralai/Mistral-7B-v0.1", "meta-llama/Meta-Llama-3-8B", "google/gemma-2-9b"]
)
def test_the_seeds_models_estimate_out_of_the_box(model: str) -> None:
    est = estimate(_spec(model=model), tokens=10**6, rows=10**3, tokens_exact=True, gpus=["H100"])
    row = est.rows[0]
    assert row.fits and row.tokens_per_s > 0 and row.peak_vram_gb < row.vram_gb
