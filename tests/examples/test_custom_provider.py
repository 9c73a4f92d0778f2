"""The custom-provider example plugin (``examples/custom_provider``): it passes the provider
contract against a real sshd, runs a real job, and its entry point registers it once installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loraburst import ConfigError, Job
from loraburst.testing import ProviderContract

from tests.conftest import ROOT, SAMPLE_DATA

PLUGIN = ROOT / "examples" / "custom_provider"


@pytest.fixture(scope="module")
def workstation_cls() -> Iterator[Any]:
    sys.path.insert(0, str(PLUGIN))
    try:
        from loraburst_workstation import WorkstationProvider

        yield WorkstationProvider
    finally:
        sys.path.remove(str(PLUGIN))


class TestWorkstationContract(ProviderContract):
    @pytest.fixture
    def provider(self, workstation_cls: Any, sshd_host: Any) -> Any:
        return workstation_cls(sshd_host.target, sshd_host.key_path, connect_timeout_s=15)


def test_price_is_the_electricity_bill(workstation_cls: Any) -> None:
    p = workstation_cls("me@box:2222", watts=500, price_per_kwh=0.4, gpu="RTX 3090")
    (offer,) = p.offers()
    assert (offer.provider, offer.gpu, offer.price_source) == (
        "workstation",
        "RTX 3090",
        "electricity",
    )
    assert offer.price_per_hour == pytest.approx(0.2)


def test_host_comes_from_the_environment(
    workstation_cls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="LORABURST_WORKSTATION_HOST"):
        workstation_cls()
    monkeypatch.setenv("LORABURST_WORKSTATION_HOST", "me@box:2222")
    assert "me@box:2222" in repr(workstation_cls())


@pytest.mark.slow
def test_a_job_runs_on_the_workstation(
    workstation_cls: Any, sshd_host: Any, tiny_model: Path, tmp_path: Path
) -> None:
    provider = workstation_cls(sshd_host.target, sshd_host.key_path, connect_timeout_s=15)
    job = Job(
        str(tiny_model),
        SAMPLE_DATA,
        output_dir=tmp_path / "out",
        train={"max_steps": 2, "micro_batch_size": 4, "max_seq_len": 96},
    )
    result = job.run(provider=provider, progress=False)
    assert (result.status, result.provider) == ("succeeded", "workstation")
    assert (
        result.adapter_path is not None and (result.adapter_path / "adapter_config.json").is_file()
    )
    assert result.cost_usd > 0  # electricity is not free
    assert sshd_host.sshd.alive  # a box you own is released, never shut down


def test_installed_plugin_is_found_by_its_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    pip += ["--no-build-isolation", "--target", str(target), str(PLUGIN)]
    subprocess.run(pip, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    code = (
        "import json\n"
        "from loraburst.providers import available_providers, get_provider\n"
        "p = get_provider('workstation', host='me@box:2222', watts=1000, price_per_kwh=0.25)\n"
        "print(json.dumps([available_providers(), type(p).__name__, p.offers()[0].price_per_hour]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    names, cls, price = json.loads(out.stdout)
    assert "workstation" in names and {"runpod", "lambda", "ssh", "local"} <= set(names)
    assert (cls, price) == ("WorkstationProvider", 0.25)
