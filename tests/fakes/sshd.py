"""A real OpenSSH ``sshd`` per emulated instance, on a free loopback port.

Each instance gets its own folder (host key, config, ``authorized_keys`` holding only the key the
client passed, and a ``root/`` that plays the instance's disk) and its own environment through
``SetEnv``, so the client resolves the same variables it would read on a real pod.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

SSHD_BIN = "/usr/sbin/sshd"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def ed25519_key(path: Path) -> str:
    """A fresh key pair at ``path`` and ``path.pub`` (no passphrase); returns the public half."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_suffix(".pub").read_text().strip()


def free_port() -> int:
    """A loopback port nobody listens on right now.

    Under pytest-xdist each worker hands out ports from a band of its own below Linux's
    ephemeral range (32768-60999): a port chosen here is often listened on later (an sshd
    restarted on the same port, the Lambda emulator's one SSH port for every instance), and
    meanwhile neither another worker's ``free_port`` nor an outgoing connection can take it.
    """
    band = _worker_band()
    if band is not None:
        for _ in range(_BAND_SIZE):
            port = band + next(_band_offsets) % _BAND_SIZE
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        kernel_port: int = s.getsockname()[1]
        return kernel_port


_BAND_SIZE = 1000
_band_offsets = itertools.count()


def _worker_band() -> int | None:
    """The first port of this xdist worker's band (gw0: 20000, gw1: 21000, ...), or None."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit() or int(worker[2:]) >= 12:
        return None
    return 20000 + int(worker[2:]) * _BAND_SIZE


class SSHD:
    """One sshd process serving one emulated instance.

    Args:
        folder: the instance's folder (created); ``folder/root`` is its remote root.
        authorized_key: the only public key allowed in (an OpenSSH ``ssh-ed25519 ...`` line).
        env: variables every SSH session sees (``SetEnv``), besides the remote root and python.
        audit: record every command line sshd runs in ``commands.log`` (one per line), as an
            instance's process accounting would: what a session runs is the ``-c`` argument of
            the user's shell, readable by anyone in ``/proc/<pid>/cmdline``.
    """

    def __init__(
        self,
        folder: Path,
        authorized_key: str,
        env: Mapping[str, str] | None = None,
        *,
        audit: bool = False,
    ) -> None:
        self.folder = folder
        self.root = folder / "root"
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.authorized_key = authorized_key.strip()
        self.audit = audit
        self.env = {
            # The instance's own home: sessions must not run this machine's root dotfiles
            # (a pod has its own; a stale pyenv rehash lock in ~/.bashrc once hung every login).
            "HOME": str(self.root),
            "LORABURST_REMOTE_ROOT": str(self.root),
            "LORABURST_REMOTE_PYTHON": sys.executable,
            # The test run's thread limits (tests/conftest.py sets them under pytest-xdist):
            # sessions do not inherit sshd's environment.
            **{k: os.environ[k] for k in _THREAD_VARS if k in os.environ},
            **(env or {}),
        }

    @property
    def host_key_path(self) -> Path:
        return self.folder / "ssh_host_ed25519_key"

    def start(self) -> int:
        """Write the config and start sshd; return its port once it accepts connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        if not self.host_key_path.exists():
            self.regenerate_host_key()
        auth = self.folder / "authorized_keys"
        auth.write_text(self.authorized_key + "\n")
        auth.chmod(0o600)
        self.port = self.port or free_port()
        setenv = " ".join(f'{k}="{v}"' for k, v in self.env.items())
        cfg = self.folder / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress {self.host}\n"
            f"HostKey {self.host_key_path}\nPidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {auth}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n"
            "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
            f"SetEnv {setenv}\nLogLevel ERROR\nMaxStartups 50\nClientAliveInterval 0\n"
            + (f"ForceCommand {self._audit_script()}\n" if self.audit else "")
        )
        log = open(self.folder / "sshd.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [SSHD_BIN, "-D", "-e", "-f", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited: {(self.folder / 'sshd.log').read_text(errors='replace')}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return self.port
            time.sleep(0.02)
        raise RuntimeError(f"sshd on port {self.port} did not start")

    @property
    def commands_log(self) -> Path:
        return self.folder / "commands.log"

    def _audit_script(self) -> Path:
        # sshd runs the forced command instead of the client's, which it passes in
        # SSH_ORIGINAL_COMMAND ("internal-sftp" for the SFTP subsystem).
        script = self.folder / "audit.sh"
        script.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$SSH_ORIGINAL_COMMAND" >> {self.commands_log}\n'
            'if [ "$SSH_ORIGINAL_COMMAND" = internal-sftp ]; then\n'
            "  exec /usr/lib/openssh/sftp-server\n"
            "fi\n"
            'exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n'
        )
        script.chmod(0o755)
        return script

    def regenerate_host_key(self) -> None:
        """A new host key (used to emulate a changed host behind the same address)."""
        self.host_key_path.unlink(missing_ok=True)
        self.host_key_path.with_suffix(".pub").unlink(missing_ok=True)
        ed25519_key(self.host_key_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill sshd and every session it forked (the instance is gone)."""
        if self.proc is None:
            return
        # Sessions (and agents they started with setsid) live in other process groups: kill
        # every process whose environment names this instance's root.
        for pid in _pids_with_env("LORABURST_REMOTE_ROOT", str(self.root)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # Live connections are sshd children in sessions of their own: a dead host drops them.
        for pid in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None


def _pids_with_env(key: str, value: str) -> list[int]:
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            found.append(int(entry.name))
    return found
