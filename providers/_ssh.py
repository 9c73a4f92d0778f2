"""The SSH transport (paramiko): ``SSHHost`` implements the ``Host`` Protocol over one machine.

Connecting waits for sshd with a timeout, pins the host key on first contact under
``$LORABURST_HOME/known_hosts/<provider>-<machine id>`` and refuses a different one later, and
resolves the instance's remote root and interpreter from its environment
(``LORABURST_REMOTE_ROOT``, ``LORABURST_REMOTE_PYTHON``). Idempotent operations reconnect with
backoff once when the connection drops; paramiko and socket errors become ``TransportError``
here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import random
import shlex
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import paramiko
from loraburst._exceptions import ArtifactError, HostKeyMismatchError, TransportError
from loraburst._state.disk import local_io, remove_quietly
from loraburst._state.home import home, owner_only
from loraburst.remote import protocol
from loraburst.remote.protocol import BUNDLE_DIR, LOG_FILE

from ._base import Machine

__all__ = ["SSHHost", "known_hosts_path"]

log = logging.getLogger("loraburst.providers.ssh")
T = TypeVar("T")
_PID_FILE = "agent.pid"
_ENV_FILE = "agent.env"  # the agent's secrets on their way in: 0600, deleted at once
_DROPS = (paramiko.SSHException, OSError, EOFError)
# Bounds on a pulled tree: an adapter or checkpoint is a handful of files one or two deep.
_MAX_DEPTH = 16
_MAX_ENTRIES = 10_000
# The most of a file (or a command's output) read into memory from the instance.
_MAX_READ = 16 << 20


def known_hosts_path(provider: str, machine_id: str) -> Path:
    """Where the host key of ``machine_id`` is pinned."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{provider}-{machine_id}")
    folder = Path(home()) / "known_hosts"
    folder.mkdir(exist_ok=True, mode=0o700)
    owner_only(folder)
    return folder / safe


class _PinPolicy(paramiko.MissingHostKeyPolicy):
    """Trust on first use, per machine (not per address: RunPod remaps ports on reset)."""

    def __init__(self, pin: Path, label: str) -> None:
        self.pin = pin
        self.label = label

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        line = f"{key.get_name()} {key.get_base64()}"
        if not self.pin.exists():
            self.pin.write_text(line + "\n")
            return
        if self.pin.read_text().strip() != line:
            raise HostKeyMismatchError(
                f"{self.label} at {hostname} presented a different host key than the one pinned "
                f"on first connect ({self.pin}); refusing to connect. If the instance was really "
                f"rebuilt, delete that file."
            )


