"""A rented machine is not trusted code: what it lists, links and writes in its manifest is
checked before anything lands on this machine, and a full local disk is not a dropped link.

Names come from a hostile SSH server (``tests/fakes/hostile.py``) that lists ``../../x`` and
``/abs/x`` as if they were files; links, FIFOs and manifests come from a real sshd instance.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loraburst import AgentError, ArtifactError, LocalStorageError, LoraburstError
from loraburst._lifecycle.attempt import Attempt
from loraburst._progress import ProgressView
from loraburst._state.ledger import Ledger
from loraburst.providers import LaunchRequest
from loraburst.providers._ssh import SSHHost
from loraburst.providers.ssh import SSHProvider

from tests.fakes.disk import SmallDisk, free_bytes
from tests.fakes.fixtures import SSHDHost
from tests.fakes.hostile import HostileInstance
from tests.fakes.sshd import ed25519_key


def _host(target: str, key: Path, job: str = "j1") -> SSHHost:
    provider = SSHProvider(target, key_path=key, connect_timeout_s=10)
    machine = provider.launch(LaunchRequest(f"lb-{job}-1", provider.offers()[0], ""))
    host = provider.connect(machine, None, f"{machine.workdir_root}/runs/{job}")
    assert isinstance(host, SSHHost)
    return host


@pytest.fixture
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileInstance, Path]]:
    folder = tmp_path_factory.mktemp("hostile")
    key = folder / "client_key"
    server = HostileInstance(folder / "instance", ed25519_key(key))
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


def _adapter_on(root: Path, job: str = "j1") -> Path:
    adapter = root / "runs" / job / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return adapter


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested", "backslash"])
def test_listed_names_never_land_outside_the_pull(
    hostile: tuple[HostileInstance, Path], tmp_path: Path, kind: str
) -> None:
    server, key = hostile
    adapter = _adapter_on(server.root)
    work = tmp_path / "work"  # LORABURST_HOME (host-key pins) lives beside it, not inside
    dest = work / "a" / "b" / "pulled"
    outside = {
        "parent": ("../../escaped.bin", work / "a" / "escaped.bin"),
        "absolute": (str(work / "abs-escaped.bin"), work / "abs-escaped.bin"),
        "nested": ("sub/../../../escaped.bin", work / "a" / "escaped.bin"),
        "backslash": ("..\\..\\escaped.bin", None),
    }
    name, landing = outside[kind]
    server.lies[str(adapter)] = {name: b"written by the instance"}
    host = _host(f"root@{server.host}:{server.port}", key)
    try:
        with pytest.raises(ArtifactError, match="not a plain file name"):
            host.fetch_tree("adapter", dest)
    finally:
        host.close()
    assert not dest.exists()  # nothing half-pulled is left either
    if landing is not None:
        assert not landing.exists()
    written = [p for p in work.rglob("*") if p.is_file()]
    assert written == [], written


def test_an_honest_listing_from_the_same_server_is_pulled(
    hostile: tuple[HostileInstance, Path], tmp_path: Path
) -> None:
    server, key = hostile
    adapter = _adapter_on(server.root)
    (adapter / "sub").mkdir()
    (adapter / "sub" / "x.json").write_text("{}")
    host = _host(f"root@{server.host}:{server.port}", key)
    try:
        host.fetch_tree("adapter", tmp_path / "pulled")
    finally:
        host.close()
    assert sorted(
        p.relative_to(tmp_path / "pulled").as_posix() for p in (tmp_path / "pulled").rglob("*")
    ) == [
        "adapter_model.safetensors",
        "sub",
        "sub/x.json",
    ]


@pytest.mark.parametrize("kind", ["file link", "folder link", "loop", "fifo"])
def test_links_and_special_files_on_the_instance_are_refused(
    sshd_host: SSHDHost, tmp_path: Path, kind: str
) -> None:
    adapter = _adapter_on(sshd_host.root)
    secret = tmp_path / "instance-secret"
    secret.write_text("the instance's own file outside the run")
    if kind == "file link":
        (adapter / "leak.txt").symlink_to(secret)
    elif kind == "folder link":
        (adapter / "etc").symlink_to(tmp_path)
    elif kind == "loop":
        (adapter / "again").symlink_to(adapter)  # followed, it never ends
    else:
        os.mkfifo(adapter / "pipe")  # read, it blocks forever
    host = _host(sshd_host.target, sshd_host.key_path)
    dest = tmp_path / "pulled"
    try:
        with pytest.raises(ArtifactError, match="refusing to pull it"):
            host.fetch_tree("adapter", dest)
    finally:
        host.close()
    assert not dest.exists()


# --- the manifest decides what is accepted ---------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finished_run(root: Path, job: str, files: dict[str, bytes]) -> dict[str, object]:
    """An instance's work directory after training: adapter/, metrics.json and a manifest."""
    work = root / "runs" / job
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    entries = {rel: {"sha256": _sha(data), "size": len(data)} for rel, data in files.items()}
    manifest = {"protocol_version": 1, "files": entries}
    (work / "manifest.json").write_text(json.dumps(manifest))
    return manifest


