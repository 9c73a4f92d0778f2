"""Estimates for any hub model: its config.json fetched from the hub (a local stand-in), cached,
with the token, endpoint and offline mode users set, and clear errors for gated, missing and
unreachable repos. Run as users run it: the `loraburst estimate` command in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.hf_hub import FakeHub

CONFIG = {
    "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 5632,
    "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip
DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "chat.jsonl"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(token="hf_secret_abc").start()
    fake.add("acme/brand-new-1b", {"config.json": CONFIG})
    fake.add("acme/gated-1b", {"config.json": CONFIG}, gated=True)
    fake.add("acme/not-a-model", {"README.md": b"# hi"})
    try:
        yield fake
    finally:
        fake.stop()


def _estimate(tmp: Path, model: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    job = tmp / "job.yaml"
    job.write_text(f"model: {model}\ndataset: {DATA}\ntrain: {{max_steps: 10}}\n")
    full = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "loraburst._cli", "estimate", str(job), "--json",
         "--gpu", "RTX 4090"],
        capture_output=True, text=True, env=full, timeout=120,
    )  # fmt: skip


def test_a_hub_model_outside_the_registry_estimates_from_its_config(
    hub: FakeHub, tmp_path: Path
) -> None:
    out = _estimate(tmp_path, "acme/brand-new-1b", {"HF_ENDPOINT": hub.url})
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows and rows[0]["gpu"] == "RTX 4090" and rows[0]["fits"]
    assert ("GET", "acme/brand-new-1b/resolve/main/config.json", False) in hub.requests
    # Cached: offline mode answers from the cache, and nothing more is asked of the hub.
    asked = len(hub.requests)
    again = _estimate(
        tmp_path, "acme/brand-new-1b", {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == rows and len(hub.requests) == asked


def test_gated_repo_needs_the_token_and_says_so(hub: FakeHub, tmp_path: Path) -> None:
    refused = _estimate(tmp_path, "acme/gated-1b", {"HF_ENDPOINT": hub.url})
    assert refused.returncode != 0
    assert "gated" in refused.stderr and "HF_TOKEN" in refused.stderr
    ok = _estimate(tmp_path, "acme/gated-1b", {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_abc"})
    assert ok.returncode == 0, ok.stderr
    assert ("GET", "acme/gated-1b/resolve/main/config.json", True) in hub.requests
    assert "hf_secret_abc" not in ok.stdout + ok.stderr + refused.stdout + refused.stderr


@pytest.mark.parametrize(
    ("model", "env", "says"),
    [
        ("acme/nope", {}, "no model repo 'acme/nope'"),
        ("acme/not-a-model", {}, "has no config.json"),
        ("acme/brand-new-1b", {"HF_HUB_OFFLINE": "1"}, "offline mode"),
    ],
)
def test_missing_repo_file_or_cache_is_a_clear_error(
    hub: FakeHub, tmp_path: Path, model: str, env: dict[str, str], says: str
) -> None:
    out = _estimate(tmp_path, model, {"HF_ENDPOINT": hub.url, **env})
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_the_seed_models_estimate_out_of_the_box() -> None:
    from loraburst._cost.shapes import model_shape

    for model in ("mistralai/Mistral-7B-v0.1", "meta-llama/Meta-Llama-3-8B", "google/gemma-2-9b"):
        assert model_shape(model).source.startswith("registry:")
    assert model_shape("mistralai/Mistral-7B-v0.1").config["vocab_size"] == 32000
