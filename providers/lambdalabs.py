"""Lambda Cloud over its REST API v1 and SSH (the module is ``lambdalabs``: ``lambda`` is a
keyword).

A launch registers the per-job public key under the attempt's tag (``POST /ssh-keys``), picks a
region with capacity from ``GET /instance-types`` and launches one instance named by the tag;
``terminate`` then deletes the key. Lambda allows one launch per 12 s: launches are paced here
and a 429 is waited out by ``_http``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
from loraburst._exceptions import (
    AuthError,
    CapacityError,
    ConfigError,
    ProviderAPIError,
    ProviderError,
)
from pydantic import SecretStr

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
from ._http import client_or_error
from ._ssh import SSHHost

__all__ = ["GPU_NAMES", "LambdaProvider"]

log = logging.getLogger("loraburst.providers.lambda")

# Lambda instance-type name without "gpu_<N>x_" -> the estimator's canonical GPU name.
GPU_NAMES: Mapping[str, str] = {
    "a10": "A10",
    "a100": "A100 40GB",
    "a100_sxm4": "A100 40GB",
    "a100_80gb_sxm4": "A100 80GB",
    "a6000": "RTX A6000",
    "h100_pcie": "H100 PCIe",
    "h100_sxm5": "H100 SXM",
    "gh200": "GH200",
    "b200_sxm6": "B200",
    "v100": "V100",
}

ENV_KEYS = ("LORABURST_LAMBDA_API_KEY", "LAMBDA_API_KEY")
GPU_COUNTS = (1, 2, 4, 8)  # the gpu_<N>x_ instance types we offer
CAPACITY_MARKERS = ("insufficient-capacity", "not enough capacity")
NOT_FOUND = "object-does-not-exist"
_TYPE_RE = re.compile(r"^gpu_(\d+)x_(.+)$")
_STATUS: Mapping[str, MachineStatus] = {
    "booting": "pending",
    "active": "pending",  # running only once it has an ip, see _machine
    "unhealthy": "unknown",
    "terminating": "stopping",
    "terminated": "terminated",
    "preempted": "preempted",
}
# Last launch per API host, shared by every provider object of this process.
_last_launch: dict[str, float] = {}
_launch_lock = threading.Lock()


def _lambda_message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        msg = str(err.get("message") or "")
        return f"{msg} ({err['code']})" if err.get("code") else msg
    return ""


def _env_port(var: str, default: int) -> int:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"{var}={value!r} is not a TCP port: set it to a number 1-65535")
    return int(value)


class LambdaProvider:
    """On-demand Lambda Cloud instances.

    Args:
        api_key: API key; else ``LORABURST_LAMBDA_API_KEY``, else ``LAMBDA_API_KEY``.
        base_url: API root (``.../api/v1``).
        client: the ``httpx.Client`` to send requests with.
        python: interpreter on the instance when it does not set ``LORABURST_REMOTE_PYTHON``.
        ssh_user / ssh_port: how instances are reached; else ``LORABURST_LAMBDA_SSH_USER`` /
            ``LORABURST_LAMBDA_SSH_PORT`` (for a gateway or an emulator of the API), else
            Lambda's own: ``ubuntu`` on port 22.
        launch_interval_s: minimum spacing of launches (Lambda's limit is 1 per 12 s).
        connect_timeout_s: how long ``connect`` waits for sshd once the instance is active.
        max_attempts / backoff_s: retry policy for 429/5xx/timeouts.
        self_terminate: opt in to giving the on-instance watchdog this API key (over SSH, in
            the agent's environment only) so it can terminate its own instance when the
            client is gone for good; without it the watchdog can only stop training.
    """

    name: ClassVar[str] = "lambda"
    # gpu_1x_, gpu_2x_, gpu_4x_ and gpu_8x_ types: torchrun over the instance's GPUs.
    capabilities: Capabilities = Capabilities(
        self_terminates=True, gpu_counts=GPU_COUNTS, credentials=ENV_KEYS
    )
    unsupported: ClassVar[Mapping[str, str]] = {
        "spot": "Lambda Cloud has no spot or interruptible instances",
        "stop": "Lambda Cloud instances cannot be stopped, only terminated",
    }

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        client: httpx.Client | None = None,
        python: str = "python3",
        ssh_user: str | None = None,
        ssh_port: int | None = None,
        launch_interval_s: float = 12.0,
        connect_timeout_s: float = 300.0,
        max_attempts: int = 6,
        backoff_s: float = 2.0,
        self_terminate: bool = False,
    ) -> None:
        self.self_terminate = self_terminate
        base_url = base_url or os.environ.get(
            "LORABURST_LAMBDA_BASE_URL", "https://cloud.lambda.ai/api/v1"
        )
        self.base_url = base_url.rstrip("/")
        self.python = python
        self.ssh_user = ssh_user or os.environ.get("LORABURST_LAMBDA_SSH_USER") or "ubuntu"
        self.ssh_port = ssh_port or _env_port("LORABURST_LAMBDA_SSH_PORT", 22)
        self.launch_interval_s = launch_interval_s
        self.connect_timeout_s = connect_timeout_s
        self._api, self._key_error = client_or_error(
            self.name,
            api_key,
            ENV_KEYS,
            base_url=self.base_url,
            client=client,
            error_message=_lambda_message,
            capacity_markers=CAPACITY_MARKERS,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """Lambda's terminate call with this account's key (opt-in only: Lambda keys are
        account-wide, so a user must choose to hand one to the instance)."""
        if not self.self_terminate or self._api is None:
            return None
        return SelfTermination(
            url=f"{self.base_url}/instance-operations/terminate",
            body=json.dumps({"instance_ids": [machine.id]}),
            token=self._api.key.get_secret_value(),
        )

    def __repr__(self) -> str:
        return f"LambdaProvider(base_url={self.base_url!r})"

    def _call(self, method: str, path: str, json: Any = None, *, idempotent: bool = True) -> Any:
        if self._api is None:
            assert self._key_error is not None
            raise self._key_error
        body = self._api.request(method, path, json=json, idempotent=idempotent)
        return body.get("data") if isinstance(body, dict) else None

    # -- verbs ------------------------------------------------------------------------------
    def offers(self) -> list[Offer]:
        """One offer per known instance type of 1, 2, 4 or 8 GPUs, in its first region with
        capacity; the price is the whole instance's."""
        out = []
        for entry in (self._call("GET", "/instance-types") or {}).values():
            itype = entry.get("instance_type") or {}
            m = _TYPE_RE.match(str(itype.get("name", "")))
            if m is None or m.group(2) not in GPU_NAMES or int(m.group(1)) not in GPU_COUNTS:
                continue
            regions = [r["name"] for r in entry.get("regions_with_capacity_available") or []]
            vram = re.search(r"(\d+)\s*GB", str(itype.get("gpu_description", "")))
            out.append(
                Offer(
                    provider=self.name,
                    gpu=GPU_NAMES[m.group(2)],
                    gpu_count=int(m.group(1)),
                    vram_gb=float(vram.group(1)) if vram else 0.0,
                    price_per_hour=float(itype.get("price_cents_per_hour", 0)) / 100.0,
                    instance_type=str(itype["name"]),
                    region=regions[0] if regions else None,
                    available=bool(regions),
                    billing_increment_s=60,
                )
            )
        return out

    def launch(self, request: LaunchRequest) -> Machine:
        """Register the job's key, launch one instance named by the tag.

        Raises:
            CapacityError: no region has capacity for the type (Lambda's message is kept).
            AuthError, RateLimitError, ProviderAPIError.
        """
        itype = request.offer.instance_type
        region = self._region_with_capacity(itype, prefer=request.offer.region)
        key = self._call(
            "POST", "/ssh-keys", {"name": request.tag, "public_key": request.public_key}
        )
        body = {
            "region_name": region,
            "instance_type_name": itype,
            "ssh_key_names": [request.tag],
            "name": request.tag,
        }
        try:
            self._pace()
            try:
                data = self._call("POST", "/instance-operations/launch", body, idempotent=False)
            finally:
                self._paced()
            ids = (data or {}).get("instance_ids") or []
            if not ids:
                raise ProviderAPIError("lambda: launch returned no instance id", provider=self.name)
        except ProviderError as exc:
            found = None if isinstance(exc, (AuthError, CapacityError)) else self.find(request.tag)
            if found is not None:
                log.info("lambda: launch reply lost; found instance %s by its tag", found.id)
                return found
            self._delete_key(str((key or {}).get("id", "")))
            raise
        return Machine(
            provider=self.name,
            id=str(ids[0]),
            tag=request.tag,
            status="pending",
            price_per_hour=request.offer.price_per_hour,
            python=self.python,
            workdir_root="~/loraburst",
            extra={"region": region},
        )

    def _region_with_capacity(self, itype: str, prefer: str | None) -> str:
        entry = (self._call("GET", "/instance-types") or {}).get(itype)
        if entry is None:
            raise ProviderAPIError(
                f"lambda: unknown instance type {itype!r}; see LambdaProvider().offers()",
                provider=self.name,
            )
        regions = [r["name"] for r in entry.get("regions_with_capacity_available") or []]
        if not regions:
            raise CapacityError(
                f"Not enough capacity to fulfill launch request. No region has {itype} now "
                "(instance-operations/launch/insufficient-capacity)",
                provider=self.name,
            )
        return prefer if prefer is not None and prefer in regions else str(regions[0])

    def _pace(self) -> None:
        with _launch_lock:
            wait = _last_launch.get(self.base_url, 0.0) + self.launch_interval_s - time.time()
            if wait > 0:
                time.sleep(wait)
            _last_launch[self.base_url] = time.time()

    def _paced(self) -> None:
        """The launch's reply is in: the next launch waits from now. Lambda counts from when
        the request arrived, some time between the send (stamped by ``_pace``) and the reply:
        spacing counted from the send alone is shorter there when this request was slow."""
        with _launch_lock:
            _last_launch[self.base_url] = max(_last_launch.get(self.base_url, 0.0), time.time())

    def get(self, machine_id: str) -> Machine | None:
        try:
            inst = self._call("GET", f"/instances/{machine_id}")
        except ProviderAPIError as exc:
            if NOT_FOUND in str(exc):
                return None
            raise
        return self._machine(inst) if isinstance(inst, dict) else None

    def find(self, tag: str) -> Machine | None:
        return next((m for m in self._instances() if m.tag == tag), None)

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return [m for m in self._instances() if m.tag.startswith(prefix)]

    def _instances(self) -> list[Machine]:
        return [self._machine(i) for i in self._call("GET", "/instances") or []]

    def terminate(self, machine_id: str) -> None:
        """Terminate the instance (one already gone counts), then delete its job key."""
        try:
            data = self._call(
                "POST", "/instance-operations/terminate", {"instance_ids": [machine_id]}
            )
        except ProviderAPIError as exc:
            if NOT_FOUND not in str(exc):
                raise
            data = None
        names = {i.get("name") for i in (data or {}).get("terminated_instances") or []}
        for key in self._call("GET", "/ssh-keys") or []:
            if key.get("name") in names and str(key.get("name", "")).startswith("lb-"):
                self._delete_key(str(key["id"]))

    def _delete_key(self, key_id: str) -> None:
        if not key_id:
            return
        try:
            self._call("DELETE", f"/ssh-keys/{key_id}")
        except ProviderError as exc:  # a leftover public key costs nothing; say so, go on
            log.warning("lambda: could not delete ssh key %s: %s", key_id, exc)

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        host = SSHHost(
            machine, key_path, workdir, python=self.python, connect_timeout_s=self.connect_timeout_s
        )
        return host.connect()

    def _machine(self, inst: Mapping[str, Any]) -> Machine:
        raw = str(inst.get("status", ""))
        status = _STATUS.get(raw, "unknown")
        ip = inst.get("ip")
        ssh = SSHEndpoint(host=str(ip), port=self.ssh_port, user=self.ssh_user) if ip else None
        if raw == "active" and ssh is not None:
            status = "running"
        itype = inst.get("instance_type") or {}
        return Machine(
            provider=self.name,
            id=str(inst["id"]),
            tag=str(inst.get("name") or ""),
            status=status,
            price_per_hour=float(itype.get("price_cents_per_hour", 0)) / 100.0,
            ssh=ssh,
            python=self.python,
            workdir_root="~/loraburst",
            extra={"region": (inst.get("region") or {}).get("name")},
        )
