"""RunPod over its GraphQL API (the surface runpod-python speaks) and direct SSH.

Offers come from ``gpuTypes { lowestPrice }``, pods are created with
``podFindAndDeployOnDemand`` (name = the attempt's tag, ``22/tcp`` exposed, the per-job public
key in ``PUBLIC_KEY``), read with ``pod`` (ready once ``runtime.ports`` maps 22 publicly) and
removed with ``podTerminate``. RunPod answers application errors with HTTP 200 and an
``errors`` list; those are mapped here, transport-level ones in ``_http``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
from loraburst._exceptions import ProviderAPIError
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

__all__ = ["GPU_NAMES", "RunPodProvider"]

log = logging.getLogger("loraburst.providers.runpod")

# RunPod gpuTypeId -> the estimator's canonical GPU name (sdk/_gpus.py CATALOG).
GPU_NAMES: Mapping[str, str] = {
    "NVIDIA GeForce RTX 3090": "RTX 3090",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA GeForce RTX 5090": "RTX 5090",
    "NVIDIA RTX A5000": "RTX A5000",
    "NVIDIA RTX A6000": "RTX A6000",
    "NVIDIA RTX 6000 Ada Generation": "RTX 6000 Ada",
    "NVIDIA L4": "L4",
    "NVIDIA L40": "L40",
    "NVIDIA L40S": "L40S",
    "NVIDIA A40": "A40",
    "NVIDIA A100 80GB PCIe": "A100 80GB",
    "NVIDIA A100-SXM4-80GB": "A100 80GB",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA B200": "B200",
}

ENV_KEYS = ("LORABURST_RUNPOD_API_KEY", "RUNPOD_API_KEY")
# GPUs per pod we offer (a pod's GPUs are one machine's: torchrun over them).
GPU_COUNTS = (1, 2, 4, 8)
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
CAPACITY_MARKERS = (
    "no longer any instances available",
    "no instances currently available",
    "does not have the resources to deploy",
)

_POD_FIELDS = """
  id name desiredStatus costPerHr imageName machineId
  machine { podHostId }
  runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } }
