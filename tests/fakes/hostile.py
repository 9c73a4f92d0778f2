"""A hostile instance: an SSH server (paramiko, on loopback) that serves one instance folder
honestly, except that its SFTP listings lie.

A real sshd can only list names that exist on disk, and a file name cannot hold ``/``; a rented
machine runs whatever server its owner likes, so a test needs one that lists ``../../x`` or
``/abs/x``. ``lies`` maps a folder of the instance (an absolute path on it) to extra entries:
``{name: content}``. Those names show up in that folder's listing as regular files, and reading
``<folder>/<name>`` returns ``content``. Everything else — commands (run with ``/bin/sh -c`` in
the instance's environment), reads, writes, renames — is served from ``root`` as sshd would.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface

from .sshd import ed25519_key


class _Handle(SFTPHandle):
    def __init__(self, f: Any, flags: int = 0) -> None:
        super().__init__(flags)
        self.readfile = f
        self.writefile = f
        self._f = f

    def stat(self) -> Any:
        try:
            return SFTPAttributes.from_stat(os.fstat(self._f.fileno()))
        except (OSError, io.UnsupportedOperation):
            size = len(self._f.getvalue())
            attrs = SFTPAttributes()
            attrs.st_size, attrs.st_mode = size, stat.S_IFREG | 0o644
            return attrs


class _SFTP(SFTPServerInterface):
    def __init__(self, server: Any, *args: Any, lies: Mapping[str, Mapping[str, bytes]], **kw: Any):
        super().__init__(server, *args, **kw)
        self.lies = lies

    def _lie(self, path: str) -> bytes | None:
        for folder, entries in self.lies.items():
            prefix = folder.rstrip("/") + "/"
            if path.startswith(prefix) and path[len(prefix) :] in entries:
                return entries[path[len(prefix) :]]
        return None

    @staticmethod
    def _err(exc: OSError) -> int:
        return SFTPServer.convert_errno(exc.errno)

    def list_folder(self, path: str) -> Any:
        try:
            out = []
            for name in os.listdir(path):
                attrs = SFTPAttributes.from_stat(os.lstat(os.path.join(path, name)))
                attrs.filename = name
                out.append(attrs)
        except OSError as exc:
            return self._err(exc)
        for name, content in self.lies.get(path.rstrip("/"), {}).items():
            attrs = SFTPAttributes()
            attrs.filename, attrs.st_size = name, len(content)
            attrs.st_mode = stat.S_IFREG | 0o644
            out.append(attrs)
        return out

    def stat(self, path: str) -> Any:
        return self._attrs(path, os.stat)

    def lstat(self, path: str) -> Any:
        return self._attrs(path, os.lstat)

    def _attrs(self, path: str, fn: Any) -> Any:
        lie = self._lie(path)
        if lie is not None:
            attrs = SFTPAttributes()
            attrs.st_size, attrs.st_mode = len(lie), stat.S_IFREG | 0o644
            return attrs
        try:
            return SFTPAttributes.from_stat(fn(path))
        except OSError as exc:
            return self._err(exc)

    def open(self, path: str, flags: int, attr: Any) -> Any:
        lie = self._lie(path)
        if lie is not None:
            return _Handle(io.BytesIO(lie), flags)
        mode = "rb"
        if flags & os.O_WRONLY or flags & os.O_RDWR:
            mode = "ab" if flags & os.O_APPEND else "wb" if flags & os.O_TRUNC else "r+b"
            if flags & os.O_CREAT and not os.path.exists(path):
                mode = "wb"
        try:
            return _Handle(open(path, mode), flags)  # noqa: SIM115 - the handle closes it
        except OSError as exc:
            return self._err(exc)

    def remove(self, path: str) -> int:
        try:
            os.remove(path)
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        try:
            os.replace(oldpath, newpath)
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    posix_rename = rename

    def mkdir(self, path: str, attr: Any) -> int:
        try:
            os.mkdir(path)
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK


class _Server(paramiko.ServerInterface):
    def __init__(self, instance: HostileInstance) -> None:
        self.instance = instance

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.get_base64() == self.instance.authorized_key.split()[1]:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(
            target=self.instance._exec, args=(channel, command.decode()), daemon=True
        ).start()
        return True


class HostileInstance:
    """See the module docstring. ``start()`` returns the port; log in as any user with the key
    whose public line is ``authorized_key``."""

    def __init__(
        self,
        folder: Path,
        authorized_key: str,
        lies: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> None:
        self.folder = folder
        self.root = folder / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.authorized_key = authorized_key.strip()
        self.lies: dict[str, dict[str, bytes]] = {k: dict(v) for k, v in (lies or {}).items()}
        self.host = "127.0.0.1"
        self.port = 0
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LORABURST_REMOTE_ROOT": str(self.root),
            "LORABURST_REMOTE_PYTHON": sys.executable,
        }
        key_file = folder / "host_key"
        ed25519_key(key_file)
        self._host_key = paramiko.Ed25519Key.from_private_key_file(str(key_file))
        self._sock: socket.socket | None = None
        self._transports: list[paramiko.Transport] = []

    def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(16)
        self._sock = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self.port

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self._host_key)
            transport.set_subsystem_handler("sftp", SFTPServer, _SFTP, lies=self.lies)
            self._transports.append(transport)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=_Server(self))

    def _exec(self, channel: paramiko.Channel, command: str) -> None:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        def feed() -> None:
            with contextlib.suppress(OSError):
                while data := channel.recv(65536):
                    proc.stdin.write(data)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]

        threading.Thread(target=feed, daemon=True).start()
        err = threading.Thread(
            target=lambda: channel.sendall_stderr(proc.stderr.read()),  # type: ignore[union-attr]
            daemon=True,
        )
        err.start()
        with contextlib.suppress(OSError):
            while data := proc.stdout.read1(65536):
                channel.sendall(data)
        err.join()
        channel.send_exit_status(proc.wait())
        channel.close()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        for t in self._transports:
            t.close()
