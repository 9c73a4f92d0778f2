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