FILES = {
    "adapter/adapter_model.safetensors": os.urandom(2048),
    "adapter/adapter_config.json": b'{"r": 8}',
    "metrics.json": b'{"steps": 3}',
}


@pytest.fixture
def attempt(sshd_host: SSHDHost) -> Iterator[Attempt]:
    provider = SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=10)
    run = Attempt(
        job_id="j1",
        attempt=1,
        provider=provider,
        offer=provider.offers()[0],
        ledger=Ledger(),
        view=ProgressView("t", enabled=False),
    )
    run.host = _host(sshd_host.target, sshd_host.key_path)
    try:
        yield run
    finally:
        run.host.close()


def test_collect_copies_exactly_the_listed_files(
    sshd_host: SSHDHost, attempt: Attempt, tmp_path: Path
) -> None:
    _finished_run(sshd_host.root, "j1", FILES)
    adapter, metrics = attempt.collect(tmp_path / "out")
    assert metrics == {"steps": 3} and adapter == tmp_path / "out" / "j1" / "adapter"
    got = sorted(p.relative_to(adapter.parent).as_posix() for p in adapter.parent.rglob("*"))
    assert got == sorted(["adapter", *FILES, "manifest.json"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["j1"]  # no staging left


def test_a_manifest_entry_outside_its_folders_is_refused_even_with_the_right_hash(
    sshd_host: SSHDHost, attempt: Attempt, tmp_path: Path
) -> None:
    # The entry points at a file of this machine, with its real hash: it used to "verify".
    local = attempt.local_dir.parent / "planted.bin"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(b"on the client")
    manifest = _finished_run(sshd_host.root, "j1", FILES)
    manifest["files"]["../../planted.bin"] = {"sha256": _sha(b"on the client"), "size": 13}  # type: ignore[index]
    (sshd_host.root / "runs" / "j1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        attempt.collect(tmp_path / "out")
    assert not (tmp_path / "out" / "j1").exists()


def test_a_file_the_manifest_does_not_list_is_refused(
    sshd_host: SSHDHost, attempt: Attempt, tmp_path: Path
) -> None:
    _finished_run(sshd_host.root, "j1", FILES)
    (sshd_host.root / "runs" / "j1" / "adapter" / "extra.py").write_text("import os")
    with pytest.raises(ArtifactError, match=r"does not list: \['adapter/extra.py'\]"):
        attempt.collect(tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"files": {}}', "lists no files"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", '"files" mapping'),
        ('{"files": {"metrics.json": {"sha256": "x", "size": 1}}}', "valid sha256"),
        ('{"files": {"/etc/passwd": {"sha256": "' + "0" * 64 + '", "size": 1}}}', "plain"),
        ('{"files": {"bundle/code.py": {"sha256": "' + "0" * 64 + '", "size": 1}}}', "outside"),
    ],
)
def test_a_malformed_manifest_is_a_clear_error(
    sshd_host: SSHDHost, attempt: Attempt, tmp_path: Path, text: str, why: str
) -> None:
    _finished_run(sshd_host.root, "j1", FILES)
    (sshd_host.root / "runs" / "j1" / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match="manifest.json is refused") as e:
        attempt.collect(tmp_path / "out")
    assert why in str(e.value)


# --- this machine's disk ---------------------------------------------------------------------


def test_a_full_local_disk_is_not_a_dropped_connection(
    sshd_host: SSHDHost, tmp_path: Path, small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loraburst.providers.ssh")
    adapter = _adapter_on(sshd_host.root)
    (adapter / "big.bin").write_bytes(os.urandom(3 << 20))
    disk = small_disk(1 << 20)
    host = _host(sshd_host.target, sshd_host.key_path)
    t0 = time.monotonic()
    try:
        with pytest.raises(LocalStorageError) as e:
            host.fetch_tree("adapter", disk / "pulled")
        assert host.read_text("runs-ok") is None  # the connection itself is fine
    finally:
        host.close()
    assert e.value.errno == errno.ENOSPC and "free space" in str(e.value)
    assert "reconnecting" not in caplog.text
    assert time.monotonic() - t0 < 10
    assert list(disk.iterdir()) == []  # no partial folder left
    assert free_bytes(disk) == 1 << 20


def test_a_read_only_destination_is_a_local_storage_error(
    sshd_host: SSHDHost, small_disk: SmallDisk
) -> None:
    _adapter_on(sshd_host.root)
    disk = small_disk(1 << 20, read_only=True)
    host = _host(sshd_host.target, sshd_host.key_path)
    try:
        with pytest.raises(LocalStorageError) as e:
            host.fetch_tree("adapter", disk / "pulled")
    finally:
        host.close()
    assert e.value.errno == errno.EROFS and isinstance(e.value, LoraburstError)


def test_a_full_output_disk_leaves_no_half_copied_adapter(
    sshd_host: SSHDHost, attempt: Attempt, small_disk: SmallDisk
) -> None:
    files = {**FILES, "adapter/adapter_model.safetensors": os.urandom(3 << 20)}
    _finished_run(sshd_host.root, "j1", files)
    out = small_disk(1 << 20)
    with pytest.raises(LocalStorageError):
        attempt.collect(out)
    # Before: zero-byte files beside a manifest.json, and the pull left in runs/.
    assert list(out.iterdir()) == []
    assert not (attempt.local_dir / "pulled").exists()


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"phase": "training", "step": "12"}',
        '{"phase": "[/x] pwned", "step": 1}',
        '{"phase": "done", "error": {"type": ["list"]}}',
        "[" * 100_000,
    ],
)
def test_a_bad_state_file_is_an_agent_error(
    sshd_host: SSHDHost, attempt: Attempt, text: str
) -> None:
    work = sshd_host.root / "runs" / "j1"
    work.mkdir(parents=True, exist_ok=True)
    (work / "state.json").write_text(text)
    with pytest.raises(AgentError, match="state.json is unreadable"):
        attempt.follow()


