"""More than one GPU in the estimate: the strategy each row gets, per-GPU memory, host RAM."""

from __future__ import annotations

import pytest
from loraburst import EstimateError, JobSpec
from loraburst._cost.estimate import estimate
from loraburst._cost.gpus import parse_gpu
from loraburst._cost.shapes import model_shape
from loraburst.remote.sharding import (
    DDP_EFFICIENCY,
    STRATEGIES,
    layout,
    rank_grad_accum,
)

SEED = {"model": "meta-llama/Meta-Llama-3-70B-Instruct", "dataset": "d.jsonl",
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 500, "micro_batch_size": 1, "grad_accum": 4,
                  "max_seq_len": 2048}}  # fmt: skip


def test_seed_row_70b_on_two_rtx_3090s_is_feasible_with_its_host_ram_stated() -> None:
    est = estimate(JobSpec(**SEED), tokens=2000 * 1500, rows=2000, tokens_exact=False,
                   gpus=["1x RTX 3090", "2x RTX 3090"])  # fmt: skip
    one = next(r for r in est.rows if r.gpu_count == 1)
    two = next(r for r in est.rows if r.gpu_count == 2)
    assert not one.fits and one.strategy == "1 GPU"
    assert two.feasible and two.strategy == "fsdp+offload"
    assert two.peak_vram_gb <= 24
    # Each rank quantises the whole NF4 model (about 36 GiB for 70B) in host memory while
    # loading, before FSDP moves its shard to its GPU; offload then keeps the shards there.
    assert 2 * 35 < two.host_ram_gb < 120
    assert "host RAM" in two.note and "fsdp+offload on 2 GPUs" in two.note
    assert est.cheapest() == two


def test_ddp_when_the_model_fits_one_card_and_throughput_scales() -> None:
    spec = JobSpec(model="llama-3-8b", dataset="d.jsonl", train={"grad_accum": 8})
    est = estimate(spec, tokens=4_000_000, rows=4000, tokens_exact=True,
                   gpus=["1x RTX 4090", "2x RTX 4090", "4x RTX 4090"])  # fmt: skip
    by_n = {r.gpu_count: r for r in est.rows if r.provider == "runpod"}
    assert {r.strategy for r in by_n.values()} == {"1 GPU", "ddp"}
    assert by_n[2].strategy == by_n[4].strategy == "ddp"
    # The global batch is kept: the same steps on any count, each GPU doing its share.
    assert by_n[1].steps == by_n[2].steps == by_n[4].steps
    for n in (2, 4):
        assert by_n[n].tokens_per_s == pytest.approx(
            n * DDP_EFFICIENCY * by_n[1].tokens_per_s, rel=0.1
        )
        assert by_n[n].train_s < by_n[1].train_s


def test_fsdp_per_gpu_memory_falls_with_the_gpu_count() -> None:
    shape = model_shape("meta-llama/Meta-Llama-3-70B-Instruct").shape
    kw = {"bits": 4, "double_quant": True, "trainable": 100_000_000}
    ddp = layout(shape, strategy="ddp", gpus=2, **kw)
    f2, f8 = (layout(shape, strategy="fsdp", gpus=n, **kw) for n in (2, 8))
    off = layout(shape, strategy="fsdp+offload", gpus=2, **kw)
    assert ddp.base_bytes > f2.base_bytes > f8.base_bytes > off.base_bytes
    assert f8.trainable == f2.trainable // 4
    assert off.trainable == 0 and off.host_ram_bytes >= f2.host_ram_bytes
    nf4 = 35 * 1024**3  # a 70B model's quantised weights, about
    assert f2.host_ram_bytes > 2 * nf4 and f8.host_ram_bytes > 8 * nf4  # N copies while loading
    assert ddp.host_ram_bytes < nf4  # DDP loads onto the GPUs
    assert ddp.fast_path and not f2.fast_path
    with pytest.raises(ValueError, match="unknown strategy"):
        layout(shape, strategy="zero3", gpus=2, **kw)
    assert STRATEGIES[0] == "ddp"


@pytest.mark.parametrize(("ga", "gpus", "per_rank"), [(8, 2, 4), (4, 4, 1), (3, 2, 2), (1, 8, 1)])
def test_grad_accum_is_split_over_the_ranks(ga: int, gpus: int, per_rank: int) -> None:
    assert rank_grad_accum(ga, gpus) == per_rank


def test_gpu_names_take_a_count() -> None:
    assert parse_gpu("2x RTX 3090")[1] == 2 and parse_gpu("2x RTX 3090")[0].name == "RTX 3090"
    assert parse_gpu("8 x h100")[0].name == "H100 SXM" and parse_gpu("h100")[1] is None
    with pytest.raises(EstimateError, match="at least 1"):
        parse_gpu("0x RTX 3090")
    with pytest.raises(EstimateError, match="unknown GPU"):
        parse_gpu("2x RTX 9999")
    est = estimate(JobSpec(**SEED), tokens=10**6, rows=1000, tokens_exact=True,
                   gpus=["2x RTX 3090"])  # fmt: skip
    assert {(r.gpu, r.gpu_count) for r in est.rows} == {("RTX 3090", 2)}


def test_preference_objectives_train_on_one_gpu_of_many() -> None:
    spec = JobSpec(model="llama-3-8b", dataset="d.jsonl", objective={"type": "dpo"})
    est = estimate(spec, tokens=10**6, rows=1000, tokens_exact=True, gpus=["2x RTX 4090"])
    (row,) = est.rows
    assert row.strategy == "1 GPU" and "uses 1 of 2" in row.note


def test_a_job_no_single_card_holds_is_pointed_at_several() -> None:
    with pytest.raises(EstimateError, match=r"gpu='2x RTX 3090' or more"):
        estimate(JobSpec(**SEED), tokens=10**6, rows=1000, tokens_exact=True,
                 gpus=["1x RTX 3090"])  # fmt: skip
