"""Which providers are configured is read from their declared capabilities, never their names:
a plugin registered through a real entry point is picked up exactly like a built-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from loraburst._cost.placement import configured_providers, declared
from loraburst._lifecycle.cleanup import cleanup
from loraburst.providers import Capabilities

PLUGIN = '''
from typing import ClassVar
from loraburst.providers import Capabilities


class MyCloud:
    """A cloud configured by MYCLOUD_TOKEN."""

    name: ClassVar[str] = "mycloud"
    capabilities = Capabilities(credentials=("MYCLOUD_TOKEN",), billed={billed})

    def list_tagged(self, prefix="lb-"):
        raise AssertionError("cleanup asked a provider that rents nothing for orphans")
'''


def _install(root: Path, monkeypatch: pytest.MonkeyPatch, *, billed: bool) -> None:
    """A distribution on sys.path with a ``loraburst.providers`` entry point, as pip leaves it."""
    (root / "mycloud_plugin.py").write_text(PLUGIN.format(billed=billed))
    info = root / "mycloud_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mycloud-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[loraburst.providers]\nmycloud = mycloud_plugin:MyCloud\n"
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "mycloud_plugin", raising=False)  # another test's version


def test_only_local_is_configured_without_credentials() -> None:
    assert configured_providers() == ["local"]


def test_a_builtin_is_configured_by_its_declared_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_test")
    assert configured_providers() == ["runpod", "local"]
    monkeypatch.setenv("LORABURST_LAMBDA_API_KEY", "secret_test")
    assert configured_providers() == ["lambda", "runpod", "local"]


def test_a_plugin_is_configured_by_its_declared_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path, monkeypatch, billed=True)
    caps = declared("mycloud")
    assert isinstance(caps, Capabilities) and caps.credentials == ("MYCLOUD_TOKEN",)
    assert configured_providers() == ["local"]
    monkeypatch.setenv("MYCLOUD_TOKEN", "t")
    assert configured_providers() == ["mycloud", "local"]  # this machine stays the last resort


def test_cleanup_skips_providers_that_rent_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path, monkeypatch, billed=False)
    monkeypatch.setenv("MYCLOUD_TOKEN", "t")
    assert "mycloud" in configured_providers()
    report = cleanup()  # its list_tagged would fail the test if it were asked
    assert report.failed == [] and report.terminated == []


BOX = '''
from typing import ClassVar
from loraburst.providers import Capabilities


class {cls}:
    """A provider whose declaration says {same}: same machine."""

    name: ClassVar[str] = "{name}"
    capabilities = Capabilities(needs_credentials=False, billed=False, same_machine={same})
'''


def test_the_estimate_reads_same_machine_from_the_declaration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local model folder is not downloaded to a provider that declares its instances are
    this machine, whatever its name; to any other it is."""
    import json

    from loraburst import JobSpec
    from loraburst._cost.estimate import _same_machine, estimate
    from loraburst.providers import Offer

    lines = []
    for name, same in (("mybox", True), ("farbox", False)):
        module = f"{name}_plugin"
        (tmp_path / f"{module}.py").write_text(BOX.format(cls=name.title(), name=name, same=same))
        lines.append(f"{name} = {module}:{name.title()}")
        monkeypatch.delitem(sys.modules, module, raising=False)
    info = tmp_path / "boxes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: boxes\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[loraburst.providers]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _same_machine.cache_clear()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
    }))  # fmt: skip
    spec = JobSpec(model=str(model), dataset="data.jsonl")
    offers = [Offer(n, "A100 80GB", 1, 80.0, 1.0, "a100") for n in ("mybox", "farbox")]
    try:
        est = estimate(spec, tokens=10**6, rows=10**3, tokens_exact=True, offers=offers)
    finally:
        _same_machine.cache_clear()
    setup = {r.provider: r.setup_s for r in est.rows}
    assert setup["mybox"] < setup["farbox"]  # no boot, no image, no download of 16 GB
