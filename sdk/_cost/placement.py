"""Money-aware placement: which offers, in which order, under which budget.

Offers come from each provider's API (live prices when its key is configured) or the
estimator's dated snapshot; the estimator says which fit (peak VRAM) and what each costs. An
explicit chain (``["runpod", "lambda", "local"]``) is tried in its order, cheapest (or
fastest) offer first within each provider; ``"auto"`` (alone or inside a list) ranks every
feasible offer of every provider named plus the configured ones and local by estimated total
cost (or time).

The local GPU is an offer like any other at $0/h: under ``"auto"`` it is first whenever the
job fits its VRAM and it meets the deadline, and past the deadline it stays as the last resort
rather than being dropped; in an explicit chain it sits where the user put it. The local CPU
(and hosts whose GPU the catalog does not know) have no estimate and always come last.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loraburst.providers import (
    Capabilities,
    Offer,
    Provider,
    available_providers,
    get_provider,
    provider_class,
)

from .._exceptions import (
    AuthError,
    BudgetExceededError,
    ConfigError,
    EstimateError,
    ProviderError,
)
from . import billing as billing

if TYPE_CHECKING:
    from .._api.job import Job
    from .estimate import Estimate, EstimateRow

__all__ = [
    "Candidate",
    "configured_providers",
    "declared",
    "estimate_job",
    "plan",
    "resolve_providers",
]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An offer to try, with the estimator's row for it (None for the local CPU)."""

    provider: Provider
    offer: Offer
    row: EstimateRow | None

    @property
    def cost_high(self) -> float:
        return self.row.cost_high_usd if self.row else 0.0


def declared(name: str) -> Capabilities | None:
    """What the provider registered as ``name`` declares on its class; None when it cannot
    be imported or declares nothing there (it is then never picked for "auto")."""
    try:
        caps = getattr(provider_class(name), "capabilities", None)
    except ConfigError:
        return None
    return caps if isinstance(caps, Capabilities) else None


def configured_providers() -> list[str]:
    """Registered providers that are configured, by their declared capabilities: those
    whose credentials are in the environment, then those that need none (this machine),
    the last resort."""
    found = [(n, c) for n in available_providers() if (c := declared(n)) is not None]
    rented = [
        n for n, c in found if c.credentials and any(os.environ.get(v) for v in c.credentials)
    ]
    free = [n for n, c in found if not c.needs_credentials and n not in rented]
    return [*rented, *free]


def resolve_providers(provider: Any) -> list[Provider]:
    """A name, a provider object, ``"auto"``, or a sequence of those -> provider objects."""
    if provider == "auto":
        return [get_provider(n) for n in configured_providers()]
    items = (
        [provider]
        if isinstance(provider, str) or not isinstance(provider, Sequence)
        else list(provider)
    )
    if not items:
        raise ConfigError("provider= must name at least one provider")
    out: list[Provider] = []
    for item in items:
        if isinstance(item, str):
            if item == "auto":
                out.extend(
                    p for p in resolve_providers("auto") if p.name not in {q.name for q in out}
                )
            else:
                out.append(get_provider(item))
        else:
            out.append(item)
    return out


def _offers(providers: Sequence[Provider], *, strict: bool) -> list[tuple[Provider, Offer]]:
    """Every provider's offers, each with the provider object that made it.

    Pairs rather than names: two accounts of one provider in a chain stay distinct.
    """
    out: list[tuple[Provider, Offer]] = []
    for p in providers:
        try:
            out.extend((p, o) for o in p.offers())
        except AuthError:
            if strict:
                raise  # a bad key fails before anything is created
        except ProviderError:
            if strict and len(providers) == 1:
                raise
    return out


def estimate_job(
    job: Job,
    *,
    gpus: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    live: bool = True,
    offers: Sequence[Offer] | None = None,
    history: bool = True,
) -> Estimate:
    """The estimate for ``job``; live offers from configured providers when ``live``;
    corrected by the user's finished jobs unless ``history`` is false."""
    from loraburst.providers.local import detect_gpus

    from .estimate import estimate

    train, _ = job.prepare()
    st = train.stats
    if offers is None and live:
        # This machine's GPUs are found apart (``local_gpus``), not as offers.
        names = [n for n in configured_providers() if (c := declared(n)) and not c.same_machine]
        if providers is not None:
            names = [n for n in names if n in providers]
        offers = [o for _, o in _offers([get_provider(n) for n in names], strict=False)] or None
    return estimate(
        job.spec,
        tokens=st.tokens or 0,
        rows=st.rows,
        tokens_exact=st.tokens_exact,
        gpus=gpus,
        providers=providers,
        offers=offers,
        local_gpus=detect_gpus(),
        lengths=st.lengths,
        history=history,
    )


