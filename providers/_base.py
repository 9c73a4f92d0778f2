"""The provider Protocol and the frozen dataclasses its verbs take and return.

A provider has few verbs: ``offers``, ``launch``, ``get``, ``find`` (by tag), ``terminate``,
``connect`` (what the runner needs to reach the machine) and ``self_termination`` (how the
agent on an instance can end that instance by itself). What its instances are and can do is
declared once in ``capabilities``, and features it cannot do in ``unsupported`` with a reason:
the core reads these declarations, never a provider's name, so a third-party plugin gets the
same behaviour as a built-in one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

__all__ = [
    "Capabilities",
    "Feature",
    "SelfTermination",
    "upload_tree",
    "Host",
    "LaunchRequest",
    "Machine",
    "MachineStatus",
    "Offer",
    "Provider",
    "SSHEndpoint",
]

# A feature a provider may lack, the key of ``Provider.unsupported`` (with the reason why).
Feature = Literal["spot", "multi_gpu", "self_terminate", "stop", "ssh", "gpu"]
# An instance's state as the runner sees it, whatever the provider's own words for it.
MachineStatus = Literal["pending", "running", "stopping", "terminated", "preempted", "unknown"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a provider's instances are and what the runner may do with them.

    Attributes:
        ssh: instances are reached over SSH with a key made for each job (``LaunchRequest``
            carries its public half); else ``connect`` needs no key.
        same_machine: instances run on this very machine: the run's work folder is the
            client's own run folder (nothing to pull as training goes), the agent needs no
            heartbeat from the client, and there is no provider status to poll.
        installs_packages: the bootstrap may ``pip install`` the trainer's missing packages on
            the instance (never on the user's own machine).
        self_terminates: :meth:`Provider.self_termination` can give the agent a way to end its
            own instance when the client is gone for good.
        gpu_counts: GPUs an instance can have (offers with other counts are refused).
        backend: the training backend its machines run for ``train.backend: auto``
            (``"torch"``, ``"mlx"``); None: the instance decides (MLX on a Mac).
        credentials: environment variables that hold its credentials (an API key, a host),
            any one enough: with one set, it is configured and joins ``provider="auto"``.
        needs_credentials: False for a provider that works with none (this machine): it is
            always configured. True with no ``credentials``: it must be passed explicitly.
        billed: its instances are rented machines that cost money while they exist, so
            ``loraburst cleanup`` looks for its orphans (your own host has none to end).

    Declare it on the class (a subclass may refine it per object): the core reads it from the
    registered class to know which providers are configured, before building any.
    """

    ssh: bool = True
    same_machine: bool = False
    installs_packages: bool = True
    self_terminates: bool = False
    gpu_counts: tuple[int, ...] = (1,)
    backend: str | None = None
    credentials: tuple[str, ...] = ()
    needs_credentials: bool = True
    billed: bool = True


@dataclasses.dataclass(frozen=True)
class SelfTermination:
    """One HTTP request with which the agent's watchdog terminates its own instance.

    The agent sends it with the standard library only, so this is all it may need: a URL, a
    JSON body and a bearer token, given either as a value (``token``, handed to the agent in
    its environment, never on a command line) or as the name of an environment variable the
    instance already has (``token_env``; RunPod pods carry a pod-scoped key). ``graphql``: a
    200 answer with ``errors`` is a failure.
    """

    url: str
    body: str
    token: str = dataclasses.field(default="", repr=False)
    token_env: str = ""
    graphql: bool = False

    def to_env(self) -> dict[str, str]:
        """The agent's environment for this request (:mod:`loraburst.remote.watchdog`)."""
        env = {
            "LORABURST_TERMINATE_URL": self.url,
            "LORABURST_TERMINATE_BODY": self.body,
            "LORABURST_TERMINATE_GRAPHQL": "1" if self.graphql else "0",
        }
        if self.token:
            env["LORABURST_TERMINATE_TOKEN"] = self.token
        if self.token_env:
            env["LORABURST_TERMINATE_TOKEN_ENV"] = self.token_env
        return env


@dataclasses.dataclass(frozen=True)
class Offer:
    """One rentable configuration and its price.

    Attributes:
        gpu: canonical GPU name from the estimator's catalog (``"RTX 4090"``, ``"H100 SXM"``).
        instance_type: the provider's own id (RunPod ``gpuTypeId``, Lambda instance type).
        price_per_hour: dollars per hour for the whole offer (all its GPUs).
        price_source: ``"api"`` when read live, else a label such as ``"snapshot 2026-08"``.
        billing_increment_s: the provider bills whole increments of this many seconds.
    """

    provider: str
    gpu: str
    gpu_count: int
    vram_gb: float
    price_per_hour: float
    instance_type: str
    region: str | None = None
    available: bool = True
    billing_increment_s: int = 1
    price_source: str = "api"


