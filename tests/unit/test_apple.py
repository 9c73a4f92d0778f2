"""Apple Silicon without a Mac: the catalog, the estimate (the seed's M4 Max row inside its
range), the chip detection, what train.backend resolves to, and the MLX recipe's memory plan."""

from __future__ import annotations

import pytest
from loraburst import ConfigError, Job, JobSpec
from loraburst._cost.estimate import estimate
from loraburst._cost.gpus import CATALOG, apple_gpu_memory_gib, resolve_gpu
from loraburst._cost.shapes import model_shape
from loraburst.providers.local import detect_apple_gpu
from loraburst.remote.backends import mlx_refusals, requirements, resolve_backend
from loraburst.remote.mlx_trainer import plan_for_memory
from loraburst.remote.protocol import ENV_BACKEND

from tests.conftest import SAMPLE_DATA


@pytest.mark.parametrize("name", ["M4 Max", "Apple M4 Max", "m4-max", "M4 Max 40-core GPU"])
def test_apple_chips_resolve_in_any_spelling(name: str) -> None:
    gpu = resolve_gpu(name)
    assert gpu.name == "M4 Max" and gpu.apple and gpu.unified_memory_gb == 48
    assert gpu.vram_gb == 36.0 and gpu.bandwidth_gbs == 546


def test_every_m_series_pro_max_ultra_is_in_the_catalog() -> None:
    for gen in ("M1", "M2", "M3", "M4"):
        for tier in ("Pro", "Max"):
            assert CATALOG[f"{gen} {tier}"].apple
    for gen in ("M1", "M2", "M3"):
        assert CATALOG[f"{gen} Ultra"].apple
    assert not any(g.apple for g in CATALOG.values() if g.name.startswith(("RTX", "H", "A")))


def test_gpu_share_of_unified_memory() -> None:
    assert apple_gpu_memory_gib(16) == 10.7 and apple_gpu_memory_gib(128) == 96.0


def _seed_spec(seq: int, backend: str = "auto") -> JobSpec:
    # The seed's M4 Max row: "Mistral-7B with MLX, 22 minutes". It gives no other settings; we
    # take those of the seed's other Mistral-7B rows (QLoRA r16, batch 4, 500 steps).
    return JobSpec(
        model="mistral-7b-v0.3",
        dataset="d.jsonl",
        method="qlora",
        lora={"r": 16, "alpha": 32},
        train={"max_steps": 500, "micro_batch_size": 4, "max_seq_len": seq, "backend": backend},
    )


def test_the_seed_m4_max_row_falls_inside_the_estimates_range() -> None:
    # Rows of 349 tokens: the length at which the estimator matches the seed's RTX 5080
    # Mistral-7B row (benchmarks/estimator_accuracy.py); the M4 Max row gives none.
    est = estimate(_seed_spec(349), tokens=349_000, rows=1000, tokens_exact=True, gpus=["M4 Max"])
    (row,) = est.rows
    assert row.gpu == "M4 Max" and row.fits
    assert row.total_low_s <= 22 * 60 <= row.total_high_s, (row.total_low_s, row.total_high_s)
    assert row.total_low_s < row.total_s < row.total_high_s
    assert "MLX" in row.note
    assert row.setup_s < 30  # a Mac trains on itself: only the weights to load, no boot


def test_estimate_follows_the_backend() -> None:
    spec = _seed_spec(512, backend="mlx")
    rows = estimate(spec, tokens=512_000, rows=1000, tokens_exact=True).rows
    assert rows and all(CATALOG[r.gpu].apple for r in rows)
    torch_rows = estimate(
        _seed_spec(512, backend="torch"),
        tokens=512_000,
        rows=1000,
        tokens_exact=True,
        gpus=["M4 Max", "RTX 4090"],
    ).rows
    assert {r.gpu for r in torch_rows} == {"RTX 4090"}


