"""The SSH transport against real sshd: pinning, bundle upload, detached agent, SFTP."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import stat
import tarfile
import time
from pathlib import Path

import paramiko
import pytest
from loraburst._exceptions import HostKeyMismatchError, TransportError
from loraburst.providers import LaunchRequest, Machine, Offer, _keys
from loraburst.providers._ssh import SSHHost, known_hosts_path
from loraburst.providers.ssh import SSHProvider, parse_target

from tests.fakes.fixtures import SSHDHost

AGENT = """
import json, os, sys, time
work = sys.argv[1]
with open(os.path.join(work, "state.json"), "w") as f:
    json.dump({"phase": "training", "token_len": len(os.environ.get("SECRET_TOKEN", ""))}, f)
os.makedirs(os.path.join(work, "adapter", "sub"), exist_ok=True)
open(os.path.join(work, "adapter", "a.bin"), "wb").write(bytes(range(256)) * 64)
open(os.path.join(work, "adapter", "sub", "b.txt"), "w").write("nested")
print("agent up", flush=True)
time.sleep(float(os.environ.get("AGENT_SLEEP", "1.5")))
"""


def _bundle(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "bundle.tar"
    files = {
        "spec.json": b"{}",
        "code/loraburst/__init__.py": b"",
        "code/loraburst/remote/__init__.py": b"",
        "code/loraburst/remote/agent.py": AGENT.encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _connect(sshd_host: SSHDHost, job: str = "j1") -> SSHHost:
    provider = SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=5)
    offer = provider.offers()[0]
    machine = provider.launch(LaunchRequest(tag=f"lb-{job}-1", offer=offer, public_key=""))
    host = provider.connect(machine, None, f"{machine.workdir_root}/runs/{job}")
    assert isinstance(host, SSHHost)
    return host


def test_root_and_python_come_from_the_instance(sshd_host: SSHDHost) -> None:
    import sys

    host = _connect(sshd_host)
    try:
        assert host.workdir == f"{sshd_host.root}/runs/j1"
        assert host.python == sys.executable
        assert host.run("pwd") == (0, f"{sshd_host.root}/runs/j1\n", "")
        assert host.run("exit 3")[0] == 3
    finally:
        host.close()


def test_upload_extract_start_follow_fetch(
    sshd_host: SSHDHost, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bundle, sha = _bundle(tmp_path)
    host = _connect(sshd_host)
    try:
        assert host.upload_bundle(bundle, sha) is True
        assert (sshd_host.root / "bundles" / f"{sha}.tar").read_bytes() == bundle.read_bytes()
        assert host.read_text("bundle/spec.json") == "{}"
        assert host.upload_bundle(bundle, sha) is False  # same sha: no transfer
        secret = "s3cr3t-'quoted' $HOME"
        host.start_agent({"SECRET_TOKEN": secret})
        assert host.agent_alive()
        deadline = time.time() + 10
        while host.read_text("state.json") is None and time.time() < deadline:
            time.sleep(0.1)
        state = json.loads(host.read_text("state.json") or "{}")
        assert state["token_len"] == len(secret)  # quoting kept the value intact
        time.sleep(0.3)
        host.fetch_tree("adapter", tmp_path / "pulled")
        assert (tmp_path / "pulled" / "a.bin").read_bytes() == bytes(range(256)) * 64
        assert (tmp_path / "pulled" / "sub" / "b.txt").read_text() == "nested"
        deadline = time.time() + 10
        while host.agent_alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not host.agent_alive()
        assert "agent up" in (host.read_text("agent.log") or "")
        host.write_text("control.json", '{"stop": "budget"}')
        assert host.read_text("control.json") == '{"stop": "budget"}'
    finally:
        host.close()
    assert secret not in caplog.text


def test_agent_outlives_the_connection(sshd_host: SSHDHost, tmp_path: Path) -> None:
    bundle, sha = _bundle(tmp_path)
    host = _connect(sshd_host)
    host.upload_bundle(bundle, sha)
    host.start_agent({"AGENT_SLEEP": "5"})
    host.close()
    again = _connect(sshd_host)
    try:
        assert again.agent_alive()
    finally:
        again.close()


def test_changed_host_key_is_refused(sshd_host: SSHDHost) -> None:
    _connect(sshd_host).close()
    pin = known_hosts_path("ssh", f"root@{sshd_host.sshd.host}:{sshd_host.sshd.port}")
    assert pin.read_text().startswith("ssh-ed25519 ")
    sshd_host.sshd.stop()
    sshd_host.sshd.regenerate_host_key()
    sshd_host.sshd.start()
    with pytest.raises(HostKeyMismatchError, match="different host key"):
        _connect(sshd_host)


def test_unreachable_host_times_out_with_a_reason(sshd_host: SSHDHost) -> None:
    sshd_host.sshd.stop()
    provider = SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=1.5)
    machine = provider.launch(LaunchRequest("lb-x-1", provider.offers()[0], ""))
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="not ready after 2s: .*Unable to connect"):
        provider.connect(machine, None, "runs/x")
    assert time.monotonic() - t0 < 5


def test_wrong_key_is_a_transport_error(sshd_host: SSHDHost) -> None:
    other, _ = _keys.generate_key("lb-other-1")
    provider = SSHProvider(sshd_host.target, key_path=other, connect_timeout_s=1.0)
    machine = provider.launch(LaunchRequest("lb-x-1", provider.offers()[0], ""))
    with pytest.raises(TransportError, match="authentication"):
        provider.connect(machine, None, "runs/x")


def test_reconnects_after_the_connection_drops(sshd_host: SSHDHost) -> None:
    host = _connect(sshd_host)
    try:
        host.write_text("x.txt", "1")
        transport = host._client.get_transport() if host._client else None  # noqa: SLF001
        assert transport is not None
        transport.close()  # the network dropped
        assert host.read_text("x.txt") == "1"
    finally:
        host.close()


def test_ephemeral_key_files(tmp_path: Path) -> None:
    path, public = _keys.generate_key("lb-k-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public.startswith("ssh-ed25519 ") and public.endswith("loraburst-lb-k-1")
    loaded = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert public.split()[1] == loaded.get_base64()
    _keys.delete_key("lb-k-1")
    assert not path.exists() and not path.with_suffix(".pub").exists()


def test_parse_target() -> None:
    assert parse_target("ubuntu@10.0.0.5:2222").port == 2222
    assert parse_target("box").user == "root" and parse_target("box").port == 22
    with pytest.raises(ValueError, match="bad port"):
        parse_target("me@box:ssh")


def test_ssh_provider_never_touches_the_host(sshd_host: SSHDHost) -> None:
    provider = SSHProvider(sshd_host.target, key_path=sshd_host.key_path)
    offer = provider.offers()[0]
    assert offer.price_per_hour == 0.0
    machine: Machine = provider.launch(LaunchRequest("lb-y-1", offer, ""))
    provider.terminate(machine.id)
    assert sshd_host.sshd.alive
    gone = provider.get(machine.id)
    assert gone is not None and gone.status == "terminated"
    assert SSHProvider("a@b:1", gpu=None).offers() == []


def test_offer_type_is_the_target() -> None:
    assert SSHProvider("me@h:2").offers()[0] == Offer(
        "ssh", "unknown", 1, 0.0, 0.0, "me@h:2", price_source="own host"
    )


def test_a_host_key_mismatch_while_booting_keeps_its_own_error(sshd_host: SSHDHost) -> None:
    from tests.providers._launch import launched

    provider = SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=5)
    pin = known_hosts_path("ssh", provider.machine_id)
    pin.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedForAnotherMachineEntirely00\n")
    t0 = time.monotonic()
    with pytest.raises(HostKeyMismatchError, match="host key"):
        launched(provider, provider.offers()[0], "hk", ready_timeout_s=60)
    assert time.monotonic() - t0 < 10  # refused at once, not retried until the timeout
