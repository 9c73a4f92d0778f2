"""The fast path's Triton elementwise kernels compute what the eager functions of ``layers`` do.

The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, hence one subprocess for all the cases: ``_triton_ops_cases.py``). fp32 must agree to
fp32 rounding; bf16 and fp16 to a few units in the last place of the largest value (2-4 at
most; RMSNorm's input gradient, a difference of two terms, is the one that needs them), since the
kernels round once where eager rounds after every op, and the interpreter truncates (not rounds)
on every bf16 conversion where CUDA rounds to nearest even.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
# Largest error allowed, relative to the largest magnitude of the eager result.
TOLERANCE = {"fp32": 1e-5, "fp16": 2.0**-8, "bf16": 2.0**-5}
MISMATCH_SHARE = 0.02


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.remote._triton_ops_cases"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _tolerance(key: str) -> float:
    # Bit-identical but for the rare tie that fp32 summation order breaks differently.
    return MISMATCH_SHARE if key.endswith("mismatch-share") else TOLERANCE[key.split("/")[1]]


def _check(errors: dict[str, float], op: str) -> None:
    cases = {k: v for k, v in errors.items() if k.startswith(op + "/")}
    assert len(cases) >= 10, sorted(errors)
    bad = {k: v for k, v in cases.items() if not v <= _tolerance(k)}
    assert not bad, bad


def test_available_in_the_interpreter_on_cpu_tensors(errors: dict[str, float]) -> None:
    assert errors["available"] == 0.0


def test_not_available_for_cpu_tensors_without_the_interpreter() -> None:
    import torch
    from loraburst.remote.fastpath import triton_ops

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    assert not triton_ops.available(torch.zeros(1))


def test_rms_norm_matches_eager(errors: dict[str, float]) -> None:
    _check(errors, "rms_norm")


def test_rope_matches_eager(errors: dict[str, float]) -> None:
    _check(errors, "rope")


def test_silu_mul_cat_and_its_backward_match_eager(errors: dict[str, float]) -> None:
    _check(errors, "silu_mul_cat")


def test_silu_mul_matches_eager(errors: dict[str, float]) -> None:
    _check(errors, "silu_mul")


def test_module_imports_neither_torch_nor_triton() -> None:
    code = (
        "import sys; import loraburst.remote.fastpath.triton_ops\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
