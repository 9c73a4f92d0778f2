"""What the API emulators share: a threaded HTTP server, switchable faults, and an instance
record with its real sshd and its billing clock. The APIs themselves live one per file."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .sshd import SSHD, free_port

Reply = tuple[int, dict[str, str], bytes]


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(body).encode(),
    )


@dataclasses.dataclass
class Faults:
    """Switches a test flips to make the emulator misbehave. Counters apply to the next N
    matching requests and count down.

    Attributes:
        capacity: every create is refused for lack of capacity.
        unauthorized: every request gets 401, whatever the key.
        rate_limit: the next N requests get 429 (with ``Retry-After: retry_after`` unless None).
        server_error: the next N requests get 500.
        lose_create: the next N creates happen, but the reply is a 500.
        terminate_fails: the next N terminates answer 500 and terminate nothing.
        ready_polls: status reads that show the instance still booting before it is ready.
        no_sshd: instances never start sshd (ports get mapped, SSH never answers).
        sshd_delay_s: sshd starts this long after the instance is created.
    """

    capacity: bool = False
    unauthorized: bool = False
    rate_limit: int = 0
    retry_after: float | None = 1.0
    server_error: int = 0
    lose_create: int = 0
    terminate_fails: int = 0
    ready_polls: int = 2
    no_sshd: bool = False
    sshd_delay_s: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def take(self, name: str) -> bool:
        """Consume one unit of counter ``name``; True when the fault fires."""
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False


@dataclasses.dataclass
class Instance:
    """An emulated instance: its sshd and its billing clock (``billing_start`` .. ``ended``)."""

    id: str
    name: str
    price_per_hour: float
    created: float
    billing_start: float | None = None
    ended: float | None = None
    status: str = "booting"
    polls: int = 0
    sshd: SSHD | None = None
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def billed_seconds(self, increment_s: int, now: float | None = None) -> int:
        if self.billing_start is None:
            return 0
        end = self.ended if self.ended is not None else (now or time.time())
        used = max(0.0, end - self.billing_start)
        return int(math.ceil(used / increment_s) * increment_s) if used > 0 else 0


class InstanceHost:
    """Starts and stops the sshd processes of one emulator's instances."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="lb-fake-"))
        self._timers: list[threading.Timer] = []

    def boot(
        self,
        inst: Instance,
        authorized_key: str,
        env: dict[str, str],
        faults: Faults,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        inst.ssh_host = host
        sshd = SSHD(self.folder / inst.id, authorized_key, env)
        sshd.host = host
        sshd.port = port or free_port()
        inst.sshd = sshd
        inst.ssh_port = sshd.port
        if faults.no_sshd:
            return
        if faults.sshd_delay_s > 0:
            t = threading.Timer(faults.sshd_delay_s, lambda: inst.ended is None and sshd.start())
            t.daemon = True
            t.start()
            self._timers.append(t)
        else:
            sshd.start()

    def kill(self, inst: Instance) -> None:
        if inst.sshd is not None:
            inst.sshd.stop()

    def close(self, instances: list[Instance]) -> None:
        for t in self._timers:
            t.cancel()
        for inst in instances:
            self.kill(inst)


class JsonServer:
    """``handler(method, path, headers, body) -> (status, headers, body)`` served on
    ``127.0.0.1:port`` from a daemon thread."""

    def __init__(self, handler: Callable[[str, str, dict[str, str], bytes], Reply]) -> None:
        self._handler = handler
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    def start(self, port: int = 0) -> str:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, out_headers, data = outer._handler(
                        self.command, self.path, headers, body
                    )
                except Exception as exc:  # an emulator bug must show up as a 500, not a hang
                    status, out_headers, data = json_reply(500, {"error": repr(exc)})
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class FakeCloud:
    """What both emulators share: the HTTP server, the instances' sshd processes, and the
    billing accessors that tests assert on. A subclass implements ``handle`` (its API) and
    passes the dict it keeps its instances in (named as its API names them: pods, instances).
    """

    billing_increment_s = 1

    def __init__(self, api_key: str, folder: Path | None, instances: dict[str, Instance]) -> None:
        self.api_key = api_key
        self.faults = Faults()
        self.requests = 0
        self._all = instances
        self._host = InstanceHost(folder)
        self.folder = self._host.folder  # every instance's root folder lives under it
        self._server = JsonServer(self.handle)
        self._lock = threading.RLock()
        self.url = ""

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        self.url = self._server.start(port)
        return self.url

    def stop(self) -> None:
        self._server.stop()
        self._host.close(list(self._all.values()))

    # -- what tests assert on ---------------------------------------------------------------
    def serve_until_interrupted(self) -> None:
        """Serve (already started) until Ctrl-C, then stop: a fake run as a program."""
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def running(self) -> list[str]:
        """Ids of instances that exist and bill (not terminated; booting ones included)."""
        return [i.id for i in self._all.values() if i.ended is None]

    def billed_seconds(self, instance_id: str) -> int:
        return self._all[instance_id].billed_seconds(self.billing_increment_s)

    def cost(self, instance_id: str) -> float:
        inst = self._all[instance_id]
        return inst.price_per_hour * self.billed_seconds(instance_id) / 3600.0

    def by_name(self, name: str) -> Instance | None:
        return next((i for i in self._all.values() if i.name == name), None)
