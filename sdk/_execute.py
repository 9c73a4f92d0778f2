"""Running a job across a placement chain: failover, preemption/resume, Ctrl-C, teardown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from loraburst.remote.backends import mlx_refusals
from loraburst.remote.protocol import CHECKPOINT_DIR, ENV_ARTIFACTS

from ._bundle import build_bundle
from ._exceptions import (
    AuthError,
    CapacityError,
    ConfigError,
    JobCancelledError,
    JobError,
    LoraburstError,
    PlacementError,
    ProviderError,
    TransportError,
)
from ._home import runs_dir
from ._ledger import Ledger
from ._progress import ProgressView
from ._result import Attempt as AttemptRow
from ._result import JobResult, JobStatus
from ._runner import Attempt, Lost

if TYPE_CHECKING:
    from loraburst.providers import Provider

    from ._job import Job
    from ._placement import Candidate

__all__ = ["attach", "execute"]

# Relaunches of the same offer after it was lost (preempted) before moving to the next one.
_LOST_RETRIES_PER_OFFER = 1


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C so that teardown always runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(
    job: Job,
    provider: Any,
    *,
    gpu: Any = None,
    max_price_per_hour: float | None = None,
    prefer: str = "cheapest",
    deadline: float | None = None,
    max_cost: float | None = None,
    cache: bool = True,
    progress: bool = True,
    env: Mapping[str, str] | None = None,
    ledger: Ledger | None = None,
    allow_partial: bool = False,
) -> JobResult:
    """See ``Job.run``."""
    from ._job import new_job_id
    from ._placement import plan

    t_start = time.time()
    train, ev = job.prepare()  # every row checked before any money is spent
    ledger = ledger or Ledger()
    view = ProgressView(job.spec.name or "job", enabled=progress)

    cache_key = job.cache_key()
    if cache:
        hit = ledger.find_cached(cache_key)
        if hit is not None and hit.adapter_path and Path(hit.adapter_path).is_dir():
            view.message(f"cache hit: job {hit.id} trained this exact job; reusing its adapter")
            return JobResult(
                job_id=hit.id,
                status="cached",
                adapter_path=Path(hit.adapter_path),
                metrics=hit.metrics,
                provider=hit.provider,
                gpu=hit.gpu,
                cost_usd=0.0,
                durations={"total": time.time() - t_start},
            )

    candidates = plan(
        job,
        provider,
        gpu=gpu,
        max_price_per_hour=max_price_per_hour,
        prefer=prefer,
        deadline=deadline,
        max_cost=None if allow_partial else max_cost,
    )

    for cand in candidates:  # a Mac (MLX) that cannot train the job: say so before anything
        if _backend(job, cand.provider) == "mlx":
            _refuse_mlx_gaps(job, cand.provider.name)
    t0 = time.time()
    bundle = build_bundle(job.spec, train, ev)
    durations = {"bundle": time.time() - t0}

    job_id = new_job_id(job.spec.name)
    ledger.create_job(
        job_id,
        name=job.spec.name,
        cache_key=cache_key,
        bundle_sha256=bundle.sha256,
        spec_json=json.dumps(job.spec.model_dump(mode="json", exclude={"dataset", "eval_dataset"})),
    )
    (runs_dir() / job_id).mkdir(parents=True, exist_ok=True)
    view.message(
        f"job {job_id}: bundle {bundle.sha256[:12]} ({bundle.size / 1e6:.1f} MB), "
        f"{train.stats.describe()}"
    )
    output_dir = Path(job.spec.output_dir).expanduser()
    env = _agent_env(job, job_id, env)
    with view, _sigterm_as_interrupt():
        try:
            return _run_chain(
                job,
                job_id,
                candidates,
                bundle,
                ledger,
                view,
                output_dir,
                max_cost=max_cost,
                env=env,
                durations=durations,
                t_start=t_start,
            )
        except LoraburstError as exc:
            row = ledger.job(job_id)
            exc.context.update(job_id=job_id, cost_usd=row.cost_usd if row else 0.0)
            if row is not None and row.status == "running":
                ledger.update_job(job_id, status="failed", error=str(exc)[:500])
            raise


# Forwarded to the agent (over SSH, never into the bundle or ledger) when artifacts= is set.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def _agent_env(job: Job, job_id: str, env: Mapping[str, str] | None) -> dict[str, str]:
    """The agent's environment: the caller's, plus S3 checkpointing under ``<artifacts>/<job>``
    with the client's AWS credentials when ``artifacts=`` is set."""
    out = dict(env or {})
    if job.spec.artifacts:
        out.setdefault(ENV_ARTIFACTS, f"{job.spec.artifacts.rstrip('/')}/{job_id}")
        for key in _AWS_ENV:
            if key in os.environ:
                out.setdefault(key, os.environ[key])
    return out


