"""A Hugging Face Hub emulator: the part of its HTTP API that ``huggingface_hub`` uses to create
a model repo, commit files (inline and through Git LFS "basic" transfers) and list them back.

Endpoints (as ``huggingface_hub``'s ``HfApi.create_repo``, ``create_commit`` and
``model_info(files_metadata=True)`` call them):

* ``POST /api/repos/create`` ``{"name", "organization", "visibility" (or "private"), "type"}`` -> ``{"url"}``; 409
  when the repo exists (``exist_ok`` turns that into success on the client).
* ``POST /api/models/{repo}/preupload/{revision}`` -> each file's ``uploadMode`` (``lfs`` for
  weights and anything over 1 MB, else ``regular``).
* ``POST /{repo}.git/info/lfs/objects/batch`` (git-lfs batch API) -> ``basic`` upload and
  ``verify`` actions; ``PUT /lfs/{oid}?X-Amz-Signature=...`` (pre-signed, no token) stores the
  object after checking its sha256.
* ``POST /api/models/{repo}/commit/{revision}`` (NDJSON: header, ``file`` base64, ``lfsFile``)
  -> ``{"commitOid", "commitUrl"}``.
* ``POST /api/validate-yaml`` -> the README's front matter checked as YAML metadata.
* ``GET /api/models/{repo}[/revision/{rev}]`` -> ``siblings`` with sizes and LFS sha256.

Xet storage is not emulated: clients run with ``HF_HUB_DISABLE_XET=1`` (the hub still accepts
LFS uploads). Every request needs ``Authorization: Bearer <token>``.

Run standalone: ``python -m tests.fakes.hub --port 0 --token T`` (prints the URL to use as
``HF_ENDPOINT``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from ._server import JsonServer, Reply, json_reply

_LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclasses.dataclass
class Repo:
    """A model repo: its files at the head of ``main`` (path -> bytes) and its commits."""

    id: str
    private: bool
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    lfs: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> sha256 (LFS files)
    commits: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class HubFake:
    """The emulator's state (``repos``, ``lfs_objects``) and its HTTP endpoint."""

    def __init__(self, token: str = "hf_test") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.user = "tester"
        self._lock = threading.Lock()
        self._server = JsonServer(self.handle)
        self.url = ""

    def start(self, port: int = 0) -> str:
        self.url = self._server.start(port)
        return self.url

    def stop(self) -> None:
        self._server.stop()

    # -- routing -----------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        url = urlsplit(path)
        route = unquote(url.path)
        self.requests.append((method, route))
        if method == "PUT" and (m := re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", route)):
            # Like the hub's pre-signed storage URLs: no token, a signature in the query.
            if f"X-Amz-Signature={self._sign(m['oid'])}" not in (url.query or ""):
                return json_reply(403, {"error": "bad or missing signature"})
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return json_reply(400, {"error": "sha256 does not match the object id"})
            with self._lock:
                self.lfs_objects[m["oid"]] = body
            return 200, {}, b""
        if headers.get("authorization") != f"Bearer {self.token}":
            return json_reply(401, {"error": "Invalid credentials in Authorization header"})
        with self._lock:
            if method == "POST" and route == "/api/repos/create":
                return self._create(json.loads(body))
            if method == "POST" and route == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if method == "GET" and route == "/api/whoami-v2":
                return json_reply(200, {"name": self.user, "type": "user", "orgs": []})
            if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", route):
                return self._preupload(m["repo"], json.loads(body))
            if m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", route):
                return self._batch(m["repo"], json.loads(body))
            if m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/verify", route):
                oid = json.loads(body)["oid"]
                ok = oid in self.lfs_objects
                return json_reply(200 if ok else 404, {"ok": ok})
            if m := re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", route):
                return self._commit(m["repo"], body)
            if method == "GET" and (
                m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", route)
            ):
                return self._info(m["repo"])
        return json_reply(404, {"error": f"no route {method} {route}"})

    # -- endpoints ---------------------------------------------------------------------------
    def _sign(self, oid: str) -> str:
        return hmac.new(self.token.encode(), oid.encode(), "sha256").hexdigest()[:32]

    def _repo_or_404(self, repo_id: str) -> Repo | Reply:
        repo = self.repos.get(repo_id)
        if repo is None:
            return json_reply(
                404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            )
        return repo

    def _create(self, payload: dict[str, Any]) -> Reply:
        if payload.get("type", "model") != "model":
            return json_reply(400, {"error": "only model repos are emulated"})
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            return json_reply(
                409,
                {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"},
            )
        # Current clients send "visibility"; older ones a "private" flag.
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        self.repos[repo_id] = Repo(repo_id, private == "private")
        return json_reply(
            200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": secrets.token_hex(12)}
        )

    def _validate_yaml(self, payload: dict[str, Any]) -> Reply:
        """The README's front matter must be a YAML mapping (the hub's model card metadata)."""
        import yaml

        m = re.match(r"---\n(.*?)\n---\n", payload.get("content", ""), re.S)
        if m is None:
            return json_reply(200, {"errors": [], "warnings": [{"message": "empty metadata"}]})
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as exc:
            return json_reply(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if not isinstance(meta, dict):
            return json_reply(400, {"errors": [{"message": "metadata must be a mapping"}]})
        return json_reply(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, payload: dict[str, Any]) -> Reply:
        repo = self._repo_or_404(repo_id)
        if not isinstance(repo, Repo):
            return repo
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(_LFS_SUFFIXES) or int(f["size"]) > 1_000_000
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": None})  # fmt: skip
        return json_reply(200, {"files": files, "commitOid": repo.sha})

    def _batch(self, repo_id: str, payload: dict[str, Any]) -> Reply:
        if repo_id not in self.repos:
            return json_reply(404, {"message": "Repository not found"})
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {
                        "href": f"{self.url}/lfs/{obj['oid']}?X-Amz-Signature={self._sign(obj['oid'])}"
                    },
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return json_reply(200, {"transfer": "basic", "objects": objects},
                          {"Content-Type": "application/vnd.git-lfs+json"})  # fmt: skip

    def _commit(self, repo_id: str, body: bytes) -> Reply:
        repo = self._repo_or_404(repo_id)
        if not isinstance(repo, Repo):
            return repo
        header: dict[str, Any] = {}
        changes: dict[str, tuple[bytes, str | None]] = {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                changes[value["path"]] = (base64.b64decode(value["content"]), None)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None or len(data) != int(value["size"]):
                    return json_reply(
                        422, {"error": f"LFS object of {value['path']} was not uploaded"}
                    )
                changes[value["path"]] = (data, value["oid"])
            elif key == "deletedFile":
                repo.files.pop(value["path"], None)
                repo.lfs.pop(value["path"], None)
            else:
                return json_reply(400, {"error": f"unsupported commit operation {key!r}"})
        for path, (data, oid) in changes.items():
            repo.files[path] = data
            if oid:
                repo.lfs[path] = oid
            else:
                repo.lfs.pop(path, None)
        oid = hashlib.sha1(f"{repo_id}{time.time()}{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append(
            {"oid": oid, "summary": header.get("summary"), "files": sorted(changes)}
        )
        return json_reply(200, {"commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                                "pullRequestUrl": None})  # fmt: skip

    def _info(self, repo_id: str) -> Reply:
        repo = self._repo_or_404(repo_id)
        if not isinstance(repo, Repo):
            return repo
        siblings = []
        for path, data in sorted(repo.files.items()):
            entry: dict[str, Any] = {"rfilename": path, "size": len(data),
                                     "blobId": hashlib.sha1(data).hexdigest()}  # fmt: skip
            if path in repo.lfs:
                entry["lfs"] = {"sha256": repo.lfs[path], "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        return json_reply(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha,
                                "private": repo.private, "siblings": siblings, "tags": []})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="hf_test")
    args = parser.parse_args()
    fake = HubFake(args.token)
    print(fake.start(args.port), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