def test_reads_from_the_instance_are_bounded(sshd_host: SSHDHost) -> None:
    work = sshd_host.root / "runs" / "j1"
    work.mkdir(parents=True)
    (work / "agent.log").write_bytes(b"x" * (40 << 20) + b"\xff the end")
    host = _host(sshd_host.target, sshd_host.key_path)
    try:
        text = host.read_text("agent.log")
        rc, out, _ = host.run("head -c 40000000 /dev/zero | tr '\\\\0' y; echo; echo last")
    finally:
        host.close()
    assert text is not None and len(text) <= 16 << 20 and text.endswith("\ufffd the end")
    assert rc == 0 and len(out) <= 16 << 20 and out.endswith("last\n")


def test_an_adapter_that_cannot_fit_is_refused_before_pulling(
    sshd_host: SSHDHost, attempt: Attempt, small_disk: SmallDisk
) -> None:
    files = {**FILES, "adapter/adapter_model.safetensors": os.urandom(3 << 20)}
    _finished_run(sshd_host.root, "j1", files)
    out = small_disk(2 << 20)
    with pytest.raises(LocalStorageError, match=r"needs 3\.1 MB under .* only 2\.1 MB are free"):
        attempt.collect(out)
    assert list(out.iterdir()) == [] and not (attempt.local_dir / "pulled").exists()