def _run_chain(
    job: Job,
    job_id: str,
    candidates: list[Candidate],
    bundle: Any,
    ledger: Ledger,
    view: ProgressView,
    output_dir: Path,
    *,
    max_cost: float | None,
    env: Mapping[str, str] | None,
    durations: dict[str, float],
    t_start: float,
) -> JobResult:
    attempts: list[AttemptRow] = []
    spent = 0.0
    resume_dir = runs_dir() / job_id / CHECKPOINT_DIR
    index, lost_here = 0, 0
    while index < len(candidates):
        cand = candidates[index]
        backend = _backend(job, cand.provider)
        run = Attempt(
            job_id=job_id,
            attempt=ledger.next_attempt(job_id),
            provider=cand.provider,
            offer=cand.offer,
            ledger=ledger,
            view=view,
            spent_before=spent,
            max_cost=max_cost,
            max_runtime=job.spec.max_runtime,
            env=env,
            backend=backend,
        )
        label = f"{cand.provider.name} {cand.offer.gpu}"
        ledger.update_job(job_id, status="running", provider=cand.provider.name, gpu=cand.offer.gpu)
        outcome = "ok"
        try:
            view.message(f"launching on {label} (${cand.offer.price_per_hour:.2f}/h)")
            run.provision()
            run.connect()
            run.start(bundle, resume_from=resume_dir)
            try:
                state = run.follow()
            except KeyboardInterrupt:
                state = _stop_gracefully(run)
            adapter, metrics = run.collect(output_dir)
        except KeyboardInterrupt:
            outcome = "cancelled"
            raise JobCancelledError(
                f"job {job_id} was cancelled during {label}; nothing is left running", job_id=job_id
            ) from None
        except (CapacityError, AuthError) as exc:
            outcome = f"{'capacity' if isinstance(exc, CapacityError) else 'auth'}: {exc}"
            index += 1
            continue
        except Lost as exc:
            outcome = f"lost: {exc}"
            lost_here += 1
            if lost_here > _LOST_RETRIES_PER_OFFER:
                index, lost_here = index + 1, 0
            view.message(f"{exc}; relaunching and resuming from the last checkpoint")
            continue
        except TransportError as exc:
            outcome = f"transport: {exc}"
            index += 1
            continue
        except ProviderError as exc:
            outcome = f"provider: {exc}"
            index += 1
            continue
        finally:
            try:
                run.teardown()
            finally:
                spent += run.cost_so_far() if run.launched_at else 0.0
                attempts.append(
                    AttemptRow(
                        cand.provider.name,
                        cand.offer.gpu,
                        outcome.splitlines()[0][:200],
                        run.cost_so_far(),
                    )
                )
                ledger.update_job(job_id, cost_usd=spent)
                if outcome not in ("ok",) and outcome != "cancelled":
                    ledger.update_job(job_id, error=outcome[:500])
        status = _status(state.phase, _stop_reason(run), run.stop_requested)
        durations.update(run.durations)
        durations["total"] = time.time() - t_start
        ledger.update_job(
            job_id,
            status=status,
            adapter_path=str(adapter),
            metrics_json=json.dumps(metrics),
            cost_usd=spent,
            error=None,
        )
        view.message(f"adapter: {adapter} ({status}, ${spent:.4f})")
        if run.stop_requested == "user":
            raise JobCancelledError(
                f"job {job_id} was cancelled; its partial adapter is at "
                f"{adapter} and nothing is left running",
                job_id=job_id,
            )
        return JobResult(
            job_id=job_id,
            status=status,
            adapter_path=adapter,
            metrics=metrics,
            provider=cand.provider.name,
            gpu=cand.offer.gpu,
            cost_usd=spent,
            durations=durations,
            attempts=tuple(attempts),
        )
    ledger.update_job(job_id, status="failed")
    raise PlacementError(
        f"job {job_id}: every offer failed", [(a.provider, a.gpu, a.outcome) for a in attempts]
    )


def _backend(job: Job, provider: Any) -> str | None:
    """``train.backend`` as ``provider``'s machine will resolve it: ``auto`` follows the
    provider's ``default_backend`` (the local provider says ``"mlx"`` on Apple Silicon);
    without one, None: the instance resolves it (MLX on a Mac)."""
    requested = job.spec.train.backend
    backend = requested if requested != "auto" else getattr(provider, "default_backend", None)
    return None if backend is None else str(backend)


def _refuse_mlx_gaps(job: Job, provider: str) -> None:
    """Refuse an ``auto`` job that will train with MLX where MLX cannot honour its settings
    (an explicit ``train.backend: mlx`` was already refused by the spec itself).

    Raises:
        ConfigError: naming each such setting and the alternative.
    """
    refusals = mlx_refusals(job.spec.model_dump(mode="json"))
    if refusals:
        raise ConfigError(
            f"{provider} trains with MLX here (train.backend: auto on Apple Silicon), which "
            "cannot train this job:\n  " + "\n  ".join(refusals)
        )


