"""A Hugging Face Hub stand-in for file downloads, as ``huggingface_hub.hf_hub_download`` uses it.

Serves ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` from an in-memory table, with
the headers the client reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the Hub's
error contract (``X-Error-Code: RepoNotFound | GatedRepo | EntryNotFound``). A gated repo answers
only to ``Authorization: Bearer <token>``. Point a client at it with ``HF_ENDPOINT``::

    python -m tests.fakes.hf_hub --port 8090   # serves one demo repo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


class FakeHub:
    """Repos as ``{repo_id: {filename: bytes}}``; ``gated`` repos need ``token``."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.token = token
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, files: dict[str, Any], *, gated: bool = False) -> None:
        """Publish a repo; dict values are written as JSON."""
        self.repos[repo_id] = {
            name: body if isinstance(body, bytes) else json.dumps(body).encode()
            for name, body in files.items()
        }
        if gated:
            self.gated.add(repo_id)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, port: int = 0) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(h.path.split("?", 1)[0]).lstrip("/")
        auth = h.headers.get("Authorization", "") == f"Bearer {self.token}"
        self.requests.append((h.command, path, auth))
        repo_id, sep, rest = path.partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if not sep or not filename:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", body)
        files = self.repos.get(repo_id)
        if files is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound",
                                       "X-Error-Message": "Repository not found"}, b"", body)  # fmt: skip
        if repo_id in self.gated and not auth:
            return self._send(h, 403, {"X-Error-Code": "GatedRepo",
                                       "X-Error-Message": "Access to model is restricted"}, b"", body)  # fmt: skip
        content = files.get(filename)
        if content is None:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound"}, b"", body)
        commit = hashlib.sha1(repo_id.encode() + revision.encode()).hexdigest()
        etag = hashlib.sha256(content).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/json"}
        return self._send(h, 200, headers, content, body)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], content: bytes, body: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        if body and content:
            h.wfile.write(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    hub = FakeHub()
    hub.add("demo/tiny-llama", {"config.json": {"model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 512}})  # fmt: skip
    hub.start(args.port)
    print(f"fake hub at {hub.url}; Ctrl-C to stop", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
