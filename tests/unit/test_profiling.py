"""The step profiler's settings and summary (the traced run itself: tests/remote/test_agent.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from loraburst.remote.training import profiling


def test_unset_means_no_profiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(profiling.ENV_STEPS, raising=False)
    assert profiling.from_env(tmp_path) is None


def test_window_and_folder_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(profiling.ENV_STEPS, "10:12")
    monkeypatch.setenv(profiling.ENV_DIR, str(tmp_path / "prof"))
    prof = profiling.from_env(tmp_path)
    assert prof is not None and (prof.first, prof.last) == (10, 12)
    assert prof.folder == tmp_path / "prof"
    monkeypatch.setenv(profiling.ENV_STEPS, "7")  # one step
    monkeypatch.delenv(profiling.ENV_DIR)
    one = profiling.from_env(tmp_path)
    assert one is not None and (one.first, one.last, one.folder) == (7, 7, tmp_path)


@pytest.mark.parametrize("raw", ["ten", "3:x", "5:2", "0:1"])
def test_a_bad_window_is_refused_naming_the_variable(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(profiling.ENV_STEPS, raw)
    with pytest.raises(ValueError, match=profiling.ENV_STEPS):
        profiling.from_env(tmp_path)


def test_summary_splits_kernels_host_ops_and_stalls() -> None:
    def ev(key: str, count: int, cpu: float = 0.0, dev: float = 0.0) -> SimpleNamespace:
        kind = "DeviceType.CUDA" if dev else "DeviceType.CPU"
        return SimpleNamespace(key=key, count=count, self_cpu_time_total=cpu,
                               self_device_time_total=dev, device_type=kind)  # fmt: skip

    averages = [
        ev("sm90_xmma_gemm_bf16", 40, dev=300_000.0),
        ev("flash_fwd_kernel", 10, dev=100_000.0),
        ev("triton_poi_fused_mul_silu", 20, dev=50_000.0),
        ev("aten::mm", 40, cpu=20_000.0),
        ev("cudaMalloc", 6, cpu=9_000.0),
    ]
    out = profiling.summarise(averages, wall_s=1.0, steps=2)
    assert out["gpu_s_per_step"] == 0.225 and out["gpu_busy_share"] == 0.45
    assert out["ms_per_step_by_kind"] == {"attention": 50.0, "gemm": 150.0, "triton": 25.0}
    assert out["top_kernels"][0] == {"ms_per_step": 150.0, "calls_per_step": 20.0,
                                     "name": "sm90_xmma_gemm_bf16"}  # fmt: skip
    assert [r["name"] for r in out["top_host_ops"]] == ["aten::mm"]
    assert out["runtime_stalls"] == {"cudaMalloc": {"calls_per_step": 3.0, "ms_per_step": 4.5}}