def _stop_gracefully(run: Attempt) -> Any:
    """First Ctrl-C: ask the agent to checkpoint and save; a second one skips the wait."""
    run.request_stop("user")
    run.stop_wait_s = min(run.stop_wait_s, 180.0)
    deadline = time.time() + run.stop_wait_s

    def bounded(r: Attempt) -> None:
        if time.time() > deadline:
            raise KeyboardInterrupt("stop wait timed out")

    try:
        state = run.follow(on_tick=bounded)
    except KeyboardInterrupt:
        raise
    run.view.message("stopped by user; pulling the partial adapter")
    return state


def _stop_reason(run: Attempt) -> str | None:
    """The agent's stop reason, with a deadline set by the budget reported as ``"budget"``.

    The agent stops at the deadline the runner derived from ``max_cost`` at about the moment
    the runner itself asks for a budget stop; whichever comes first, the cap was the cause.
    """
    reason: str | None = run.state.stop_reason
    if reason != "deadline" or run.max_cost is None or run.offer.price_per_hour <= 0:
        return reason
    if run.max_runtime is None:
        return "budget"
    budget_s = (run.max_cost - run.spent_before) / run.offer.price_per_hour * 3600.0
    return (
        "budget" if budget_s <= run.max_runtime + 45.0 + run.offer.billing_increment_s else reason
    )


def _status(phase: str, stop_reason: str | None, requested: str | None) -> Any:
    if phase == "done":
        return "succeeded"
    reason = stop_reason or requested
    if reason == "budget":
        return "budget_exhausted"
    return "stopped"


def _status_of(text: str) -> JobStatus:
    for status in ("succeeded", "budget_exhausted", "stopped", "cached"):
        if text == status:
            return status
    return "failed"


def attach(
    job_id: str, *, providers: Mapping[str, Provider] | None = None, progress: bool = True
) -> JobResult:
    """Re-attach to ``job_id``'s open instance, finish following it, pull, tear down."""
    from loraburst.providers import Offer, get_provider

    ledger = Ledger()
    row = ledger.job(job_id)
    if row is None:
        raise ConfigError(f"no job {job_id!r} in the ledger; `loraburst ls` lists jobs")
    open_rows = ledger.instances(job_id=job_id, open_only=True)
    if not open_rows:
        if row.adapter_path:
            return JobResult(
                job_id=job_id,
                status=_status_of(row.status),
                adapter_path=Path(row.adapter_path),
                metrics=row.metrics,
                provider=row.provider,
                gpu=row.gpu,
                cost_usd=row.cost_usd,
                durations={},
            )
        raise JobError(
            f"job {job_id} has no running instance to attach to (status {row.status})",
            job_id=job_id,
        )
    inst = open_rows[-1]
    prov = (providers or {}).get(inst.provider) or get_provider(inst.provider)
    offer = Offer(
        provider=inst.provider,
        gpu=inst.gpu or "?",
        gpu_count=1,
        vram_gb=0,
        price_per_hour=inst.price_per_hour,
        instance_type=inst.gpu or "?",
        billing_increment_s=inst.billing_increment_s,
    )
    view = ProgressView(row.name or job_id, enabled=progress)
    run = Attempt(
        job_id=job_id,
        attempt=inst.attempt,
        provider=prov,
        offer=offer,
        ledger=ledger,
        view=view,
        spent_before=row.cost_usd,
    )
    run.tag = inst.tag
    from loraburst.providers import _keys

    run.key_path = _keys.key_path(inst.tag)
    run.launched_at = inst.launched_at
    spec = json.loads(row.spec_json)
    output_dir = Path(spec.get("output_dir", "outputs")).expanduser()
    t0 = time.time()
    machine = prov.get(inst.provider_id) if inst.provider_id else prov.find(inst.tag)
    with view, _sigterm_as_interrupt():
        try:
            if machine is None or machine.status in ("terminated", "preempted"):
                raise JobError(
                    f"job {job_id}'s instance {inst.provider_id} is gone; its "
                    f"checkpoints are in {runs_dir() / job_id}",
                    job_id=job_id,
                )
            run.machine = machine
            run.connect()
            state = run.follow()
            adapter, metrics = run.collect(output_dir)
        finally:
            run.teardown()
    status = _status(state.phase, state.stop_reason, None)
    cost = row.cost_usd + run.cost_so_far()
    ledger.update_job(
        job_id,
        status=status,
        adapter_path=str(adapter),
        metrics_json=json.dumps(metrics),
        cost_usd=cost,
    )
    return JobResult(
        job_id=job_id,
        status=status,
        adapter_path=adapter,
        metrics=metrics,
        provider=inst.provider,
        gpu=inst.gpu,
        cost_usd=cost,
        durations={"total": time.time() - t0},
    )