class SSHHost:
    """A work directory on a machine reached over SSH.

    Args:
        machine: the ready machine (its ``ssh`` endpoint is used).
        key_path: the private key (None: paramiko's agent/default keys).
        workdir: the run's work directory; a prefix of ``machine.workdir_root`` is replaced by
            the root the instance reports, a relative path is taken under that root.
        python: the interpreter used when the instance does not set ``LORABURST_REMOTE_PYTHON``.
        connect_timeout_s: how long to wait for sshd to accept us.
        keepalive_s: SSH keepalive interval.
    """

    def __init__(
        self,
        machine: Machine,
        key_path: Path | None,
        workdir: str,
        *,
        python: str | None = None,
        connect_timeout_s: float = 120.0,
        keepalive_s: int = 15,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        if machine.ssh is None:
            raise TransportError(
                f"{machine.provider} instance {machine.id} has no SSH endpoint yet",
                provider=machine.provider,
            )
        self.machine = machine
        self.endpoint = machine.ssh
        self.key_path = key_path
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._default_python = python or machine.python
        self._requested_workdir = workdir
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.root = ""
        self.same_environment = False  # another machine, its own interpreter
        self._python = self._default_python
        self.workdir = workdir
        self.label = f"{machine.provider} instance {machine.id}"

    # -- connection -------------------------------------------------------------------------
    @property
    def python(self) -> str:
        return self._python

    def connect(self) -> SSHHost:
        """Wait until sshd accepts us (bounded), then resolve the root and make the workdir.

        Raises:
            HostKeyMismatchError: the host key differs from the pinned one.
            TransportError: not reachable within ``connect_timeout_s`` (says why).
        """
        deadline = time.monotonic() + self.connect_timeout_s
        delay = 0.25
        reason = "no attempt made"
        while True:
            try:
                self._open(max(1.0, min(10.0, deadline - time.monotonic())))
                break
            except HostKeyMismatchError:
                raise
            except paramiko.AuthenticationException as exc:
                # The key may not be installed yet (the instance is still starting).
                reason = f"authentication refused ({exc})"
            except (paramiko.SSHException, OSError, EOFError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._drop()
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"SSH to {self.label} ({self.endpoint.user}@{self.endpoint.host}:"
                    f"{self.endpoint.port}) was not ready after {self.connect_timeout_s:.0f}s: "
                    f"{reason}",
                    provider=self.machine.provider,
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._resolve()
        return self

    def _open(self, timeout: float) -> None:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(
            _PinPolicy(known_hosts_path(self.machine.provider, self.machine.id), self.label)
        )
        self._client = client
        client.connect(
            self.endpoint.host,
            port=self.endpoint.port,
            username=self.endpoint.user,
            key_filename=str(self.key_path) if self.key_path else None,
            look_for_keys=self.key_path is None,
            allow_agent=self.key_path is None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(self.keepalive_s)

    def _resolve(self) -> None:
        script = (
            'printf "%s\\n%s\\n" "${LORABURST_REMOTE_ROOT:-$HOME/loraburst}" '
            f'"${{LORABURST_REMOTE_PYTHON:-{self._default_python}}}"'
        )
        rc, out, err = self._exec(script, timeout=30)
        lines = out.splitlines()
        if rc != 0 or len(lines) < 2:
            raise TransportError(f"could not read the environment of {self.label}: {err[-300:]}")
        self.root, self._python = lines[0].rstrip("/"), lines[1]
        base = self.machine.workdir_root.rstrip("/")
        req = self._requested_workdir
        if req == base or req.startswith(base + "/"):
            req = self.root + req[len(base) :]
        elif not req.startswith("/"):
            req = f"{self.root}/{req}"
        self.workdir = req
        rc, _, err = self._exec(f"mkdir -p {shlex.quote(self.workdir)}", timeout=30)
        if rc != 0:
            raise TransportError(f"could not create {self.workdir} on {self.label}: {err[-300:]}")

    def _drop(self) -> None:
        for closer in (self._sftp, self._client):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self._sftp = None
        self._client = None

    def _reconnect(self) -> None:
        self._drop()
        saved = self.connect_timeout_s
        self.connect_timeout_s = self.reconnect_timeout_s
        try:
            self.connect()
        finally:
            self.connect_timeout_s = saved

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a dropped connection reconnect (with backoff) and try once more."""
        try:
            return fn()
        except HostKeyMismatchError:
            raise
        except _DROPS as exc:
            log.info("SSH to %s dropped during %s (%s); reconnecting", self.label, what, exc)
            time.sleep(random.uniform(0.1, 0.5))
            try:
                self._reconnect()
                return fn()
            except TransportError:
                raise
            except _DROPS as exc2:
                raise TransportError(f"{what} on {self.label} failed: {exc2}") from exc2

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            if self._client is None:
                raise OSError("not connected")
            self._sftp = self._client.open_sftp()
        return self._sftp

    def _exec(
        self, command: str, timeout: float = 600.0, stdin: bytes | None = None
    ) -> tuple[int, str, str]:
        if self._client is None:
            raise OSError("not connected")
        chan = self._client.get_transport().open_session(timeout=30)  # type: ignore[union-attr]
        chan.settimeout(timeout)
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:
            if chan.recv_ready():
                _keep_tail(out, chan.recv(65536))
            elif chan.recv_stderr_ready():
                _keep_tail(err, chan.recv_stderr(65536))
            elif chan.exit_status_ready():
                while chan.recv_ready():
                    _keep_tail(out, chan.recv(65536))
                while chan.recv_stderr_ready():
                    _keep_tail(err, chan.recv_stderr(65536))
                break
            elif time.monotonic() > deadline:
                chan.close()
                raise TransportError(f"command on {self.label} timed out after {timeout:.0f}s")
            else:
                if chan.closed and not chan.exit_status_ready():
                    raise EOFError("channel closed before the command finished")
                time.sleep(0.005)
        rc = chan.recv_exit_status()
        chan.close()
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.workdir, rel)

    # -- Host -------------------------------------------------------------------------------
    def run(self, command: str, timeout: float = 600.0) -> tuple[int, str, str]:
        """Run ``command`` with ``sh`` in the work directory; return (rc, stdout, stderr)."""
        # A newline, not "&&": a trailing "&" in ``command`` must not background the cd too.
        full = f"cd {shlex.quote(self.workdir)} || exit 97\n{command}"
        try:
            return self._exec(full, timeout=timeout)
        except _DROPS as exc:
            self._drop()
            raise TransportError(f"command on {self.label} failed: {exc}") from exc

    def upload_bundle(self, local_path: Path, sha256: str) -> bool:
        """SFTP the bundle to ``<root>/bundles/<sha256>.tar`` unless it is there, then extract it
        into ``<workdir>/bundle`` with the remote interpreter. Returns False when the transfer
        was skipped because a bundle with that sha256 was already on the instance."""
        bundles = f"{self.root}/bundles"
        remote = f"{bundles}/{sha256}.tar"

        def put() -> bool:
            sftp = self._sftp_client()
            try:
                sftp.stat(remote)
                return False
            except FileNotFoundError:
                pass
            self._exec(f"mkdir -p {shlex.quote(bundles)}", timeout=30)
            part = f"{remote}.part"
            sftp.put(str(local_path), part, confirm=True)
            sftp.posix_rename(part, remote)
            return True

        uploaded = self._retrying("bundle upload", put)
        dest = self._abs(BUNDLE_DIR)
        source = Path(protocol.__file__).read_bytes()
        cmd = (
            f"rm -rf {shlex.quote(dest)} && {shlex.quote(self._python)} - extract "
            f"{shlex.quote(remote)} {shlex.quote(dest)} && printf %s {sha256} > "
            f"{shlex.quote(dest + '/.sha256')}"
        )
        rc, _, err = self._retrying(
            "bundle extract", lambda: self._exec(cmd, timeout=600, stdin=source)
        )
        if rc != 0:
            raise TransportError(
                f"extracting the bundle on {self.label} failed (exit {rc}): {err[-800:]}"
            )
        return uploaded

    def provide_model(self, local_dir: Path, digest: Callable[[], str]) -> str:
        """Upload a model folder to ``<root>/models/<digest>`` once per instance.

        Files go to a ``.part`` folder, renamed when every file is there, so a folder under its
        final name is always complete and later jobs on the instance reuse it.
        """
        name = digest()
        models = f"{self.root}/models"
        final = f"{models}/{name}"
        part = f"{final}.part"

        def put() -> None:
            sftp = self._sftp_client()
            try:
                sftp.stat(f"{final}/config.json")
                return
            except FileNotFoundError:
                pass
            self._exec(f"mkdir -p {shlex.quote(part)}", timeout=30)
            for p in sorted(local_dir.rglob("*")):
                rel = p.relative_to(local_dir).as_posix()
                if p.is_symlink() or not p.is_file() or rel.startswith("."):
                    continue
                target = f"{part}/{rel}"
                if "/" in rel:
                    self._exec(f"mkdir -p {shlex.quote(posixpath.dirname(target))}", timeout=30)
                try:
                    if sftp.stat(target).st_size == p.stat().st_size:
                        continue  # sent before a dropped connection
                except FileNotFoundError:
                    pass
                sftp.put(str(p), target, confirm=True)
            # Another job may have placed the same model meanwhile: then drop our copy.
            rc, _, err = self._exec(
                f"mv -T {shlex.quote(part)} {shlex.quote(final)} || "
                f"{{ test -f {shlex.quote(final + '/config.json')} && rm -rf {shlex.quote(part)}; }}",
                timeout=600,
            )
            if rc != 0:
                raise TransportError(f"could not place the model on {self.label}: {err[-300:]}")

        self._retrying("model upload", put)
        return final

    def start_agent(self, env: Mapping[str, str]) -> None:
        """Start the agent detached (``setsid nohup``) so that it outlives this connection.

        ``env`` may hold keys (AWS, a provider's), so it never travels on a command line, which
        every user of the instance can read in ``/proc/<pid>/cmdline``: it goes through the
        command's standard input into ``agent.env``, created 0600, which the shell sources into
        the agent's environment and deletes before the agent starts. Never logged either.
        """
        exports = "".join(
            f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if _valid_name(k)
        )
        code = shlex.quote(self._abs(f"{BUNDLE_DIR}/code"))
        cmd = (
            f"umask 077 && cat > {_ENV_FILE}.tmp && mv -f {_ENV_FILE}.tmp {_ENV_FILE} || exit 96\n"
            f". ./{_ENV_FILE} || exit 95\n"
            f"rm -f {_ENV_FILE}\n"
            f"PYTHONPATH={code} PYTHONUNBUFFERED=1 setsid nohup "
            f"{shlex.quote(self._python)} -m loraburst.remote.agent {shlex.quote(self.workdir)} "
            f">> {LOG_FILE} 2>&1 < /dev/null & echo $! > {_PID_FILE}"
        )
        full = f"cd {shlex.quote(self.workdir)} || exit 97\n{cmd}"
        try:
            rc, _, _ = self._exec(full, timeout=60, stdin=exports.encode())
        except _DROPS as exc:
            self._drop()
            raise TransportError(f"starting the agent on {self.label} failed: {exc}") from None
        if rc != 0:
            # Not stderr: a shell complaining about agent.env may quote a line of it.
            raise TransportError(f"starting the agent on {self.label} failed (exit {rc})")
        log.info("agent started on %s", self.label)

    def agent_alive(self) -> bool:
        script = (
            f'pid=$(cat {_PID_FILE} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && '
            "[ \"$(cut -d')' -f2 /proc/$pid/stat 2>/dev/null | cut -d' ' -f2)\" != Z ]"
        )
        rc, _, _ = self._retrying("agent check", lambda: self.run(script, timeout=30))
        return rc == 0

    def read_text(self, rel: str) -> str | None:
        """A small file of the work directory (None when missing). At most its last
        ``_MAX_READ`` bytes: the instance decides how big its files are, this client's memory
        does not (a log's tail is what the callers want; a huge state.json fails to parse)."""

        def read() -> str | None:
            try:
                with self._sftp_client().open(self._abs(rel), "r") as f:
                    size = f.stat().st_size or 0
                    if size > _MAX_READ:
                        f.seek(size - _MAX_READ)
                    data: bytes = f.read(_MAX_READ)
            except FileNotFoundError:
                return None
            return data.decode("utf-8", errors="replace")

        return self._retrying(f"reading {rel}", read)

    def write_text(self, rel: str, text: str) -> None:
        path = self._abs(rel)
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")

        def write() -> None:
            sftp = self._sftp_client()
            with sftp.open(tmp, "w") as f:
                f.write(text.encode("utf-8"))
            sftp.posix_rename(tmp, path)

        self._retrying(f"writing {rel}", write)

    def fetch_tree(self, rel: str, dest: Path) -> None:
        """Copy a file or folder of the work directory to ``dest`` (replacing it).

        The instance is not trusted: every name it lists must be one plain path component (no
        ``/``, ``..`` or NUL) so that nothing lands outside ``dest``; links, devices and FIFOs
        are refused, not followed; the tree is bounded in depth and entries.

        Raises:
            ArtifactError: the instance listed an unsafe name or a non-regular file.
            LocalStorageError: ``dest`` could not be written (disk full, quota, read-only,
                permission); never retried as if the connection had dropped.
            TransportError: the connection dropped twice.

        Whatever fails, nothing of the pull is left at ``dest``.
        """

        def fetch() -> None:
            with local_io(dest):
                _clear(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._get(self._sftp_client(), self._abs(rel), dest, 0, [0])
            except BaseException:
                remove_quietly(dest)  # a half-pulled tree must never look like a pulled one
                raise

        self._retrying(f"fetching {rel}", fetch)

    def _get(
        self, sftp: paramiko.SFTPClient, remote: str, dest: Path, depth: int, count: list[int]
    ) -> None:
        mode = sftp.lstat(remote).st_mode or 0  # lstat: a link is refused, never followed
        self._get_entry(sftp, remote, mode, dest, depth, count)

    def _get_entry(
        self,
        sftp: paramiko.SFTPClient,
        remote: str,
        mode: int,
        dest: Path,
        depth: int,
        count: list[int],
    ) -> None:
        if stat.S_ISREG(mode):
            self._download(sftp, remote, dest)
            return
        if not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise ArtifactError(f"{self.label}: {remote} is {kind}; refusing to pull it")
        if depth >= _MAX_DEPTH:
            raise ArtifactError(f"{self.label}: {remote} is nested over {_MAX_DEPTH} deep")
        with local_io(dest):
            dest.mkdir()
        for entry in sftp.listdir_attr(remote):
            name = entry.filename
            if not _plain_name(name):
                raise ArtifactError(
                    f"{self.label} listed {name!r} in {remote}, which is not a plain file name; "
                    "refusing to pull it (it would land outside the destination)"
                )
            count[0] += 1
            if count[0] > _MAX_ENTRIES:
                raise ArtifactError(f"{self.label}: {remote} holds over {_MAX_ENTRIES} entries")
            # The listing's own attributes (sshd takes them with lstat): no round trip each.
            entry_mode = entry.st_mode or 0
            self._get_entry(sftp, f"{remote}/{name}", entry_mode, dest / name, depth + 1, count)

    @staticmethod
    def _download(sftp: paramiko.SFTPClient, remote: str, dest: Path) -> None:
        """One file, read from the instance in pipelined requests, written with every local
        failure told apart from the connection's."""
        with sftp.open(remote, "rb") as src:
            src.prefetch(max_concurrent_requests=64)
            with local_io(dest):
                # "x": a name that is already there (a duplicate in a listing) is not reused.
                out = open(dest, "xb", buffering=0)  # noqa: SIM115 - closed below, mapped
            try:
                while block := src.read(1 << 20):
                    with local_io(dest):
                        out.write(block)
            finally:
                with local_io(dest):
                    out.close()

    def close(self) -> None:
        self._drop()


def _keep_tail(buf: bytearray, data: bytes) -> None:
    """Append, keeping at most the last ``_MAX_READ`` bytes (callers use output's tail)."""
    buf += data
    if len(buf) > _MAX_READ:
        del buf[: len(buf) - _MAX_READ]


def _plain_name(name: object) -> bool:
    """One path component that stays in its folder once joined to it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def _clear(dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()


def _valid_name(name: str) -> bool:
    return name.replace("_", "a").isalnum() and not name[0].isdigit()
