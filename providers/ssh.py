"""Bring-your-own host: a machine you already have, reached as ``user@host:port`` with a key.

Nothing is rented: ``launch`` returns the fixed machine and ``terminate`` leaves the host alone.
The transport (bundle upload, detached agent, host-key pinning) is the same as the clouds'.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from loraburst._exceptions import ConfigError

from ._base import (
    Capabilities,
    Host,
    LaunchRequest,
    Machine,
    MachineStatus,
    Offer,
    SelfTermination,
    SSHEndpoint,
)
from ._ssh import SSHHost

__all__ = ["SSHProvider", "parse_target"]


def parse_target(target: str) -> SSHEndpoint:
    """Parse ``[user@]host[:port]`` (default user ``root``, port 22).

    Raises:
        ConfigError: the port is not a number or the host is empty.
    """
    user, _, rest = target.rpartition("@")
    host, sep, port_text = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not sep:
        host = rest
    try:
        port = int(port_text) if port_text else 22
    except ValueError:
        raise ConfigError(
            f"ssh provider: bad port {port_text!r} in {target!r}; use user@host:port"
        ) from None
    if not host:
        raise ConfigError(f"ssh provider: no host in {target!r}; use user@host:port")
    return SSHEndpoint(host=host, port=port, user=user or "root")


class SSHProvider:
    """A machine you own, over SSH.

    Args:
        host: ``user@host:port`` of the machine.
        key_path: private key to log in with (None: ssh-agent / default keys).
        python: interpreter on the host when it does not set ``LORABURST_REMOTE_PYTHON``.
        gpu: the GPU name to advertise in the single $0 offer (None: no offer).
        vram_gb: that GPU's memory.
        connect_timeout_s: how long ``connect`` waits for sshd.
    """

    name: ClassVar[str] = "ssh"
    # Your own box over SSH: a per-job key, missing packages installed; given explicitly
    # (never "auto"), not rented (no orphans for cleanup), never terminated.
    capabilities: Capabilities = Capabilities(self_terminates=False, billed=False)
    unsupported: ClassVar[Mapping[str, str]] = {
        "spot": "a host you bring is not rented, so it cannot be preempted or bid on",
        "self_terminate": "loraburst never shuts down a host it does not rent",
        "stop": "loraburst does not manage the host's power state",
    }

    def __init__(
        self,
        host: str = "root@localhost:22",
        key_path: str | Path | None = None,
        python: str = "python3",
        *,
        gpu: str | None = "unknown",
        vram_gb: float = 0.0,
        connect_timeout_s: float = 60.0,
    ) -> None:
        self.endpoint = parse_target(host)
        self.key_path = Path(key_path).expanduser() if key_path else None
        self.python = python
        self.gpu = gpu
        self.vram_gb = vram_gb
        self.connect_timeout_s = connect_timeout_s
        self.machine_id = f"{self.endpoint.user}@{self.endpoint.host}:{self.endpoint.port}"
        self._tags: dict[str, Machine] = {}

    def __repr__(self) -> str:
        return f"SSHProvider({self.machine_id!r})"

    def offers(self) -> list[Offer]:
        if self.gpu is None:
            return []
        return [
            Offer(
                provider=self.name,
                gpu=self.gpu,
                gpu_count=1,
                vram_gb=self.vram_gb,
                price_per_hour=0.0,
                instance_type=self.machine_id,
                price_source="own host",
            )
        ]

    def _machine(self, tag: str, status: MachineStatus = "running") -> Machine:
        return Machine(
            provider=self.name,
            id=self.machine_id,
            tag=tag,
            status=status,
            ssh=self.endpoint,
            python=self.python,
            workdir_root="~/loraburst",
        )

    def launch(self, request: LaunchRequest) -> Machine:
        """Return the fixed machine; the per-job key is not installed (use ``key_path``)."""
        m = self._machine(request.tag)
        self._tags[request.tag] = m
        return m

    def get(self, machine_id: str) -> Machine | None:
        """The host, ``running`` while a job holds it and ``terminated`` once released."""
        if machine_id != self.machine_id:
            return None
        if not self._tags:
            return self._machine("", "terminated")
        return self._machine(next(iter(self._tags)))

    def find(self, tag: str) -> Machine | None:
        return self._tags.get(tag)

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return [m for t, m in self._tags.items() if t.startswith(prefix)]

    def terminate(self, machine_id: str) -> None:
        """Forget the job's tags; the host itself is left running (it is not rented)."""
        self._tags.clear()

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """None: your own machine is never terminated."""
        return None

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        # The per-job key is never installed on a host we do not rent: log in with ours.
        host = SSHHost(
            machine,
            self.key_path,
            workdir,
            python=self.python,
            connect_timeout_s=self.connect_timeout_s,
        )
        return host.connect()
