"""A RunPod GraphQL emulator that executes real GraphQL (graphql-core) over a schema of the
subset clients use, following ``shared/provider-apis.md`` §1-2 and §8.

Run standalone: ``python -m tests.fakes.runpod --port 0 --api-key K`` (prints the URL; point
runpod-python at it with ``RUNPOD_API_BASE_URL``). Each pod is a real sshd on loopback whose
only authorised key is the pod's ``PUBLIC_KEY``; the billing clock runs per second from create
to terminate.
"""

from __future__ import annotations

import argparse
import json
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graphql import GraphQLError, build_schema, graphql_sync, parse
from graphql.language import OperationDefinitionNode

from ._server import FakeCloud, Instance, Reply, json_reply

CAPACITY_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
NOT_FOUND_TERMINATE = "pod not found to terminate"

SDL = """
enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }
enum CloudTypeEnum { ALL SECURE COMMUNITY }
input GpuTypeFilter { id: String }
input GpuLowestPriceInput { gpuCount: Int secureCloud: Boolean dataCenterId: String
  countryCode: String minMemoryInGb: Int minVcpuCount: Int minDisk: Int minCudaVersion: String }
type LowestPrice { minimumBidPrice: Float uninterruptablePrice: Float minVcpu: Float
  minMemory: Float stockStatus: String availableGpuCounts: [Int] maxUnreservedGpuCount: Int
  countryCode: String gpuName: String gpuTypeId: String }
type GpuType { id: String displayName: String manufacturer: String memoryInGb: Int
  cudaCores: Int maxGpuCount: Int maxGpuCountSecureCloud: Int maxGpuCountCommunityCloud: Int
  minPodGpuCount: Int secureCloud: Boolean communityCloud: Boolean securePrice: Float
  communityPrice: Float secureSpotPrice: Float communitySpotPrice: Float oneWeekPrice: Float
  oneMonthPrice: Float threeMonthPrice: Float sixMonthPrice: Float
  lowestPrice(input: GpuLowestPriceInput): LowestPrice }
input EnvironmentVariableInput { key: String! value: String! }
input PodFindAndDeployOnDemandInput { name: String imageName: String gpuTypeId: String
  cloudType: CloudTypeEnum gpuCount: Int volumeInGb: Int containerDiskInGb: Int
  minVcpuCount: Int minMemoryInGb: Int ports: String volumeMountPath: String
  env: [EnvironmentVariableInput] dockerArgs: String startSsh: Boolean startJupyter: Boolean
  supportPublicIp: Boolean dataCenterId: String countryCode: String networkVolumeId: String
  templateId: String containerRegistryAuthId: String allowedCudaVersions: [String]
  minCudaVersion: String minDownload: Int minUpload: Int stopAfter: String
  terminateAfter: String volumeKey: String cudaVersion: String gpuTypeIdList: [String]
  deployCost: Float }
input PodFilter { podId: String! }
input PodStopInput { podId: String! }
input PodTerminateInput { podId: String! }
type PodMachine { podHostId: String gpuDisplayName: String }
type PodRuntimePort { ip: String isIpPublic: Boolean privatePort: Int publicPort: Int
  type: String }
type PodRuntimeGpu { id: String gpuUtilPercent: Int memoryUtilPercent: Int }
type PodRuntimeContainer { cpuPercent: Int memoryPercent: Int }
type PodRuntime { uptimeInSeconds: Int ports: [PodRuntimePort] gpus: [PodRuntimeGpu]
  container: PodRuntimeContainer }
type Pod { id: String! name: String desiredStatus: PodStatus lastStatusChange: String
  imageName: String env: [String] gpuCount: Int vcpuCount: Float memoryInGb: Float
  containerDiskInGb: Int volumeInGb: Float volumeMountPath: String costPerHr: Float
  dockerArgs: String dockerId: String podType: String port: Int ports: String
  uptimeSeconds: Int machineId: String machine: PodMachine runtime: PodRuntime }
type User { id: String email: String pubKey: String pods: [Pod] }
type Query { gpuTypes(input: GpuTypeFilter): [GpuType] pod(input: PodFilter): Pod
  myself: User }
type Mutation { podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podStop(input: PodStopInput): Pod podTerminate(input: PodTerminateInput): String }
"""
SCHEMA = build_schema(SDL)

