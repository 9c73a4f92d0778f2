"""A Lambda Cloud API v1 emulator under ``/api/v1/``, following ``shared/provider-apis.md`` §5
and §8: its JSON envelopes, status codes, error codes and the launch rate limit.

Run standalone: ``python -m tests.fakes.lambdalabs --port 0 --api-key K`` (prints the URL).
Each instance is a real sshd on its own loopback address (``127.0.0.N``), all on one port
(``ssh_port``, as every Lambda instance listens on 22); the only authorised key is the one
registered under the launch's ``ssh_key_names``. Billing: per minute, from the first ``active``
status (launched and healthy) to terminate.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._server import FakeCloud, Instance, Reply, json_reply
from .sshd import free_port

CAPACITY = (
    "instance-operations/launch/insufficient-capacity",
    "Not enough capacity to fulfill launch request.",
)
INVALID_KEY = ("global/invalid-api-key", "API key was invalid, expired, or deleted.")
NOT_FOUND_INSTANCE = ("global/object-does-not-exist", "Specified instance does not exist.")
INVALID = ("global/invalid-parameters", "Invalid request data.")

# name, description, cents/hour, gpus, regions with capacity
INSTANCE_TYPES: list[tuple[str, str, int, int, list[str]]] = [
    ("gpu_1x_a10", "A10 (24 GB PCIe)", 75, 1, ["us-east-1", "us-west-1"]),
    ("gpu_1x_a100_sxm4", "A100 (40 GB SXM4)", 129, 1, ["us-east-1"]),
    ("gpu_1x_h100_pcie", "H100 (80 GB PCIe)", 249, 1, ["us-west-3"]),
    ("gpu_1x_h100_sxm5", "H100 (80 GB SXM5)", 329, 1, []),
    ("gpu_1x_gh200", "GH200 (96 GB)", 149, 1, ["us-east-3"]),
    ("gpu_8x_a100_80gb_sxm4", "A100 (80 GB SXM4)", 1432, 8, ["us-east-1"]),
    # Multi-GPU types are priced for the whole instance (about count x the one-GPU rate).
    ("gpu_2x_a6000", "RTX A6000 (48 GB)", 218, 2, ["us-west-1"]),
    ("gpu_2x_a100_sxm4", "A100 (40 GB SXM4)", 258, 2, ["us-east-1"]),
    ("gpu_8x_h100_sxm5", "H100 (80 GB SXM5)", 2392, 8, ["us-west-3"]),
]
REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-east-3": "Washington DC, USA",
    "us-west-1": "California, USA",
    "us-west-3": "Utah, USA",
}


def _error(status: int, code_msg: tuple[str, str], suggestion: str | None = None) -> Reply:
    err: dict[str, Any] = {"code": code_msg[0], "message": code_msg[1]}
    if suggestion:
        err["suggestion"] = suggestion
    return json_reply(status, {"error": err})


class LambdaFake(FakeCloud):
    """The emulator's state and its REST endpoints.

    Attributes:
        url: base URL (the API is under ``url + "/api/v1"``); set by ``start``.
        api_key: the account's key (Bearer, or Basic with the key as user).
        faults: switchable faults (see ``Faults``).
        instances: every instance ever launched, by id (terminated ones keep their billing).
        ssh_keys: registered keys, by id: ``{"id", "name", "public_key"}``.
        launch_interval_s: at most one launch per this many seconds, else 429 (Lambda: 12).
        ssh_port: the port every instance's sshd listens on.
        terminating_polls: status reads an instance stays ``terminating`` before it is gone.
    """

    billing_increment_s = 60

    def __init__(
        self,
        api_key: str = "lambda-test-key",
        folder: Path | None = None,
        *,
        launch_interval_s: float = 12.0,
    ) -> None:
        self.instances: dict[str, Instance] = {}
        super().__init__(api_key, folder, self.instances)
        self.ssh_keys: dict[str, dict[str, str]] = {}
        self.instance_types = [[*t[:4], list(t[4])] for t in INSTANCE_TYPES]
        self.launch_interval_s = launch_interval_s
        self.terminating_polls = 1
        self.ssh_port = free_port()
        self.launch_attempts = 0
        self._last_launch = 0.0
        self._ips = itertools.count(2)

    def instance_by_name(self, name: str) -> Instance | None:
        return self.by_name(name)

    def set_capacity(self, type_name: str, regions: list[str]) -> None:
        for t in self.instance_types:
            if t[0] == type_name:
                t[4] = list(regions)

    def preempt(self, instance_id: str) -> None:
        """The host is reclaimed: sshd is killed and the instance shows ``preempted``."""
        inst = self.instances[instance_id]
        self._host.kill(inst)
        inst.status = "preempted"
        inst.ended = inst.ended or time.time()

    # -- HTTP -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        self.requests += 1
        route = urlsplit(path).path.rstrip("/")
        if not route.startswith("/api/v1/"):
            return json_reply(404, {"error": {"code": "global/not-found", "message": "Not found"}})
        route = route.removeprefix("/api/v1")
        if self.faults.unauthorized or not self._authorized(headers):
            return _error(
                401, INVALID_KEY, "Check your API key or create a new one, then try again."
            )
        if self.faults.take("rate_limit"):
            return self._too_many()
        if self.faults.take("server_error"):
            return _error(500, ("global/internal-error", "An internal server error occurred."))
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            return _error(400, INVALID)
        with self._lock:
            return self._route(method, route, payload)

    def _too_many(self) -> Reply:
        headers = {}
        if self.faults.retry_after is not None:
            headers["Retry-After"] = f"{self.faults.retry_after:g}"
        return json_reply(
            429,
            {"error": {"code": "global/rate-limited", "message": "Too many requests."}},
            headers,
        )

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return auth.removeprefix("Bearer ").strip() == self.api_key
        if auth.startswith("Basic "):
            try:
                user = base64.b64decode(auth.removeprefix("Basic ")).decode().split(":", 1)[0]
            except ValueError:
                return False
            return user == self.api_key
        return False

    def _route(self, method: str, route: str, payload: dict[str, Any]) -> Reply:
        m = re.fullmatch(r"/instances/([^/]+)", route)
        k = re.fullmatch(r"/ssh-keys/([^/]+)", route)
        if method == "GET" and route == "/instance-types":
            return json_reply(200, {"data": self._types_view()})
        if method == "GET" and route == "/instances":
            live = [i for i in self.instances.values() if i.status not in ("terminated",)]
            return json_reply(200, {"data": [self._view(i) for i in live]})
        if method == "GET" and m:
            return self._get(m.group(1))
        if method == "POST" and route == "/instance-operations/launch":
            return self._launch(payload)
        if method == "POST" and route == "/instance-operations/terminate":
            return self._terminate(payload)
        if method == "GET" and route == "/ssh-keys":
            return json_reply(200, {"data": list(self.ssh_keys.values())})
        if method == "POST" and route == "/ssh-keys":
            return self._add_key(payload)
        if method == "DELETE" and k:
            return self._delete_key(k.group(1))
        return json_reply(404, {"error": {"code": "global/not-found", "message": "Not found"}})

    def _types_view(self) -> dict[str, Any]:
        out = {}
        for name, desc, cents, gpus, regions in self.instance_types:
            out[name] = {
                "instance_type": {
                    "name": name,
                    "description": f"{gpus}x {desc}",
                    "gpu_description": desc,
                    "price_cents_per_hour": cents,
                    "specs": {
                        "vcpus": 26 * gpus,
                        "memory_gib": 225 * gpus,
                        "storage_gib": 512 * gpus,
                        "gpus": gpus,
                    },
                },
                "regions_with_capacity_available": [
                    {"name": r, "description": REGIONS.get(r, r)} for r in regions
                ],
            }
        return out

    def _add_key(self, payload: dict[str, Any]) -> Reply:
        name = payload.get("name")
        public = payload.get("public_key")
        if not isinstance(name, str) or not name or len(name) > 64:
            return _error(400, INVALID)
        if any(k["name"] == name for k in self.ssh_keys.values()):
            return _error(
                400, ("global/invalid-parameters", "An SSH key with this name already exists.")
            )
        if public is not None and not (
            isinstance(public, str) and public.startswith(("ssh-", "ecdsa-"))
        ):
            return _error(400, ("global/invalid-parameters", "Invalid public key."))
        key = {
            "id": secrets.token_hex(16),
            "name": name,
            "public_key": public or "ssh-ed25519 generated",
        }
        self.ssh_keys[key["id"]] = key
        return json_reply(200, {"data": key})

    def _delete_key(self, key_id: str) -> Reply:
        key = self.ssh_keys.get(key_id)
        if key is None:
            return _error(
                404, ("global/object-does-not-exist", "Specified SSH key does not exist.")
            )
        in_use = any(
            i.status in ("booting", "active") and key["name"] in i.data.get("ssh_key_names", [])
            for i in self.instances.values()
        )
        if in_use:
            return _error(400, ("ssh-keys/key-in-use", "The SSH key is in use by an instance."))
        del self.ssh_keys[key_id]
        return json_reply(200, {"data": {}})

    def _launch(self, p: dict[str, Any]) -> Reply:
        self.launch_attempts += 1
        now = time.time()
        if now - self._last_launch < self.launch_interval_s:
            return self._too_many()
        self._last_launch = now
        names = p.get("ssh_key_names")
        itype = next((t for t in self.instance_types if t[0] == p.get("instance_type_name")), None)
        if not p.get("region_name") or itype is None or not isinstance(names, list):
            return _error(400, INVALID)
        if int(p.get("quantity", 1)) > 1:
            return _error(400, ("global/invalid-parameters", "Requested too many instances."))
        if len(names) != 1:
            return _error(
                400, ("global/invalid-parameters", "Exactly one SSH key name is required.")
            )
        key = next((k for k in self.ssh_keys.values() if k["name"] == names[0]), None)
        if key is None:
            return _error(
                400, ("global/object-does-not-exist", "Specified SSH key does not exist.")
            )
        name = p.get("name")
        if name is not None and len(str(name)) > 64:
            return _error(400, INVALID)
        if self.faults.capacity or p["region_name"] not in itype[4]:
            return _error(400, CAPACITY)
        inst = Instance(
            id=secrets.token_hex(16),
            name=str(name or ""),
            price_per_hour=itype[2] / 100.0,
            created=now,
            status="booting",
        )
        inst.data = {"type": itype, "region": p["region_name"], "ssh_key_names": list(names)}
        self.instances[inst.id] = inst
        ip = f"127.0.0.{next(self._ips)}"
        env = {"LAMBDA_API_BASE_URL": f"{self.url}/api/v1"}
        self._host.boot(inst, key["public_key"], env, self.faults, host=ip, port=self.ssh_port)
        if self.faults.take("lose_create"):
            return _error(500, ("global/internal-error", "An internal server error occurred."))
        return json_reply(200, {"data": {"instance_ids": [inst.id]}})

    def _get(self, instance_id: str) -> Reply:
        inst = self.instances.get(instance_id)
        if inst is None or inst.status == "terminated":
            return _error(404, NOT_FOUND_INSTANCE)
        if inst.status == "booting":
            inst.polls += 1
            if inst.polls > self.faults.ready_polls:
                inst.status = "active"
                inst.billing_start = time.time()  # launched and passed health checks
        elif inst.status == "terminating":
            inst.polls += 1
            if inst.polls > self.terminating_polls:
                inst.status = "terminated"
                return _error(404, NOT_FOUND_INSTANCE)
        return json_reply(200, {"data": self._view(inst)})

    def _terminate(self, p: dict[str, Any]) -> Reply:
        ids = p.get("instance_ids")
        if not isinstance(ids, list) or not ids:
            return _error(400, INVALID)
        if self.faults.take("terminate_fails"):
            return _error(500, ("global/internal-error", "An internal server error occurred."))
        found = [self.instances.get(i) for i in ids]
        if any(i is None or i.status in ("terminated", "terminating") for i in found):
            return _error(404, NOT_FOUND_INSTANCE)
        out = []
        for inst in found:
            assert inst is not None
            self._host.kill(inst)
            if inst.status == "preempted":
                inst.status = "terminated"
            else:
                inst.status = "terminating"
                inst.polls = 0
            inst.ended = inst.ended or time.time()
            out.append(self._view(inst))
        return json_reply(200, {"data": {"terminated_instances": out}})

    def _view(self, inst: Instance) -> dict[str, Any]:
        name, desc, cents, gpus, _ = inst.data["type"]
        view: dict[str, Any] = {
            "id": inst.id,
            "name": inst.name,
            "status": inst.status,
            "ssh_key_names": inst.data["ssh_key_names"],
            "file_system_names": [],
            "region": {
                "name": inst.data["region"],
                "description": REGIONS.get(inst.data["region"], ""),
            },
            "instance_type": {
                "name": name,
                "description": f"{gpus}x {desc}",
                "gpu_description": desc,
                "price_cents_per_hour": cents,
                "specs": {
                    "vcpus": 26 * gpus,
                    "memory_gib": 225 * gpus,
                    "storage_gib": 512 * gpus,
                    "gpus": gpus,
                },
            },
            "hostname": inst.id[:12],
            "actions": {"terminate": {"available": inst.status in ("booting", "active")}},
            "tags": [],
        }
        if inst.status in ("active", "terminating", "unhealthy"):
            view["ip"] = inst.ssh_host
            view["private_ip"] = f"10.0.2.{int(inst.ssh_host.rsplit('.', 1)[1]) % 250}"
        return view


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Lambda Cloud API v1 emulator (instances are real sshd)"
    )
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default="lambda-test-key")
    args = ap.parse_args(argv)
    fake = LambdaFake(api_key=args.api_key)
    print(f"{fake.start(args.port)}/api/v1", flush=True)
    print(f"instances listen for SSH on port {fake.ssh_port}", flush=True)
    fake.serve_until_interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(main())