@dataclasses.dataclass(frozen=True)
class SSHEndpoint:
    host: str
    port: int
    user: str


@dataclasses.dataclass(frozen=True)
class LaunchRequest:
    """What ``Provider.launch`` needs. ``tag`` is unique per attempt and is carried in the
    instance's name so that a create whose response was lost can be found again."""

    tag: str
    offer: Offer
    public_key: str
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image: str | None = None
    disk_gb: int = 50


@dataclasses.dataclass(frozen=True)
class Machine:
    """A provider instance as last seen."""

    provider: str
    id: str
    tag: str
    status: MachineStatus
    price_per_hour: float = 0.0
    ssh: SSHEndpoint | None = None
    python: str = "python3"
    workdir_root: str = "/root/loraburst"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def ready(self, capabilities: Capabilities) -> bool:
        """Running, and reachable the way its provider reaches instances."""
        return self.status == "running" and (self.ssh is not None or not capabilities.ssh)


@runtime_checkable
class Host(Protocol):
    """A connection to a machine, as the runner uses it. Paths are relative to the run's
    work directory on that machine."""

    workdir: str
    # The agent runs with this machine's and this client's own interpreter: its packages can
    # be checked in-process (package metadata), no process started.
    same_environment: bool

    def upload_bundle(self, local_path: Path, sha256: str) -> bool:
        """Put the bundle in place and extract it; return False when it was already there."""
        ...

    def provide_model(self, local_dir: Path, digest: Callable[[], str]) -> str:
        """Make a local model folder available to the agent; return its path on the machine.

        A host that shares this machine's files returns ``local_dir`` itself (no copy); a
        remote one uploads the folder once under its content hash (``digest()``, computed only
        when needed) and finds it there again for later jobs.
        """
        ...

    def start_agent(self, env: Mapping[str, str]) -> None:
        """Start the agent detached so it outlives this connection."""
        ...

    def read_text(self, rel: str) -> str | None:
        """Read a small file of the work directory; None when it does not exist."""
        ...

    def write_text(self, rel: str, text: str) -> None: ...

    def fetch_tree(self, rel: str, dest: Path) -> None:
        """Copy a file or folder of the work directory to ``dest`` (replacing it)."""
        ...

    def agent_alive(self) -> bool: ...

    def run(self, command: str, timeout: float = 600.0) -> tuple[int, str, str]:
        """Run a shell command in the work directory; return (exit code, stdout, stderr)."""
        ...

    @property
    def python(self) -> str:
        """The interpreter the agent runs under on that machine."""
        ...

    def close(self) -> None: ...


class Provider(Protocol):
    """What every provider plugin implements (see ``loraburst.testing.ProviderContract``)."""

    name: ClassVar[str]
    capabilities: Capabilities
    unsupported: ClassVar[Mapping[str, str]]

    def offers(self) -> list[Offer]:
        """Every offer this account can rent now, with live prices where the API has them."""
        ...

    def launch(self, request: LaunchRequest) -> Machine:
        """Create an instance; raises CapacityError, AuthError or ProviderAPIError."""
        ...

    def get(self, machine_id: str) -> Machine | None:
        """The instance's current state; None when the provider no longer knows it."""
        ...

    def find(self, tag: str) -> Machine | None:
        """The live instance carrying ``tag`` in its name, if any."""
        ...

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        """Every live instance whose name starts with ``prefix`` (for cleanup)."""
        ...

    def terminate(self, machine_id: str) -> None:
        """Terminate; idempotent (an instance already gone is success)."""
        ...

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        """Open the runner's connection to a ready machine."""
        ...

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """How the agent on ``machine`` can terminate it itself; None when it cannot (or the
        user did not opt in). Only asked when ``capabilities.self_terminates``."""
        ...


def upload_tree(host: Host, local: Path, rel: str) -> None:
    """Copy a local folder into the host's work directory, file by file (small trees only:
    checkpoints of a LoRA adapter). Text-safe: files are sent base64-encoded through
    ``write_text`` and decoded by the host's interpreter."""
    import base64
    import shlex

    for p in sorted(local.rglob("*")):
        if not p.is_file():
            continue
        target = f"{rel}/{p.relative_to(local).as_posix()}"
        tmp = f".upload-{abs(hash(target))}.b64"
        host.write_text(tmp, base64.b64encode(p.read_bytes()).decode())
        code = (
            "import base64,os,sys;t=sys.argv[1];s=sys.argv[2];"
            "os.makedirs(os.path.dirname(t) or '.',exist_ok=True);"
            "open(t,'wb').write(base64.b64decode(open(s).read()));os.remove(s)"
        )
        rc, _, err = host.run(
            f"{host.python} -c {shlex.quote(code)} {shlex.quote(target)} {shlex.quote(tmp)}"
        )
        if rc != 0:
            raise OSError(f"could not write {target} on the instance: {err[-300:]}")
