"""Checkpoints in an S3-compatible bucket, so a preempted run resumes on another instance.

``LORABURST_ARTIFACTS=s3://bucket/prefix`` turns it on; credentials and ``AWS_ENDPOINT_URL``
come only from the environment (boto3's own chain). The layout under the prefix::

    checkpoints/checkpoint-<step>/...   the trainer's checkpoint files
    checkpoints/checkpoint-<step>/.complete   written last: the checkpoint is whole
    final/adapter/..., final/metrics.json, final/manifest.json

The prefix should be unique to the job (the client appends the job id). boto3 is imported
inside the functions: the agent itself needs only the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = [
    "ArtifactsError",
    "download_latest_checkpoint",
    "parse_url",
    "upload_checkpoint",
    "upload_tree",
]

_COMPLETE = ".complete"
_DONE = re.compile(r"checkpoint-(\d+)/\.complete")


class ArtifactsError(RuntimeError):
    """The bucket cannot be reached or written; the message names the URL."""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``.

    Raises:
        ArtifactsError: not an ``s3://bucket[/prefix]`` URL.
    """
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ArtifactsError(f"artifacts URL {url!r} must look like s3://bucket/prefix")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def _client() -> Any:
    import os

    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def upload_tree(url: str, local: Path, rel: str) -> int:
    """Upload every file under ``local`` (a file or folder) to ``<prefix>/<rel>/``.

    Returns:
        The number of files uploaded.

    Raises:
        ArtifactsError: naming the URL and the file that failed.
    """
    bucket, prefix = parse_url(url)
    client = _client()
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        name = rel if p == local else f"{rel}/{p.relative_to(local).as_posix()}"
        try:
            client.upload_file(str(p), bucket, _key(prefix, name))
        except Exception as exc:  # boto3's errors have no common base worth naming
            raise ArtifactsError(f"uploading {p} to {url}/{name} failed: {exc}") from exc
    return len(files)


def upload_checkpoint(url: str, checkpoint: Path) -> int:
    """Upload one ``checkpoint-<step>`` folder, then its completion marker.

    Raises:
        ArtifactsError: as :func:`upload_tree`.
    """
    rel = f"checkpoints/{checkpoint.name}"
    count = upload_tree(url, checkpoint, rel)
    bucket, prefix = parse_url(url)
    try:
        _client().put_object(Bucket=bucket, Key=_key(prefix, f"{rel}/{_COMPLETE}"), Body=b"")
    except Exception as exc:
        raise ArtifactsError(f"marking {url}/{rel} complete failed: {exc}") from exc
    return count


def download_latest_checkpoint(url: str, dest_root: Path) -> Path | None:
    """Download the newest complete checkpoint into ``dest_root/checkpoint-<step>``.

    Returns:
        The local folder, or None when the bucket holds no complete checkpoint.

    Raises:
        ArtifactsError: naming the URL.
    """
    bucket, prefix = parse_url(url)
    client = _client()
    base = _key(prefix, "checkpoints/")
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    except Exception as exc:
        raise ArtifactsError(f"listing {url}/checkpoints failed: {exc}") from exc
    complete = sorted(int(m.group(1)) for k in keys if (m := _DONE.fullmatch(k[len(base) :])))
    if not complete:
        return None
    name = f"checkpoint-{complete[-1]}"
    src = _key(prefix, f"checkpoints/{name}/")
    dest = dest_root / name
    tmp = dest_root / f".{name}.partial"
    for key in keys:
        if not key.startswith(src) or key.endswith(f"/{_COMPLETE}"):
            continue
        target = tmp / key[len(src) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, key, str(target))
        except Exception as exc:
            raise ArtifactsError(f"downloading {url}/{key} failed: {exc}") from exc
    # Renamed into place only when whole, so a crash mid-download is never mistaken for one.
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest
