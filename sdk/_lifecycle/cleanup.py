"""``loraburst cleanup``: reconcile the ledger with every provider account, by tag.

An instance is orphaned when it carries our tag prefix (``lb-``) and no live client is
following its job (``loraburst run`` and ``loraburst attach`` claim ``runs/<job>/client.pid``
while they follow, see ``_owner``). Orphans are terminated and confirmed gone; ledger rows whose
instance the provider no longer knows are closed. Nothing is terminated with ``dry_run``.

An instance *held* for ``loraburst attach`` (it has the only copy of an adapter this machine
could not store) is kept until its hold ends, unless ``release_held`` says to give it up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from loraburst.providers import Provider, get_provider

from .._cost.placement import configured_providers, declared
from .._exceptions import ProviderError
from .._state.ledger import Ledger
from .owner import client_alive

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
        out += [
            f"kept: {t}" if ": held until" in t else f"kept (a client is following it): {t}"
            for t in self.kept
        ]
        out += [f"FAILED: {t}" for t in self.failed]
        return out or ["nothing to clean up"]


def _job_of(tag: str) -> str:
    return tag.removeprefix("lb-").rpartition("-")[0]


def cleanup(
    *,
    dry_run: bool = False,
    providers: Mapping[str, Provider] | None = None,
    ledger: Ledger | None = None,
    release_held: bool = False,
) -> CleanupReport:
    """Terminate orphaned tagged instances and close stale ledger rows.

    Args:
        release_held: also terminate instances held for ``loraburst attach`` before their
            hold ends (their adapter is then lost).
    """
    ledger = ledger or Ledger()
    report = CleanupReport(dry_run=dry_run)
    names = {i.provider for i in ledger.instances(open_only=True)}
    names |= set(configured_providers()) | set(providers or {})
    for name in sorted(names):
        # Only rented machines outlive a client and cost money: the others have no orphans.
        given = (providers or {}).get(name)
        caps = given.capabilities if given is not None else declared(name)
        if caps is not None and not caps.billed:
            continue
        try:
            prov = given or get_provider(name)
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
            row = ledger.instance(m.tag)
            if (
                not release_held
                and row is not None
                and row.state == "held"
                and (row.held_until or 0) > time.time()
            ):
                until = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.held_until))
                report.kept.append(
                    f"{label}: held until {until} with the job's adapter; "
                    f"`loraburst attach {row.job_id}` pulls it, --release-held gives it up"
                )
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
