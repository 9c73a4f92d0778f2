"""A loraburst provider for a GPU workstation you own: SSH in, pay only for the electricity.

Composed from ``loraburst.providers.ssh.SSHProvider``, which does the SSH work; this class adds
a price (the GPU box's draw times your tariff), its own name, and configuration from the
environment so that ``provider="workstation"`` works without arguments::

    LORABURST_WORKSTATION_HOST=me@gpu-box:22
    LORABURST_WORKSTATION_KEY=~/.ssh/id_ed25519        # optional: else ssh-agent/default keys
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from loraburst import ConfigError
from loraburst.providers import (
    Capabilities,
    Host,
    LaunchRequest,
    Machine,
    Offer,
    SelfTermination,
)
from loraburst.providers.ssh import SSHProvider

__all__ = ["WorkstationProvider"]


class WorkstationProvider:
    """Your own GPU box over SSH, priced at its electricity cost.

    Args:
        host: ``user@host:port``; default ``$LORABURST_WORKSTATION_HOST``.
        key_path: private key to log in with; default ``$LORABURST_WORKSTATION_KEY``.
        gpu: the GPU's name as loraburst's estimator knows it (``"RTX 4090"``).
        vram_gb: its memory, so the estimator can tell what fits.
        watts: what the whole box draws under load.
        price_per_kwh: your tariff in dollars.
        python: the interpreter with loraburst's trainer dependencies on the box.

    Raises:
        ConfigError: no host given and ``LORABURST_WORKSTATION_HOST`` is not set.
    """

    name: ClassVar[str] = "workstation"
    # The same as any SSH box (a per-job key, missing packages installed, never terminated),
    # configured by its host variable: with it set, provider="auto" includes it.
    capabilities: Capabilities = dataclasses.replace(
        SSHProvider.capabilities, credentials=("LORABURST_WORKSTATION_HOST",)
    )
    unsupported: ClassVar[Mapping[str, str]] = {
        **SSHProvider.unsupported,
        "multi_gpu": "the workstation advertises its one GPU",
    }

    def __init__(
        self,
        host: str | None = None,
        key_path: str | Path | None = None,
        *,
        gpu: str = "RTX 4090",
        vram_gb: float = 24.0,
        watts: float = 600.0,
        price_per_kwh: float = 0.30,
        python: str = "python3",
        connect_timeout_s: float = 60.0,
    ) -> None:
        host = host or os.environ.get("LORABURST_WORKSTATION_HOST")
        if not host:
            raise ConfigError(
                "workstation provider: no host; pass host='user@host:port' or set "
                "LORABURST_WORKSTATION_HOST"
            )
        key_path = key_path or os.environ.get("LORABURST_WORKSTATION_KEY")
        self._ssh = SSHProvider(
            host,
            key_path,
            python,
            gpu=gpu,
            vram_gb=vram_gb,
            connect_timeout_s=connect_timeout_s,
        )
        self.price_per_hour = watts / 1000.0 * price_per_kwh

    def __repr__(self) -> str:
        return f"WorkstationProvider({self._ssh.machine_id!r}, ${self.price_per_hour:.3f}/h)"

    def _own(self, machine: Machine | None) -> Machine | None:
        if machine is None:
            return None
        return dataclasses.replace(machine, provider=self.name, price_per_hour=self.price_per_hour)

    def offers(self) -> list[Offer]:
        return [
            dataclasses.replace(
                o,
                provider=self.name,
                price_per_hour=self.price_per_hour,
                price_source="electricity",
            )
            for o in self._ssh.offers()
        ]

    def launch(self, request: LaunchRequest) -> Machine:
        machine = self._own(self._ssh.launch(request))
        assert machine is not None
        return machine

    def get(self, machine_id: str) -> Machine | None:
        return self._own(self._ssh.get(machine_id))

    def find(self, tag: str) -> Machine | None:
        return self._own(self._ssh.find(tag))

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return [m for m in map(self._own, self._ssh.list_tagged(prefix)) if m is not None]

    def terminate(self, machine_id: str) -> None:
        """Release the box (it keeps running: you own it)."""
        self._ssh.terminate(machine_id)

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        return self._ssh.connect(machine, key_path, workdir)

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """None: your own box is never terminated."""
        return None
