"""Money-aware placement: which offers, in which order, under which budget.

Offers come from each provider's API (live prices when its key is configured) or the
estimator's dated snapshot; the estimator says which fit (peak VRAM) and what each costs. An
explicit chain (``["runpod", "lambda", "local"]``) is tried in its order, cheapest (or
fastest) offer first within each provider; ``"auto"`` ranks every feasible offer of every
configured provider plus local by estimated total cost (or time).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loraburst.providers import Offer, Provider, get_provider

from ._exceptions import AuthError, BudgetExceededError, ConfigError, EstimateError, ProviderError

if TYPE_CHECKING:
    from ._estimate import Estimate, EstimateRow
    from ._job import Job

__all__ = ["Candidate", "configured_providers", "estimate_job", "plan", "resolve_providers"]

# Environment variables that mark a provider as configured for "auto".
_KEY_ENV = {
    "runpod": ("LORABURST_RUNPOD_API_KEY", "RUNPOD_API_KEY"),
    "lambda": ("LORABURST_LAMBDA_API_KEY", "LAMBDA_API_KEY"),
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An offer to try, with the estimator's row for it (None for the local CPU)."""

    provider: Provider
    offer: Offer
    row: EstimateRow | None

    @property
    def cost_high(self) -> float:
        return self.row.cost_high_usd if self.row else 0.0


def configured_providers() -> list[str]:
    """Providers whose API key is present in the environment, plus local."""
    names = [n for n, envs in _KEY_ENV.items() if any(os.environ.get(e) for e in envs)]
    return [*names, "local"]


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


def _offers(providers: Sequence[Provider], *, strict: bool) -> list[Offer]:
    offers: list[Offer] = []
    for p in providers:
        try:
            offers.extend(p.offers())
        except AuthError:
            if strict:
                raise  # a bad key fails before anything is created
        except ProviderError:
            if strict and len(providers) == 1:
                raise
    return offers


def estimate_job(
    job: Job,
    *,
    gpus: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    live: bool = True,
    offers: Sequence[Offer] | None = None,
) -> Estimate:
    """The estimate for ``job``; live offers from configured providers when ``live``."""
    from loraburst.providers.local import detect_gpus

    from ._estimate import estimate

    train, _ = job.prepare()
    st = train.stats
    if offers is None and live:
        names = [n for n in configured_providers() if n != "local"]
        if providers is not None:
            names = [n for n in names if n in providers]
        offers = _offers([get_provider(n) for n in names], strict=False) or None
    return estimate(
        job.spec,
        tokens=st.tokens or 0,
        rows=st.rows,
        tokens_exact=st.tokens_exact,
        gpus=gpus,
        providers=providers,
        offers=offers,
        local_gpus=detect_gpus(),
    )


def _gpu_ok(offer: Offer, gpu: Any) -> bool:
    if gpu is None:
        return True
    if isinstance(gpu, (int, float)):
        return bool(offer.vram_gb >= float(gpu))
    names = [gpu] if isinstance(gpu, str) else list(gpu)
    norm = {n.lower().replace("nvidia", "").replace(" ", "") for n in names}
    return offer.gpu.lower().replace(" ", "") in norm


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

    Raises:
        AuthError: an explicitly named provider rejected its key (nothing was created).
        BudgetExceededError: no feasible offer's upper cost bound is within ``max_cost``.
        EstimateError: nothing fits (the message says what would make it fit).
    """
    if prefer not in ("cheapest", "fastest"):
        raise ConfigError(f"prefer must be 'cheapest' or 'fastest', not {prefer!r}")
    chain = provider != "auto" and not (isinstance(provider, (list, tuple)) and "auto" in provider)
    providers = resolve_providers(provider)
    order = {p.name: i for i, p in enumerate(providers)}
    by_name = {p.name: p for p in providers}
    offers = _offers(providers, strict=True)
    cpu_offers = [o for o in offers if o.gpu == "cpu"]
    gpu_offers = [o for o in offers if o.gpu != "cpu"]
    rows: dict[tuple[str, str, int], EstimateRow] = {}
    est = None
    if gpu_offers:
        est = estimate_job(
            job, offers=gpu_offers, live=False, providers=[p.name for p in providers]
        )
        rows = {(r.provider, r.gpu, r.gpu_count): r for r in est.rows}
    cands: list[Candidate] = []
    skipped: list[str] = []
    unestimated: list[Offer] = list(cpu_offers)
    for o in gpu_offers:
        row = rows.get((o.provider, o.gpu, o.gpu_count))
        if row is None:
            unestimated.append(o)  # e.g. a bring-your-own host of unknown GPU
            continue
        if not row.fits:
            skipped.append(f"{o.provider} {o.gpu}: {row.note}")
            continue
        if not o.available or not _gpu_ok(o, gpu):
            continue
        if max_price_per_hour is not None and o.price_per_hour > max_price_per_hour:
            continue
        if deadline is not None and row.total_s > deadline:
            continue
        cands.append(Candidate(by_name[o.provider], o, row))
    # The local CPU and hosts of unknown GPU have no estimate: they come last, as given.
    if gpu is None:
        cands.extend(Candidate(by_name[o.provider], o, None) for o in unestimated)
    if not cands:
        detail = "\n  ".join(skipped) or "no offer matched the filters"
        raise EstimateError(f"no offer can run this job:\n  {detail}")
    if max_cost is not None:
        within = [c for c in cands if c.cost_high <= max_cost]
        if not within:
            best = min(cands, key=lambda c: c.cost_high)
            assert best.row is not None
            raise BudgetExceededError(
                f"max_cost ${max_cost:.2f} is below every feasible estimate: the cheapest is "
                f"{best.offer.provider} {best.offer.gpu} at ${best.row.cost_usd:.2f} "
                f"(range ${best.row.cost_low_usd:.2f}-${best.row.cost_high_usd:.2f}, "
                f"{best.row.total_s / 60:.0f} min). To fit, raise max_cost to "
                f"${best.row.cost_high_usd:.2f}, or cut train.max_steps to about "
                f"{_steps_within(job, best, max_cost)} steps, or choose a cheaper GPU."
            )
        cands = within

    def key(c: Candidate) -> tuple[float, ...]:
        metric = (c.row.total_s if prefer == "fastest" else c.row.cost_usd) if c.row else 1e18
        return (order[c.provider.name] if chain else 0, metric, c.offer.price_per_hour)

    return sorted(cands, key=key)


def _steps_within(job: Job, cand: Candidate, max_cost: float) -> int:
    """About how many optimizer steps ``max_cost`` buys on ``cand`` (setup paid first)."""
    row = cand.row
    assert row is not None
    per_hour = row.price_per_hour
    setup_cost = per_hour * row.setup_s / 3600 * (row.cost_high_usd / max(row.cost_usd, 1e-12))
    per_step = (row.cost_high_usd - setup_cost) / max(1, row.steps)
    return max(0, int((max_cost - setup_cost) / per_step)) if per_step > 0 else 0
