"""Pull-back: checkpoints copied back as training goes, and at the end the adapter and metrics
pulled, accepted only as the manifest lists them, verified by sha256, and published whole — or,
when this machine cannot store them, the instance held for ``loraburst attach``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraburst.providers import Host, Machine, Offer, Provider
from loraburst.remote.protocol import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONTROL_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    ManifestError,
    State,
    parse_manifest,
    unlisted_files,
    verify_manifest,
)

from .._exceptions import (
    AgentError,
    ArtifactError,
    LocalStorageError,
    LoraburstError,
)
from .._progress import ProgressView
from .._state.disk import local_io, remove_quietly
from .._state.ledger import Ledger
from .owner import release

__all__ = ["PullBack"]


class PullBack:
    """Bringing the run's artifacts to this machine.

    Shared state (on the attempt): ``provider``, ``offer``, ``job_id``, ``tag``, ``ledger``,
    ``view``, ``machine``, ``host``, ``key_path``, ``launched_at``, ``durations``, ``state``.
    """

    provider: Provider
    offer: Offer
    job_id: str
    tag: str
    ledger: Ledger
    view: ProgressView
    machine: Machine | None
    host: Host | None
    local_dir: Path
    durations: dict[str, float]
    state: State
    held: bool
    hold_s: float
    heartbeat_grace_s: float
    _last_ckpt_pulled: int

    if TYPE_CHECKING:  # provided by the other parts of Attempt

        def cost_so_far(self) -> float: ...  # the attempt's
        def _close_host(self) -> None: ...  # the session's
        def _require_host(self) -> Host: ...  # the session's

    def _maybe_pull_checkpoint(self, host: Host) -> None:
        """Pull each new checkpoint once training has moved past it (so it is complete)."""
        if self.provider.capabilities.same_machine:
            return  # the run folder is already on this machine
        rc, out, _ = host.run(f"ls -1 {CHECKPOINT_DIR} 2>/dev/null", timeout=30)
        steps = sorted(
            int(n.rsplit("-", 1)[1])
            for n in out.split()
            if n.startswith("checkpoint-") and n.rsplit("-", 1)[1].isdigit()
        )
        done = [s for s in steps if s < self.state.step or self.state.terminal]
        if rc != 0 or not done or done[-1] <= self._last_ckpt_pulled:
            return
        name = f"checkpoint-{done[-1]}"
        # Fetch beside, then rename: a half-pulled checkpoint must never look like one.
        final = self.local_dir / CHECKPOINT_DIR / name
        partial = final.with_name(f".partial-{name}")
        try:
            host.fetch_tree(f"{CHECKPOINT_DIR}/{name}", partial)
            with local_io(final):
                remove_quietly(final)
                partial.rename(final)
        except LocalStorageError as exc:
            # The checkpoint is only a local copy for resuming elsewhere; training goes on and
            # the next checkpoint is tried once more (the user may free space meanwhile).
            remove_quietly(partial)
            self._last_ckpt_pulled = done[-1]
            self.view.message(f"could not keep {name} locally, training goes on: {exc}")
            return
        except BaseException:
            remove_quietly(partial)
            raise
        self._last_ckpt_pulled = done[-1]
        # Only the newest complete checkpoint is needed to resume: keep the local disk bounded.
        for old in (self.local_dir / CHECKPOINT_DIR).glob("checkpoint-*"):
            if old.name != name and old.name.rsplit("-", 1)[-1].isdigit():
                remove_quietly(old)

    def collect(self, output_dir: Path, *, retries: int = 3) -> tuple[Path, dict[str, Any]]:
        """Pull ``adapter/`` and metrics, accept exactly what the manifest lists, verify every
        sha256 (re-fetch on mismatch) and move the verified adapter into ``output_dir``.

        The instance is not trusted: its manifest must be well formed and name only plain
        paths under ``adapter/`` and ``metrics.json``, and a pulled file it does not list is
        refused rather than copied. ``<output_dir>/<job id>`` appears whole or not at all.

        Raises:
            AgentError: no manifest.
            ArtifactError: a malformed manifest, unlisted or unsafe files, or files that fail
                their sha256 ``retries`` times.
            LocalStorageError: this machine could not write the pull or the copy (nothing is
                left half-written); the instance still holds the adapter.
        """
        host = self._require_host()
        t0 = time.time()
        pulled = self.local_dir / "pulled"
        manifest_text = host.read_text(MANIFEST_FILE)
        if manifest_text is None:
            raise AgentError("the agent finished but wrote no manifest.json", job_id=self.job_id)
        try:
            manifest = parse_manifest(manifest_text)
        except ManifestError as exc:
            raise ArtifactError(
                f"{self.provider.name} instance's {MANIFEST_FILE} is refused: {exc}",
                job_id=self.job_id,
            ) from None
        if manifest["files"][METRICS_FILE]["size"] > _MAX_METRICS_BYTES:
            raise ArtifactError(
                f"the instance's {METRICS_FILE} is over {_MAX_METRICS_BYTES >> 20} MiB; refusing it",
                job_id=self.job_id,
            )
        _check_room(manifest, pulled, output_dir)
        try:
            for attempt in range(1, retries + 1):
                with local_io(pulled):
                    remove_quietly(pulled)
                    pulled.mkdir(parents=True)
                host.fetch_tree(ADAPTER_DIR, pulled / ADAPTER_DIR)
                host.fetch_tree(METRICS_FILE, pulled / METRICS_FILE)
                # Every other root the manifest lists (exports/) comes back too, verified alike.
                for rel in _extra_roots(manifest):
                    host.fetch_tree(rel, pulled / rel)
                unlisted = unlisted_files(pulled, manifest)
                if unlisted:
                    raise ArtifactError(
                        f"the instance's {ADAPTER_DIR}/ holds files its manifest does not list: "
                        f"{unlisted[:10]}; refusing them",
                        job_id=self.job_id,
                    )
                bad = verify_manifest(pulled, manifest)
                if not bad:
                    break
                self.view.message(f"artifact check failed for {bad}; fetching again ({attempt})")
            else:
                raise ArtifactError(
                    f"pulled artifacts failed their sha256 check {retries} times: {bad}",
                    job_id=self.job_id,
                )
            metrics = _metrics(pulled / METRICS_FILE, self.job_id)
            dest = self._publish(pulled, manifest, manifest_text, output_dir)
        finally:
            remove_quietly(pulled)
        self.durations["pull"] = time.time() - t0
        return dest / ADAPTER_DIR, metrics

    def _publish(
        self, pulled: Path, manifest: dict[str, Any], manifest_text: str, output_dir: Path
    ) -> Path:
        """Copy the listed files into a hidden folder beside ``<output_dir>/<job id>``, write
        the manifest last, verify, then rename it into place: a full disk leaves no
        half-copied adapter (no zero-byte files beside a manifest.json)."""
        dest = output_dir / self.job_id
        staging = output_dir / f".partial-{self.job_id}"
        try:
            with local_io(staging):
                remove_quietly(staging)
                staging.mkdir(parents=True)
                for rel in sorted(manifest["files"]):
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(pulled / rel, staging / rel)
                with open(staging / MANIFEST_FILE, "w", encoding="utf-8") as f:
                    f.write(manifest_text)
                    f.flush()
                    os.fsync(f.fileno())
            bad = verify_manifest(staging, manifest)
            if bad:
                raise ArtifactError(f"copy to {dest} does not verify: {bad}", job_id=self.job_id)
            with local_io(dest):
                remove_quietly(dest)
                staging.rename(dest)
        except BaseException:
            remove_quietly(staging)
            raise
        return dest

    def hold(self, cause: LocalStorageError) -> LocalStorageError:
        """Keep the instance (with the only copy of the adapter) instead of tearing it down,
        because this machine could not store the adapter; returns the error to raise.

        The agent's watchdog is told not to terminate before the hold ends, the ledger row
        becomes ``held`` (``loraburst attach`` finishes the pull, ``loraburst cleanup`` keeps it
        until then), and the SSH key is kept for that attach.
        """
        self.held = True
        until = time.time() + self.hold_s
        machine = self.machine.id if self.machine is not None else self.tag
        told_agent = ""
        try:
            self._require_host().write_text(
                CONTROL_FILE, json.dumps({"hold_until": until, "reason": "local disk"})
            )
        except LoraburstError as exc:
            told_agent = (
                f" (the instance's watchdog could not be told to wait: {exc}; it may terminate "
                f"the instance {self.heartbeat_grace_s / 60:.0f} min after this client stops)"
            )
        self._close_host()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(until))
        recorded = ""
        try:
            # billed_usd: what it cost so far (attach recounts the whole instance at the end).
            self.ledger.update_instance(
                self.tag,
                state="held",
                held_until=until,
                billed_usd=self.cost_so_far(),
                note=f"local disk: {cause}"[:500],
            )
            self.ledger.update_job(self.job_id, status="held", error=str(cause)[:500])
        except LoraburstError as exc:
            recorded = f" The ledger could not record the hold ({exc})."
        release(self.job_id)
        return LocalStorageError(
            f"job {self.job_id}: {cause}. The {self.provider.name} instance {machine} is KEPT "
            f"with the only copy of the adapter (${self.offer.price_per_hour:.2f}/h) until "
            f"{when}{told_agent}. Free space, then run `loraburst attach {self.job_id}` to pull "
            f"it; `loraburst cleanup --release-held` gives it up.{recorded}",
            path=cause.path,
            errno=cause.errno,
            job_id=self.job_id,
            provider=self.provider.name,
        )


def _extra_roots(manifest: dict[str, Any]) -> list[str]:
    """Top-level folders or files of the manifest beyond the adapter and metrics."""
    roots = {rel.split("/", 1)[0] for rel in manifest["files"]}
    return sorted(roots - {ADAPTER_DIR, METRICS_FILE})


# metrics.json is a few KB of numbers; anything near this is not ours.
_MAX_METRICS_BYTES = 16 << 20


def _check_room(manifest: dict[str, Any], pulled: Path, output_dir: Path) -> None:
    """Fail before pulling when the manifest's files cannot fit: the pull and the copy into
    ``output_dir`` (both on one disk when they share it).

    Raises:
        LocalStorageError: with ``ENOSPC``, saying how much is needed and free.
    """
    need = sum(int(meta["size"]) for meta in manifest["files"].values())
    places: dict[int, tuple[Path, int]] = {}
    for folder in (pulled.parent, output_dir):
        with local_io(folder):
            folder.mkdir(parents=True, exist_ok=True)
            dev = os.stat(folder).st_dev
        where, total = places.get(dev, (folder, 0))
        places[dev] = (where, total + need)
    for where, total in places.values():
        free = shutil.disk_usage(where).free
        if free < total:
            raise LocalStorageError(
                f"the adapter needs {total / 1e6:,.1f} MB under {where} on this machine and "
                f"only {free / 1e6:,.1f} MB are free (free space)",
                path=str(where),
                errno=errno.ENOSPC,
            )


def _metrics(path: Path, job_id: str) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(
            f"the instance's {METRICS_FILE} is unreadable: {exc}", job_id=job_id
        ) from None
    if not isinstance(metrics, dict):
        raise ArtifactError(f"the instance's {METRICS_FILE} is not a JSON object", job_id=job_id)
    return metrics