"""
_OFFERS = """
query Offers($lowest: GpuLowestPriceInput) {
  gpuTypes { id displayName memoryInGb securePrice communityPrice
             maxGpuCount
             lowestPrice(input: $lowest) { uninterruptablePrice stockStatus availableGpuCounts } }
}"""
_DEPLOY = (
    "mutation Deploy($input: PodFindAndDeployOnDemandInput!) {"
    f" podFindAndDeployOnDemand(input: $input) {{ {_POD_FIELDS} }} }}"
)
_POD = f"query Pod($input: PodFilter!) {{ pod(input: $input) {{ {_POD_FIELDS} }} }}"
_PODS = f"query Pods {{ myself {{ pods {{ {_POD_FIELDS} }} }} }}"
_TERMINATE = "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }"

_STATUS: Mapping[str, MachineStatus] = {
    "CREATED": "pending",
    "RESTARTING": "pending",
    "RUNNING": "pending",  # running only once SSH is mapped, see _machine
    "PAUSED": "stopping",
    "EXITED": "preempted",  # we never stop pods: an exited one died under us
    "DEAD": "preempted",
    "TERMINATED": "terminated",
}


def _graphql_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        return str(body["errors"][0].get("message", ""))
    return ""


class RunPodProvider:
    """On-demand RunPod GPU pods.

    Args:
        api_key: API key; else ``LORABURST_RUNPOD_API_KEY``, else ``RUNPOD_API_KEY``.
        base_url: API host (GraphQL is at ``{base_url}/graphql``).
        client: the ``httpx.Client`` to send requests with.
        image: container image; it must run sshd with ``$PUBLIC_KEY`` (RunPod's images do).
        cloud_type: ``SECURE`` (public IP always) or ``COMMUNITY``.
        python: interpreter on the pod when it does not set ``LORABURST_REMOTE_PYTHON``.
        connect_timeout_s: how long ``connect`` waits for sshd once the port is mapped.
        max_attempts / backoff_s: retry policy for 429/5xx/timeouts.
    """

    name: ClassVar[str] = "runpod"
    # Pods of 1, 2, 4 or 8 GPUs (gpuCount): the trainer runs under torchrun on more than one.
    capabilities: Capabilities = Capabilities(
        self_terminates=True, gpu_counts=GPU_COUNTS, credentials=ENV_KEYS
    )
    unsupported: ClassVar[Mapping[str, str]] = {
        "spot": "spot pods (podRentInterruptable) are not implemented yet",
        "stop": "pods are terminated, never stopped (a stopped pod still bills its volume)",
    }

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        client: httpx.Client | None = None,
        image: str = DEFAULT_IMAGE,
        cloud_type: str = "SECURE",
        python: str = "python3",
        connect_timeout_s: float = 300.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        # RUNPOD_API_BASE_URL is the variable runpod-python itself honours.
        base_url = (
            base_url
            or os.environ.get("LORABURST_RUNPOD_BASE_URL")
            or os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io")
        )
        self.base_url = base_url.rstrip("/")
        self.image = image
        self.cloud_type = cloud_type
        self.python = python
        self.connect_timeout_s = connect_timeout_s
        self._client = client
        self._retry = (max_attempts, backoff_s)
        self._api, self._key_error = client_or_error(
            self.name,
            api_key,
            ENV_KEYS,
            base_url=self.base_url,
            client=client,
            error_message=_graphql_message,
            capacity_markers=CAPACITY_MARKERS,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )

    def __repr__(self) -> str:
        return f"RunPodProvider(base_url={self.base_url!r})"

    # -- GraphQL ----------------------------------------------------------------------------
    def _gql(
        self,
        query: str,
        variables: Mapping[str, Any] | None = None,
        *,
        idempotent: bool = True,
        ok_errors: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        if self._api is None:
            assert self._key_error is not None
            raise self._key_error
        body = self._api.request(
            "POST",
            "/graphql",
            json={"query": query, "variables": dict(variables or {})},
            idempotent=idempotent,
        )
        if not isinstance(body, dict):
            raise ProviderAPIError(
                f"runpod: unexpected GraphQL reply {body!r:.200}", provider="runpod"
            )
        errors = body.get("errors")
        if errors:
            message = _graphql_message(body)
            if any(m in message.lower() for m in ok_errors):
                return {}
            raise self._api.error_for(message, status=None, what="runpod GraphQL")
        data = body.get("data")
        if not isinstance(data, dict):
            raise ProviderAPIError("runpod: GraphQL reply without data", provider="runpod")
        return data

    # -- verbs ------------------------------------------------------------------------------
    def offers(self) -> list[Offer]:
        """Offers per known GPU type with a live on-demand price: one GPU per pod, and 2, 4 or
        8 where RunPod has them now (``availableGpuCounts``), at ``gpuCount`` x the GPU's
        rate (RunPod prices a pod per GPU)."""
        lowest = {"gpuCount": 1, "secureCloud": self.cloud_type == "SECURE"}
        data = self._gql(_OFFERS, {"lowest": lowest})
        out = []
        for g in data.get("gpuTypes") or []:
            gpu = GPU_NAMES.get(g.get("id", ""))
            if gpu is None:
                continue
            lp = g.get("lowestPrice") or {}
            price = lp.get("uninterruptablePrice") or g.get("securePrice")
            if not price:
                continue
            stock = lp.get("stockStatus")
            most = int(g.get("maxGpuCount") or 1)
            counts = {int(n) for n in lp.get("availableGpuCounts") or [] if int(n) <= most}
            for n in GPU_COUNTS:
                if n > 1 and n not in counts:
                    continue
                out.append(
                    Offer(
                        provider=self.name,
                        gpu=gpu,
                        gpu_count=n,
                        vram_gb=float(g.get("memoryInGb") or 0),
                        price_per_hour=round(float(price) * n, 4),
                        instance_type=g["id"],
                        available=stock not in (None, "", "None"),
                        billing_increment_s=1,
                    )
                )
        return out

    def launch(self, request: LaunchRequest) -> Machine:
        """Deploy an on-demand pod named after ``request.tag``.

        Raises:
            CapacityError: RunPod has no such GPU free now (its message is kept).
            AuthError, RateLimitError, ProviderAPIError.
        """
        env = [{"key": "PUBLIC_KEY", "value": request.public_key}]
        env += [{"key": k, "value": v} for k, v in request.env.items()]
        pod_input = {
            "name": request.tag,
            "imageName": request.image or self.image,
            "gpuTypeId": request.offer.instance_type,
            "cloudType": self.cloud_type,
            "gpuCount": max(1, request.offer.gpu_count),
            "volumeInGb": 0,
            "containerDiskInGb": request.disk_gb,
            "ports": "22/tcp",
            "startSsh": True,
            "supportPublicIp": True,
            "env": env,
        }
        try:
            data = self._gql(_DEPLOY, {"input": pod_input}, idempotent=False)
        except ProviderAPIError:
            # The pod may exist although the reply was lost: find it by its tag.
            found = self.find(request.tag)
            if found is None:
                raise
            log.info("runpod: create reply lost; found pod %s by its tag", found.id)
            return found
        pod = data.get("podFindAndDeployOnDemand")
        if not isinstance(pod, dict) or not pod.get("id"):
            raise ProviderAPIError("runpod: create returned no pod", provider=self.name)
        return self._machine(pod, fallback_price=request.offer.price_per_hour)

    def get(self, machine_id: str) -> Machine | None:
        pod = self._gql(_POD, {"input": {"podId": machine_id}}).get("pod")
        return self._machine(pod) if isinstance(pod, dict) else None

    def find(self, tag: str) -> Machine | None:
        return next((m for m in self._pods() if m.tag == tag), None)

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return [m for m in self._pods() if m.tag.startswith(prefix)]

    def _pods(self) -> list[Machine]:
        myself = self._gql(_PODS).get("myself") or {}
        return [self._machine(p) for p in myself.get("pods") or []]

    def terminate(self, machine_id: str) -> None:
        """Terminate the pod; one that is already gone counts as terminated."""
        self._gql(_TERMINATE, {"input": {"podId": machine_id}}, ok_errors=("not found",))

    def self_termination(self, machine: Machine) -> SelfTermination | None:
        """``podTerminate`` with the pod's own pod-scoped key (every pod has it as
        ``RUNPOD_API_KEY``): the client's account key never reaches the pod."""
        pod = json.dumps(machine.id)  # a JSON string is a valid GraphQL string
        query = f"mutation {{ podTerminate(input: {{podId: {pod}}}) }}"
        return SelfTermination(
            url=f"{self.base_url}/graphql",
            body=json.dumps({"query": query}),
            token_env="RUNPOD_API_KEY",
            graphql=True,
        )

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        host = SSHHost(
            machine, key_path, workdir, python=self.python, connect_timeout_s=self.connect_timeout_s
        )
        return host.connect()

    def _machine(self, pod: Mapping[str, Any], fallback_price: float = 0.0) -> Machine:
        status = _STATUS.get(str(pod.get("desiredStatus") or "CREATED"), "unknown")
        ssh = None
        runtime = pod.get("runtime") or {}
        for port in runtime.get("ports") or []:
            if port.get("privatePort") == 22 and port.get("isIpPublic") and port.get("publicPort"):
                ssh = SSHEndpoint(host=str(port["ip"]), port=int(port["publicPort"]), user="root")
        if pod.get("desiredStatus") == "RUNNING" and ssh is not None:
            status = "running"
        return Machine(
            provider=self.name,
            id=str(pod["id"]),
            tag=str(pod.get("name") or ""),
            status=status,
            price_per_hour=float(pod.get("costPerHr") or fallback_price),
            ssh=ssh,
            python=self.python,
            workdir_root="~/loraburst",
            extra={"podHostId": (pod.get("machine") or {}).get("podHostId")},
        )
