"""``loraburst cleanup``: reconcile the ledger with every provider account, by tag.

An instance is orphaned when it carries our tag prefix (``lb-``) and no live client is
following its job (a client holds ``runs/<job>/client.pid`` while it follows). Orphans are
terminated and confirmed gone; ledger rows whose instance the provider no longer knows are
closed. Nothing is terminated with ``dry_run``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

from loraburst.providers import Provider, get_provider
from loraburst.providers.local import pid_alive

from ._exceptions import ProviderError
from ._home import runs_dir
from ._ledger import Ledger
from ._placement import configured_providers

__all__ = ["CleanupReport", "cleanup", "client_alive"]


@dataclasses.dataclass
class CleanupReport:
    dry_run: bool
    terminated: list[str] = dataclasses.field(default_factory=list)
    closed: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        verb = "would terminate" if self.dry_run else "terminated"
        out = [f"{verb}: {t}" for t in self.terminated]
        out += [f"closed ledger row (instance already gone): {t}" for t in self.closed]
        out += [f"kept (a client is following it): {t}" for t in self.kept]
        out += [f"FAILED: {t}" for t in self.failed]
        return out or ["nothing to clean up"]


def client_alive(job_id: str) -> bool:
    """Whether a client process is following ``job_id`` right now."""
    try:
        pid = int((runs_dir() / job_id / "client.pid").read_text())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False  # cleanup itself runs in this process: that client is not following
    return bool(pid_alive(pid))


def _job_of(tag: str) -> str:
    return tag.removeprefix("lb-").rpartition("-")[0]


def cleanup(
    *,
    dry_run: bool = False,
    providers: Mapping[str, Provider] | None = None,
    ledger: Ledger | None = None,
) -> CleanupReport:
    """Terminate orphaned tagged instances and close stale ledger rows."""
    ledger = ledger or Ledger()
    report = CleanupReport(dry_run=dry_run)
    names = {i.provider for i in ledger.instances(open_only=True)}
    names |= {n for n in configured_providers() if n != "local"}
    names |= set(providers or {})
    names.discard("local")
    for name in sorted(names):
        try:
            prov = (providers or {}).get(name) or get_provider(name)
            live = prov.list_tagged("lb-")
        except ProviderError as exc:
            report.failed.append(f"{name}: cannot list instances: {exc}")
            continue
        live_ids = {m.id for m in live}
        for m in live:
            label = f"{name} {m.id} ({m.tag})"
            if client_alive(_job_of(m.tag)):
                report.kept.append(label)
                continue
            if dry_run:
                report.terminated.append(label)
                continue
            try:
                prov.terminate(m.id)
                gone = prov.get(m.id)
                if gone is not None and gone.status not in ("terminated", "preempted"):
                    raise ProviderError(f"still {gone.status} after terminate", provider=name)
            except ProviderError as exc:
                report.failed.append(f"{label}: {exc}")
                continue
            report.terminated.append(label)
            if ledger.instance(m.tag) is not None:
                ledger.update_instance(
                    m.tag, state="terminated", ended_at=time.time(), note="terminated by cleanup"
                )
        for row in ledger.instances(open_only=True):
            if (
                row.provider == name
                and row.provider_id not in live_ids
                and not dry_run
                and not client_alive(row.job_id)
            ):
                ledger.update_instance(
                    row.tag,
                    state="terminated",
                    ended_at=time.time(),
                    note="gone at the provider (cleanup)",
                )
                report.closed.append(f"{name} {row.provider_id} ({row.tag})")
    return report
