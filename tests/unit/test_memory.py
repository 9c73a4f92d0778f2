"""The FLOPs / VRAM model in loraburst.remote.memory (standard library only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loraburst._cost.shapes import model_shape
from loraburst.remote import memory
from loraburst.remote.memory import (
    DEFAULT_COEFFS,
    Coefficients,
    choose_settings,
    flops_per_token,
    lora_params,
    param_counts,
    peak_vram,
    shape_from_config,
    solve_least_squares,
    step_time,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("model", "billions"),
    [
        ("meta-llama/Meta-Llama-3-8B", 8.03),
        ("mistral-7b", 7.25),
        ("llama-3.2-1b", 1.24),
        ("llama-3.2-3b", 3.21),
        ("llama-3.1-70b", 70.55),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("qwen2.5-0.5b", 0.494),
        ("google/gemma-2-9b-it", 9.24),
        ("phi-3-mini", 3.82),
    ],
)
def test_registry_matches_published_parameter_counts(model: str, billions: float) -> None:
    total = param_counts(model_shape(model).shape)["total"]
    assert total / 1e9 == pytest.approx(billions, rel=0.005)


def test_lora_params_of_llama3_8b_r16_all_linear() -> None:
    # 41.9M is what peft prints for r=16 on all seven projections of Llama-3-8B.
    assert lora_params(model_shape("llama-3-8b").shape, 16) == 41_943_040
    only_q = lora_params(model_shape("llama-3-8b").shape, 16, ["q_proj"])
    assert only_q == 32 * 16 * (4096 + 4096)


def test_flops_follow_the_4n_convention() -> None:
    shape = model_shape("llama-3-8b").shape
    counts = param_counts(shape)
    f = flops_per_token(shape, 2048, lora_params(shape, 16), gradient_checkpointing=False)
    n = counts["linear"] + counts["lm_head"]
    assert f["forward"] + f["backward"] == 4 * n
    assert f["total"] / 1e9 == pytest.approx(31.9, rel=0.01)  # the figure issue 7 quotes
    ck = flops_per_token(shape, 2048, lora_params(shape, 16), gradient_checkpointing=True)
    assert ck["total"] > f["total"] and ck["recompute"] > 2 * counts["linear"]


def _peak(seq: int, mb: int, ckpt: bool) -> float:
    shape = model_shape("llama-3-8b").shape
    return peak_vram(
        shape, seq_len=seq, micro_batch_size=mb, lora_r=16, gradient_checkpointing=ckpt
    )["total"]


@pytest.mark.parametrize("ckpt", [False, True])
def test_vram_grows_with_sequence_and_micro_batch(ckpt: bool) -> None:
    seqs = [_peak(s, 2, ckpt) for s in (256, 512, 1024, 2048, 4096)]
    batches = [_peak(1024, b, ckpt) for b in (1, 2, 4, 8)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert batches == sorted(batches) and len(set(batches)) == len(batches)


def test_checkpointing_needs_less_memory_and_more_time() -> None:
    shape = model_shape("llama-3-8b").shape
    for seq, mb in ((1024, 2), (2048, 4), (4096, 1)):
        assert _peak(seq, mb, True) < _peak(seq, mb, False)
        kw = {"seq_len": seq, "micro_batch_size": mb, "lora_r": 16}
        on = step_time(shape, **kw, gradient_checkpointing=True)["tokens_per_s"]
        off = step_time(shape, **kw, gradient_checkpointing=False)["tokens_per_s"]
        assert on < off


def test_nf4_weights_with_double_quant_are_about_half_a_byte_per_param() -> None:
    shape = model_shape("llama-3-8b").shape
    kw = {"seq_len": 512, "micro_batch_size": 1, "lora_r": 16, "gradient_checkpointing": True}
    dq = peak_vram(shape, **kw)["weights"]
    plain = peak_vram(shape, **kw, double_quant=False)["weights"]
    linear_gib = param_counts(shape)["linear"] / memory.GIB
    assert dq == pytest.approx(linear_gib * 0.516, rel=0.01)
    assert plain > dq
    assert peak_vram(shape, **kw, bits=16)["weights"] == pytest.approx(linear_gib * 2)


def test_choose_settings_prefers_no_recompute_when_it_fits() -> None:
    cfg = model_shape("llama-3-8b").config
    off = _peak(2048, 2, False)
    pick = choose_settings(cfg, vram_gb=off / 0.97 + 0.1, seq_len=2048, lora_r=16,
                           micro_batch_size=2)  # fmt: skip
    assert pick["gradient_checkpointing"] is False and pick["fits"]
    assert pick["peak_vram_gb"] == pytest.approx(off, abs=0.01)


def test_choose_settings_turns_checkpointing_on_when_activations_do_not_fit() -> None:
    cfg = model_shape("llama-3-8b").config
    on, off = _peak(2048, 2, True), _peak(2048, 2, False)
    vram = (on + off) / 2 / 0.97
    pick = choose_settings(cfg, vram_gb=vram, seq_len=2048, lora_r=16, micro_batch_size=2)
    assert pick["gradient_checkpointing"] is True and pick["fits"]


def test_choose_settings_auto_batch_fits_and_reports_misfit() -> None:
    cfg = model_shape("llama-3-8b").config
    pick = choose_settings(cfg, vram_gb=24, seq_len=2048, lora_r=16)
    assert pick["fits"] and pick["peak_vram_gb"] <= 24 * 0.97
    capped = choose_settings(cfg, vram_gb=141, seq_len=2048, lora_r=16, tokens_per_step=4096)
    assert capped["micro_batch_size"] <= 2
    tiny = choose_settings(cfg, vram_gb=4, seq_len=2048, lora_r=16)
    assert tiny["fits"] is False and tiny["micro_batch_size"] == 1


def test_shape_from_config_reads_text_config_and_names_missing_keys() -> None:
    cfg = dict(model_shape("llama-3.2-1b").config)
    assert shape_from_config({"text_config": cfg}) == shape_from_config(cfg)
    del cfg["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        shape_from_config(cfg)


def test_softcaps_are_read_from_the_config_as_the_trainer_reads_them() -> None:
    """The plans charge eager attention's kept scores and the soft-capped loss's extra fp32 copy
    where the config soft-caps (the keys the trainer's attention and loss read), not by model
    type: a Gemma 2 fine-tune can switch either off, another family switch them on."""
    gemma = dict(model_shape("google/gemma-2-9b").config)
    # the published config's values
    assert (gemma["attn_logit_softcapping"], gemma["final_logit_softcapping"]) == (50.0, 30.0)
    shape = shape_from_config(gemma)
    assert shape.eager_attention and shape.logit_softcap
    off = shape_from_config({**gemma, "attn_logit_softcapping": None,
                             "final_logit_softcapping": None})  # fmt: skip
    assert not off.eager_attention and not off.logit_softcap
    llama = dict(model_shape("llama-3-8b").config)
    assert not shape_from_config(llama).eager_attention
    assert not shape_from_config(llama).logit_softcap
    on = shape_from_config({**llama, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0})  # fmt: skip
    assert on.eager_attention and on.logit_softcap
    # what the client plans with follows: the kept scores cost memory
    kw: dict[str, Any] = {"seq_len": 2048, "micro_batch_size": 2, "lora_r": 16,
                          "gradient_checkpointing": False}  # fmt: skip
    assert peak_vram(on, **kw)["total"] > peak_vram(shape_from_config(llama), **kw)["total"]


def test_least_squares_recovers_known_coefficients() -> None:
    rows = [[1.0, x, x * x] for x in range(8)]
    targets = [2.0 - 3.0 * x + 0.5 * x * x for x in range(8)]
    assert solve_least_squares(rows, targets) == pytest.approx([2.0, -3.0, 0.5])


def test_defaults_match_the_calibration_file() -> None:
    calib = json.loads((ROOT / "sdk" / "data" / "calibration.json").read_text())
    assert Coefficients.from_dict(calib["coefficients"]) == DEFAULT_COEFFS


def test_memory_module_needs_only_the_standard_library() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(ROOT / 'remote' / 'memory.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(m.choose_settings({'hidden_size': 64, 'num_hidden_layers': 2,"
        " 'num_attention_heads': 4, 'intermediate_size': 128, 'vocab_size': 256},"
        " vram_gb=8, seq_len=128, lora_r=8)['fits'])\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