def _gpu_ok(offer: Offer, gpu: Any) -> bool:
    """``gpu=``: a minimum VRAM in GB, or GPU names in any spelling the catalog knows, each
    optionally with a count (``"2x RTX 3090"``: only instances of two of them)."""
    from .gpus import parse_gpu, resolve_gpu

    if gpu is None:
        return True
    if isinstance(gpu, (int, float)):
        return bool(offer.vram_gb >= float(gpu))
    names = [gpu] if isinstance(gpu, str) else list(gpu)
    wanted = [parse_gpu(n) for n in names]  # an unknown name lists the known ones
    try:
        name = resolve_gpu(offer.gpu).name
    except EstimateError:
        return offer.gpu in names
    return any(g.name == name and n in (None, offer.gpu_count) for g, n in wanted)


def _is_chain(provider: Any) -> bool:
    """An explicit chain keeps its order; ``"auto"`` (alone or in a list) ranks everything."""
    if isinstance(provider, str):
        return provider != "auto"
    if isinstance(provider, Sequence):
        return not any(isinstance(p, str) and p == "auto" for p in provider)
    return True


def _excluded_by(
    offer: Offer, gpu: Any, max_price_per_hour: float | None, deadline: float | None, row: Any
) -> str | None:
    """Why a fitting offer is left out by the caller's filters, or None."""
    if not offer.available:
        return "no capacity now"
    if not _gpu_ok(offer, gpu):
        return "gpu="
    if max_price_per_hour is not None and offer.price_per_hour > max_price_per_hour:
        return "max_price_per_hour"
    if deadline is not None and row.total_s > deadline:
        return "deadline"
    return None


def plan(
    job: Job,
    provider: Any,
    *,
    gpu: Any = None,
    max_price_per_hour: float | None = None,
    prefer: str = "cheapest",
    deadline: float | None = None,
    max_cost: float | None = None,
) -> list[Candidate]:
    """Ordered candidates for ``job``.

    Feasible offers (the estimated peak VRAM fits, the filters pass) are ranked by estimated
    cost (or time with ``prefer="fastest"``); an explicit chain ranks within each provider and
    keeps the providers' order, ``"auto"`` ranks across all of them. The local GPU is priced at
    $0, so under ``"auto"`` it comes first whenever the job fits it and it meets the deadline;
    when it misses the deadline it is not dropped but kept as the last resort. The local CPU and
    hosts of unknown GPU have no estimate: they come last, in the order given.

    Raises:
        AuthError: an explicitly named provider rejected its key (nothing was created).
        BudgetExceededError: no feasible offer's upper cost bound is within ``max_cost`` (the
            message shows the estimate and what would fit).
        EstimateError: nothing fits (the message says what would make it fit).
    """
    if prefer not in ("cheapest", "fastest"):
        raise ConfigError(f"prefer must be 'cheapest' or 'fastest', not {prefer!r}")
    _check_gpu_count(job, gpu)
    chain = _is_chain(provider)
    providers = resolve_providers(provider)
    order = {id(p): i for i, p in enumerate(providers)}
    pairs = _offers(providers, strict=True)
    gpu_offers = [o for _, o in pairs if o.gpu != "cpu"]
    rows: dict[tuple[str, str, int, float], EstimateRow] = {}
    if gpu_offers:
        est = estimate_job(
            job, offers=gpu_offers, live=False, providers=[p.name for p in providers]
        )
        rows = {(r.provider, r.gpu, r.gpu_count, r.price_per_hour): r for r in est.rows}
    ranked: list[Candidate] = []
    late_local: list[Candidate] = []  # this machine's GPU past the deadline: last resort
    unestimated: list[Candidate] = []
    skipped: list[str] = []
    excluded: list[tuple[Candidate, str]] = []
    for prov, o in pairs:
        if o.gpu_count not in prov.capabilities.gpu_counts:  # read, never assumed
            why = prov.unsupported.get("multi_gpu", f"{o.gpu_count} GPUs per instance")
            skipped.append(f"{o.provider} {o.gpu} x{o.gpu_count}: {why}")
            continue
        row = None if o.gpu == "cpu" else rows.get(_row_key(o))
        if row is None:
            if gpu is None:  # e.g. the local CPU, a bring-your-own host of unknown GPU
                unestimated.append(Candidate(prov, o, None))
            continue
        cand = Candidate(prov, o, row)
        if not row.fits:
            skipped.append(f"{o.provider} {o.gpu}: {row.note}")
            continue
        reason = _excluded_by(o, gpu, max_price_per_hour, deadline, row)
        if reason == "deadline" and prov.capabilities.same_machine:
            late_local.append(cand)
        elif reason is not None:
            excluded.append((cand, reason))
        else:
            ranked.append(cand)

    def key(c: Candidate) -> tuple[float, ...]:
        assert c.row is not None
        metric = c.row.total_s if prefer == "fastest" else c.row.cost_usd
        return (order[id(c.provider)] if chain else 0, metric, c.offer.price_per_hour)

    cands = sorted(ranked, key=key) + late_local + unestimated
    if not cands:
        detail = "\n  ".join(
            skipped + [f"{c.offer.provider} {c.offer.gpu}: excluded by {r}" for c, r in excluded]
        )
        raise EstimateError(f"no offer can run this job:\n  {detail or 'no offers'}")
    if max_cost is not None:
        within = [c for c in cands if c.cost_high <= max_cost]
        if not within:
            raise _over_budget(cands, excluded, max_cost)
        cands = within
    return cands


