"""A job with exports on the RunPod emulator, over real SSH: merged weights and GGUF files are
made and checked on the instance before teardown, pulled back verified, pushed to the hub
emulator with a model card; then ``loraburst export JOB_ID`` makes one more, locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loraburst import Job
from loraburst._cli import main as cli
from loraburst._state.home import home
from loraburst.remote.protocol import verify_manifest

from tests.conftest import SAMPLE_DATA
from tests.e2e.test_cloud import _grep_tree

pytestmark = pytest.mark.slow


def _rows() -> list[dict[str, Any]]:
    lines = SAMPLE_DATA.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:12]


def test_runpod_job_ships_every_export_verified(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    hub_fake: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_fake.token)
    job = Job(
        str(tiny_model),
        _rows(),
        name="ship",
        output_dir=tmp_path / "out",
        # Enough steps on 12 rows for the model to learn its answers and where they end.
        train={
            "max_steps": 60,
            "micro_batch_size": 4,
            "learning_rate": 1e-2,
            "max_seq_len": 96,
            "save_every_steps": None,
            "warmup_ratio": 0.0,
        },  # fmt: skip
        exports=["adapter", "merged", "gguf:q8_0", "gguf:f16"],
        hub={"repo": "tester/ship", "endpoint": hub_fake.url},
    )
    # Xet storage is not emulated: the hub fake takes LFS uploads, as the real hub still does.
    result = job.run(provider=runpod_provider, progress=False, env={"HF_HUB_DISABLE_XET": "1"})

    assert result.status == "succeeded" and runpod_fake.running() == []
    assert [e.name for e in result.exports] == ["adapter", "merged", "gguf:q8_0", "gguf:f16"]
    assert result.exports_ok, [e.describe() for e in result.exports]
    merged = result.export("merged")
    assert {c["name"] for c in merged.checks} >= {"logits_match", "generates_and_stops"}
    assert (
        merged.details["into"] == "original" and "original weights" in merged.details["statement"]
    )
    for name in ("gguf:q8_0", "gguf:f16"):
        checks = {c["name"]: c for c in result.export(name).checks}
        assert set(checks) == {"reads_back", "weights_match", "generates_and_stops"}
        assert all(c["ok"] for c in checks.values())
    # Every file came back and matches the manifest the instance wrote before teardown.
    job_dir = result.adapter_path.parent  # type: ignore[union-attr]
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert verify_manifest(job_dir, manifest) == []
    pulled = set(manifest["files"])
    assert {"exports/merged/model.safetensors", "exports/merged/tokenizer.json",
            "exports/ship.q8_0.gguf", "exports/ship.f16.gguf"} <= pulled  # fmt: skip
    assert merged.path is not None and (merged.path / "generation_config.json").is_file()
    from gguf import GGUFReader

    reader = GGUFReader(result.export("gguf:q8_0").path)  # type: ignore[arg-type]
    assert reader.get_field("general.architecture").contents() == "llama"
    assert "<|im_start|>" in reader.get_field("tokenizer.chat_template").contents()

    # The hub holds the verified files and a card that says what this model is.
    assert result.hub is not None and result.hub["ok"], result.hub
    repo = hub_fake.repos["tester/ship"]
    assert repo.private
    assert {"model.safetensors", "ship.q8_0.gguf", "adapter/adapter_config.json"} <= set(repo.files)
    card = repo.files["README.md"].decode()
    assert "**Steps:** 60" in card and "**Final loss:**" in card and "qlora" in card
    assert repo.lfs["ship.q8_0.gguf"] == manifest["files"]["exports/ship.q8_0.gguf"]["sha256"]

    # Later, locally: one more export of the same job, from its id.
    capsys.readouterr()
    assert cli(["export", result.job_id, "--to", "gguf:bf16"]) == 0
    printed = capsys.readouterr().out
    assert "gguf:bf16: ok" in printed
    assert (job_dir / "exports" / "ship.bf16.gguf").is_file()

    # The token never reached the ledger, bundles, run folders, outputs or the pod's files.
    token = hub_fake.token
    hits = _grep_tree(home(), [token]) + _grep_tree(tmp_path / "out", [token])
    hits += _grep_tree(runpod_fake.folder, [token])
    assert hits == []