# id, display name, memory, secure price, stock status (None = not offered now)
GPU_TYPES: list[tuple[str, str, int, float, str | None]] = [
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, "High"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, "Medium"),
    ("NVIDIA RTX A6000", "RTX A6000", 48, 0.49, "High"),
    ("NVIDIA L40S", "L40S", 48, 0.86, "Low"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, "Medium"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.99, "Low"),
    ("NVIDIA H200", "H200", 141, 3.99, None),
]


def _id(n: int = 14) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


class RunPodFake(FakeCloud):
    """The emulator's state and its GraphQL endpoint.

    Attributes:
        url: base URL (GraphQL at ``url + "/graphql"``); set by ``start``.
        api_key: the account's key.
        faults: switchable faults (see ``Faults``).
        pods: every pod ever created, by id (terminated ones keep their billing record).
        account_pubkey: the account-level key used when a pod sets no ``PUBLIC_KEY``.
    """

    billing_increment_s = 1

    def __init__(self, api_key: str = "rp-test-key", folder: Path | None = None) -> None:
        self.pods: dict[str, Instance] = {}
        super().__init__(api_key, folder, self.pods)
        self.pod_keys: dict[str, str] = {}  # pod-scoped key -> pod id
        self.gpu_types = [list(g) for g in GPU_TYPES]
        self.account_pubkey = ""

    # -- what tests change -------------------------------------------------------------------
    def pod_by_name(self, name: str) -> Instance | None:
        return self.by_name(name)

    def set_stock(self, gpu_id: str, stock: str | None) -> None:
        for g in self.gpu_types:
            if g[0] == gpu_id:
                g[4] = stock

    def preempt(self, pod_id: str) -> None:
        """The host died: sshd is killed, the pod shows ``EXITED`` with no runtime."""
        pod = self.pods[pod_id]
        self._host.kill(pod)
        pod.status = "EXITED"
        pod.ended = pod.ended or time.time()

    # -- HTTP -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        self.requests += 1
        parts = urlsplit(path)
        if parts.path.rstrip("/") != "/graphql" or method != "POST":
            return json_reply(404, {"message": "Not Found"})
        if self.faults.unauthorized:
            return json_reply(401, {"error": "Unauthorized"})
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        key = key or (parse_qs(parts.query).get("api_key") or [""])[0]
        try:
            payload = json.loads(body or b"{}")
            query = payload["query"]
        except (ValueError, KeyError):
            return json_reply(400, {"errors": [{"message": "Must provide query string."}]})
        scope: str | None = None
        if key == self.api_key:
            scope = "user"
        elif key in self.pod_keys:
            scope = f"pod:{self.pod_keys[key]}"
        elif key or not _catalog_only(query):
            return json_reply(401, {"error": "Unauthorized"})
        if self.faults.take("rate_limit"):
            extra = {}
            if self.faults.retry_after is not None:
                extra["Retry-After"] = f"{self.faults.retry_after:g}"
            return json_reply(429, {"errors": [{"message": "Too many requests"}]}, extra)
        if self.faults.take("server_error"):
            return json_reply(500, {"errors": [{"message": "Internal Server Error"}]})
        ctx: dict[str, Any] = {"scope": scope, "lost": False}
        result = graphql_sync(
            SCHEMA,
            query,
            root_value=_Root(self),
            context_value=ctx,
            variable_values=payload.get("variables") or None,
            operation_name=payload.get("operationName"),
        )
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
            if result.data is None:  # parse / validation / variable coercion: a schema error
                return json_reply(400, {"errors": out["errors"]})
        if ctx["lost"]:
            return json_reply(500, {"errors": [{"message": "upstream connect error"}]})
        return json_reply(200, out)

    # -- resolvers (called through _Root) ---------------------------------------------------
    def deploy(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        self._user_only(info)
        gpu = next((g for g in self.gpu_types if g[0] == input.get("gpuTypeId")), None)
        if gpu is None:
            raise GraphQLError(f"Invalid GPU type id: {input.get('gpuTypeId')}")
        if not input.get("name") or not (input.get("imageName") or input.get("templateId")):
            raise GraphQLError("name and imageName are required")
        if self.faults.capacity or gpu[4] is None:
            raise GraphQLError(CAPACITY_MESSAGE)
        env = {e["key"]: e["value"] for e in input.get("env") or []}
        if input.get("startSsh") and "PUBLIC_KEY" not in env and self.account_pubkey:
            env["PUBLIC_KEY"] = self.account_pubkey
        count = int(input.get("gpuCount") or 1)
        now = time.time()
        pod = Instance(
            id=_id(),
            name=str(input["name"]),
            price_per_hour=float(gpu[3]) * count,
            created=now,
            billing_start=now,
            status="RUNNING",
        )
        pod_key = "rpa_pod_" + secrets.token_hex(12)
        pod.data = {"input": dict(input), "env": env, "gpu": gpu, "key": pod_key}
        pod.data["machineId"] = _id(12)
        pod.data["podHostId"] = f"{pod.id}-{secrets.token_hex(4)}"
        with self._lock:
            self.pods[pod.id] = pod
            self.pod_keys[pod_key] = pod.id
        ports = str(input.get("ports") or "")
        if "22/tcp" in ports.split(","):
            self._host.boot(
                pod,
                env.get("PUBLIC_KEY", ""),
                {
                    "RUNPOD_POD_ID": pod.id,
                    "RUNPOD_API_KEY": pod_key,
                    "RUNPOD_API_BASE_URL": self.url,
                    "RUNPOD_GPU_COUNT": str(count),
                },
                self.faults,
            )
        if self.faults.take("lose_create"):
            info.context["lost"] = True
        return self._pod_view(pod, count_poll=False)

    def pod(self, info: Any, input: dict[str, Any]) -> dict[str, Any] | None:
        pod_id = input["podId"]
        self._allowed(info, pod_id)
        pod = self.pods.get(pod_id)
        if pod is None or pod.status == "TERMINATED":
            return None
        return self._pod_view(pod, count_poll=True)

    def myself(self, info: Any) -> dict[str, Any]:
        self._user_only(info)
        pods = [
            self._pod_view(p, count_poll=False)
            for p in self.pods.values()
            if p.status != "TERMINATED"
        ]
        return {"id": "user_fake", "email": "fake@example.com", "pubKey": "", "pods": pods}

    def terminate(self, info: Any, input: dict[str, Any]) -> None:
        pod_id = input["podId"]
        self._allowed(info, pod_id)
        if self.faults.take("terminate_fails"):
            raise GraphQLError(
                "Something went wrong. Please try again later or contact support.",
                extensions={"code": "INTERNAL_SERVER_ERROR"},
            )
        pod = self.pods.get(pod_id)
        if pod is None or pod.status == "TERMINATED":
            raise GraphQLError(NOT_FOUND_TERMINATE, extensions={"code": "POD_NOT_FOUND"})
        # Recorded before the kill: a pod terminating itself dies inside this very call.
        pod.data["terminated_by"] = info.context["scope"]
        # State first, then the kill: a caller on the pod itself may be gone before we return.
        pod.status = "TERMINATED"
        pod.ended = pod.ended or time.time()
        self._host.kill(pod)
        return None

    def stop_pod(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        self._user_only(info)
        pod = self.pods.get(input["podId"])
        if pod is None or pod.status == "TERMINATED":
            raise GraphQLError("pod not found")
        self._host.kill(pod)
        pod.status = "EXITED"
        return self._pod_view(pod, count_poll=False)

    def gpu_types_view(self, info: Any, input: dict[str, Any] | None = None) -> list[Any]:
        wanted = (input or {}).get("id")
        out = []
        for gid, display, mem, price, stock in self.gpu_types:
            if wanted and gid != wanted:
                continue

            lowest = _lowest_price(gid, display, price, stock)

            out.append(
                {
                    "id": gid,
                    "displayName": display,
                    "manufacturer": "Nvidia",
                    "memoryInGb": mem,
                    "cudaCores": 0,
                    "maxGpuCount": 8,
                    "secureCloud": True,
                    "communityCloud": True,
                    "securePrice": price,
                    "communityPrice": round(price * 0.8, 2),
                    "secureSpotPrice": round(price * 0.6, 2),
                    "communitySpotPrice": round(price * 0.5, 2),
                    "oneWeekPrice": price,
                    "oneMonthPrice": price,
                    "threeMonthPrice": price,
                    "sixMonthPrice": price,
                    "lowestPrice": lowest,
                }
            )
        return out

    # -- helpers ----------------------------------------------------------------------------
    def _pod_view(self, pod: Instance, *, count_poll: bool) -> dict[str, Any]:
        data = pod.data
        runtime = None
        if pod.status == "RUNNING":
            if count_poll:
                pod.polls += 1
            if pod.polls > self.faults.ready_polls and pod.sshd is not None:
                runtime = {
                    "uptimeInSeconds": int(time.time() - pod.created),
                    "ports": [
                        {
                            "ip": pod.ssh_host,
                            "isIpPublic": True,
                            "privatePort": 22,
                            "publicPort": pod.ssh_port,
                            "type": "tcp",
                        }
                    ],
                    "gpus": [{"id": "GPU-0", "gpuUtilPercent": 0, "memoryUtilPercent": 0}],
                    "container": {"cpuPercent": 0, "memoryPercent": 0},
                }
        inp = data["input"]
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.status,
            "lastStatusChange": f"Rented by User: {time.ctime(pod.created)}",
            "imageName": inp.get("imageName"),
            "env": [f"{k}={v}" for k, v in data["env"].items()],
            "gpuCount": inp.get("gpuCount") or 1,
            "vcpuCount": 8.0,
            "memoryInGb": 30.0,
            "containerDiskInGb": inp.get("containerDiskInGb") or 10,
            "volumeInGb": float(inp.get("volumeInGb") or 0),
            "volumeMountPath": inp.get("volumeMountPath") or "/workspace",
            "costPerHr": pod.price_per_hour,
            "dockerArgs": inp.get("dockerArgs") or "",
            "dockerId": None,
            "podType": "RESERVED",
            "port": None,
            "ports": inp.get("ports") or "",
            "uptimeSeconds": int(time.time() - pod.created) if runtime else 0,
            "machineId": data["machineId"],
            "machine": {"podHostId": data["podHostId"], "gpuDisplayName": data["gpu"][1]},
            "runtime": runtime,
        }

    @staticmethod
    def _user_only(info: Any) -> None:
        if info.context["scope"] != "user":
            raise GraphQLError("Unauthorized: this API key cannot perform this operation")

    @staticmethod
    def _allowed(info: Any, pod_id: str) -> None:
        scope = info.context["scope"]
        if scope != "user" and scope != f"pod:{pod_id}":
            raise GraphQLError("Unauthorized: this API key cannot access this pod")


def _lowest_price(gid: str, display: str, price: float, stock: str | None) -> Any:
    """The ``lowestPrice(input)`` field of one GPU type (a resolver graphql-core calls)."""

    def resolve(info: Any, input: Any = None) -> dict[str, Any]:
        return {
            "minimumBidPrice": round(price * 0.6, 2),
            "uninterruptablePrice": price,
            "stockStatus": stock,
            "availableGpuCounts": [1, 2, 4, 8] if stock else [],
            "minVcpu": 8 if stock else None,
            "minMemory": 30 if stock else None,
            "gpuTypeId": gid,
            "gpuName": display,
        }

    return resolve


class _Root:
    """GraphQL root value: graphql-core's default resolver calls these with (info, **args)."""

    def __init__(self, fake: RunPodFake) -> None:
        self.gpuTypes = fake.gpu_types_view
        self.pod = fake.pod
        self.myself = fake.myself
        self.podFindAndDeployOnDemand = fake.deploy
        self.podTerminate = fake.terminate
        self.podStop = fake.stop_pod


def _catalog_only(query: str) -> bool:
    """Whether a keyless request only reads the GPU catalog (allowed without a key)."""
    try:
        doc = parse(query)
    except GraphQLError:
        return False
    for d in doc.definitions:
        if not isinstance(d, OperationDefinitionNode) or d.operation.value != "query":
            return False
        if any(
            getattr(s, "name", None) is None or s.name.value != "gpuTypes"
            for s in d.selection_set.selections
        ):  # type: ignore[attr-defined]
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RunPod GraphQL emulator (pods are real sshd)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default="rp-test-key")
    args = ap.parse_args(argv)
    fake = RunPodFake(api_key=args.api_key)
    print(fake.start(args.port), flush=True)
    fake.serve_until_interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(main())