def _check_gpu_count(job: Job, gpu: Any) -> None:
    """A GPU count above one for an objective that trains on one GPU: refused before renting."""
    from .gpus import parse_gpu

    if not job.spec.objective.preference or gpu is None or isinstance(gpu, (int, float)):
        return
    for name in [gpu] if isinstance(gpu, str) else list(gpu):
        _, count = parse_gpu(name)
        if count is not None and count > 1:
            raise ConfigError(
                f"gpu={name!r}: {job.spec.objective.type} (preference tuning) trains on one GPU; "
                "multi-GPU training (DDP/FSDP) is for objective sft. Ask for one GPU "
                f"(e.g. gpu={name.split('x', 1)[-1].strip()!r})",
                field="gpu",
            )


def _row_key(o: Offer) -> tuple[str, str, int, float]:
    from .estimate import resolve_gpu

    try:
        name = resolve_gpu(o.gpu).name
    except EstimateError:
        name = o.gpu
    return (o.provider, name, o.gpu_count, o.price_per_hour)


def _over_budget(
    cands: Sequence[Candidate], excluded: Sequence[tuple[Candidate, str]], max_cost: float
) -> BudgetExceededError:
    """The refusal: the estimate on the cheapest allowed offer, and what would fit."""
    best = min(cands, key=lambda c: (c.cost_high, c.offer.price_per_hour))
    r = best.row
    assert r is not None  # unestimated candidates cost $0 and are always within
    where = f"{best.offer.provider} {best.offer.gpu} (${best.offer.price_per_hour:.2f}/h)"
    lines = [
        f"max_cost ${max_cost:.2f} is below the estimated upper bound on every allowed offer. "
        f"The cheapest, {where}, is estimated at ${r.cost_usd:.2f} "
        f"(range ${r.cost_low_usd:.2f}-${r.cost_high_usd:.2f}) for {r.steps} steps, "
        f"about {r.total_s / 60:.0f} min of which {r.setup_s / 60:.0f} min setup. What would fit:"
    ]
    steps = _steps_within(r, max_cost)
    if steps >= 1:
        lines.append(f"  - fewer steps: train.max_steps: {steps} fits ${max_cost:.2f} on {where}")
    else:
        lines.append(f"  - not {where} at any step count: its setup alone may cost that much")
    cheaper = sorted((c for c, _ in excluded if c.cost_high <= max_cost), key=lambda c: c.cost_high)
    reasons = {id(c): why for c, why in excluded}
    for c in cheaper[:3]:
        lines.append(
            f"  - a cheaper GPU: {c.offer.provider} {c.offer.gpu} "
            f"(up to ${c.cost_high:.2f}), now excluded by {reasons[id(c)]}"
        )
    lines.append(
        f"  - max_cost: {r.cost_high_usd:.2f}, or allow_partial=True to train until the cap "
        "and keep the partial adapter"
    )
    return BudgetExceededError(
        "\n".join(lines), estimate_usd=r.cost_usd, estimate_high_usd=r.cost_high_usd
    )


def _steps_within(row: EstimateRow, max_cost: float) -> int:
    """About how many optimizer steps ``max_cost`` buys on ``row``'s offer, at the estimate's
    upper bound."""
    from .estimate import SETUP_RANGE

    if row.price_per_hour <= 0 or row.steps <= 0:
        return 0
    high_s = row.cost_high_usd / row.price_per_hour * 3600.0
    setup_high_s = row.setup_s * SETUP_RANGE[1]
    return billing.affordable_steps(
        max_cost=max_cost,
        price_per_hour=row.price_per_hour,
        increment_s=row.billing_increment_s,
        setup_s=setup_high_s,
        seconds_per_step=(high_s - setup_high_s) / row.steps,
    )