def test_a_mac_is_detected_from_sysctl() -> None:
    assert detect_apple_gpu("Apple M4 Max", 128 * 1024**3) == [("M4 Max", 96.0)]
    assert detect_apple_gpu("Apple M2 Pro", 16 * 1024**3) == [("M2 Pro", 10.7)]
    assert detect_apple_gpu("Intel(R) Core(TM) i9", 32 * 1024**3) == []


def test_auto_resolves_to_mlx_only_on_apple_silicon(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", apple_silicon=True) == "mlx"
    assert resolve_backend("auto", apple_silicon=False) == "torch"
    assert resolve_backend("torch", apple_silicon=True) == "torch"
    assert resolve_backend(None, apple_silicon=True) == "mlx"  # a spec from before the key
    monkeypatch.setenv(ENV_BACKEND, "mlx")  # the client already resolved it for this machine
    assert resolve_backend("auto") == "mlx" and resolve_backend("torch") == "torch"
    with pytest.raises(ValueError, match="metal"):
        resolve_backend("metal")
    assert "mlx-lm>=0.28" in requirements("mlx") and "bitsandbytes>=0.46" in requirements("torch")


def test_defaults_train_on_mlx_unchanged() -> None:
    """A job written for the torch recipe with default settings is not refused on a Mac."""
    assert mlx_refusals(JobSpec(model="m", dataset="d").model_dump(mode="json")) == []
    assert (
        mlx_refusals(JobSpec(model="m", dataset="d", method="lora").model_dump(mode="json")) == []
    )


@pytest.mark.parametrize(
    ("changes", "field", "alternative"),
    [
        ({"method": "dora"}, "method: dora", "method: qlora or lora"),
        ({"quant": {"bits": 8}}, "quant.bits: 8", "quant.bits: 4"),
        ({"quant": {"quant_type": "fp4"}}, "quant.quant_type: fp4", "quant_type: nf4"),
        (
            {"train": {"gradient_checkpointing": "offload"}},
            'gradient_checkpointing: "offload"',
            "use true",
        ),
        ({"train": {"packing": True}}, "train.packing: true", 'packing: "auto" or false'),
        ({"train": {"optim": "adamw_bnb_8bit"}}, "train.optim", "optim: adamw_torch"),
    ],
)
def test_each_mlx_gap_is_refused_naming_the_alternative(
    changes: dict[str, object], field: str, alternative: str
) -> None:
    train = {"backend": "mlx", **changes.pop("train", {})}  # type: ignore[dict-item]
    with pytest.raises(ConfigError) as err:
        Job("m", SAMPLE_DATA, train=train, **changes)  # type: ignore[arg-type]
    text = str(err.value)
    assert field in text and alternative in text and "train.backend: torch" in text
    assert "(top level)" not in text


def test_bits_8_with_plain_lora_is_not_a_gap() -> None:
    """method: lora never quantises, so quant.bits does not matter to it."""
    Job("m", SAMPLE_DATA, method="lora", train={"backend": "mlx"}, quant={"bits": 8})


def test_the_mlx_memory_plan_fits_a_mac() -> None:
    config = model_shape("mistral-7b-v0.3").config
    spec = _seed_spec(2048).model_dump(mode="json")
    spec["train"]["micro_batch_size"] = "auto"
    roomy = plan_for_memory(spec, config, [600] * 100, budget_gib=96.0)
    tight = plan_for_memory(spec, config, [600] * 100, budget_gib=10.7)
    for plan, budget in ((roomy, 96.0), (tight, 10.7)):
        assert plan["fits"] and plan["planned_peak_gib"] <= budget
    assert (
        tight["gradient_checkpointing"] and tight["micro_batch_size"] <= roomy["micro_batch_size"]
    )
    spec["train"]["gradient_checkpointing"] = False
    spec["train"]["micro_batch_size"] = 4
    fixed = plan_for_memory(spec, config, [600] * 100, budget_gib=10.7)
    assert (fixed["micro_batch_size"], fixed["gradient_checkpointing"]) == (4, False)
    assert fixed["fits"] is False  # the user's setting stands, and the plan says it may not fit
