"""Bundles: deterministic bytes, content-addressed names, safe extraction."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from loraburst import Job
from loraburst._data.bundle import build_bundle, extract_bundle
from loraburst.remote.protocol import UnsafeArchiveError

ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
] * 3


def _bundle(tmp: Path, sub: str) -> tuple[bytes, str]:
    job = Job("org/model", ROWS, train={"max_steps": 2})
    train, ev = job.prepare()
    b = build_bundle(job.spec, train, ev, dest=tmp / sub)
    return b.path.read_bytes(), b.sha256


def test_same_job_same_bytes(tmp_path: Path) -> None:
    a, sha_a = _bundle(tmp_path, "a")
    b, sha_b = _bundle(tmp_path, "b")
    assert a == b and sha_a == sha_b


def test_bundle_contents(tmp_path: Path) -> None:
    job = Job("org/model", ROWS)
    train, _ = job.prepare()
    b = build_bundle(job.spec, train, None, dest=tmp_path)
    assert b.path.name == f"{b.sha256}.tar"
    names = extract_bundle(b.path, tmp_path / "out")
    assert names == sorted(names)
    assert {
        "spec.json",
        "data/train.jsonl",
        "code/loraburst/remote/agent.py",
        "code/loraburst/remote/protocol.py",
    } <= set(names)
    with tarfile.open(b.path) as t:
        assert {m.mtime for m in t.getmembers()} == {0}


def test_different_spec_different_name(tmp_path: Path) -> None:
    _, a = _bundle(tmp_path, "a")
    job = Job("org/model", ROWS, train={"max_steps": 3})
    train, _ = job.prepare()
    assert build_bundle(job.spec, train, None, dest=tmp_path / "c").sha256 != a


def _tar(tmp: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    p = tmp / "evil.tar"
    with tarfile.open(p, "w") as t:
        member.size = len(data) if member.isfile() else 0
        t.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return p


@pytest.mark.parametrize(
    ("name", "kind", "needle"),
    [
        ("/etc/passwd", tarfile.REGTYPE, "absolute"),
        ("a/../../x", tarfile.REGTYPE, "'..'"),
        ("link", tarfile.SYMTYPE, "link"),
        ("hard", tarfile.LNKTYPE, "link"),
    ],
)
def test_unsafe_members_refused(tmp_path: Path, name: str, kind: bytes, needle: str) -> None:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    p = _tar(tmp_path, m)
    with pytest.raises(UnsafeArchiveError) as e:
        extract_bundle(p, tmp_path / "out")
    assert needle in str(e.value) and name in str(e.value)
    assert not (tmp_path / "out").exists()
