"""Running a job across a placement chain: failover, preemption/resume, Ctrl-C, teardown.

``attach`` finishes a job another client left: it claims the job (so ``cleanup`` keeps its
instance), follows it, pulls, and tears down; when the instance turns out to be gone it resumes
from the checkpoints kept in ``runs/<job>`` on the same provider and GPU. A full local disk at
pull-back holds the instance (see ``Attempt.hold``) and never rents the chain's next offer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from loraburst.remote.backends import mlx_refusals
from loraburst.remote.protocol import CHECKPOINT_DIR, ENV_ARTIFACTS

from .._api.export import export_cost, read_results
from .._api.report import finish as finish_report
from .._api.result import Attempt as AttemptRow
from .._api.result import JobResult, JobStatus
from .._cost import history
from .._data.bundle import Bundle, build_bundle
from .._data.model_folder import local_model_dir
from .._exceptions import (
    AuthError,
    CapacityError,
    ConfigError,
    HostKeyMismatchError,
    InstanceLostError,
    JobCancelledError,
    JobError,
    LocalStorageError,
    LoraburstError,
    PlacementError,
    ProviderError,
    TransportError,
)
from .._progress import ProgressView
from .._state.disk import check_outputs, storage_error
from .._state.home import home, runs_dir
from .._state.ledger import JobRow, Ledger
from .attempt import Attempt
from .owner import claim, release

if TYPE_CHECKING:
    from loraburst.providers import Provider

    from .._api.job import Job
    from .._cost.placement import Candidate

__all__ = ["attach", "execute"]

# Relaunches of the same offer after it was lost (preempted) before moving to the next one.
_LOST_RETRIES_PER_OFFER = 1
# Job statuses whose instance went away under them (the client died, it was preempted under
# attach, its disk was full): attach may resume these from their checkpoints.
_RESUMABLE = ("pending", "running", "interrupted", "held")


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
    from .._api.job import new_job_id
    from .._cost.placement import plan

    t_start = time.time()
    train, ev = job.prepare()  # every row checked before any money is spent
    ledger = ledger or Ledger()
    view = ProgressView(job.spec.name or "job", enabled=progress)

    cache_key = job.cache_key()
    if cache:
        hit = ledger.find_cached(cache_key)
        if hit is not None and hit.adapter_path and Path(hit.adapter_path).is_dir():
            view.message(f"cache hit: job {hit.id} trained this exact job; reusing its adapter")
            exports, hub = read_results(Path(hit.adapter_path).parent)
            return JobResult(
                job_id=hit.id,
                status="cached",
                adapter_path=Path(hit.adapter_path),
                metrics=hit.metrics,
                provider=hit.provider,
                gpu=hit.gpu,
                cost_usd=0.0,
                durations={"total": time.time() - t_start},
                exports=exports,
                hub=hub,
                report_path=_existing_report(Path(hit.adapter_path)),
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
    # Every place this job will write, checked before anything is rented.
    output_dir = check_outputs(
        job.spec,
        pulls_checkpoints=any(not c.provider.capabilities.same_machine for c in candidates),
    )

    for cand in candidates:  # a Mac (MLX) that cannot train the job: say so before anything
        if _backend(job.spec.train.backend, cand.provider) == "mlx":
            _refuse_mlx_gaps(job, cand.provider.name)
    t0 = time.time()
    try:
        bundle = build_bundle(job.spec, train, ev)
    except OSError as exc:
        raise storage_error(exc, home() / "bundles") from exc
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
    if job.report is not None:  # the data report, kept with the run (runs/<job>/data_report.json)
        job.report.save(runs_dir() / job_id)
        view.message(job.report.summary())
    env = _agent_env(job.spec.artifacts, job_id, env, hub=job.spec.hub is not None)
    with view, _sigterm_as_interrupt():
        return _guarded(
            job_id,
            ledger,
            lambda: _run_chain(
                job_id,
                candidates,
                bundle,
                ledger,
                view,
                output_dir,
                max_cost=max_cost,
                max_runtime=job.spec.max_runtime,
                env=env,
                durations=durations,
                t_start=t_start,
                disk_gb=_disk_gb(job.spec.model, job.spec.exports),
                requested_backend=job.spec.train.backend,
            ),
        )


def _guarded(job_id: str, ledger: Ledger, chain: Callable[[], JobResult]) -> JobResult:
    """Run ``chain``; a job that ends in an error is never left ``running`` in the ledger."""
    try:
        return chain()
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


def _agent_env(
    artifacts: str | None, job_id: str, env: Mapping[str, str] | None, *, hub: bool = False
) -> dict[str, str]:
    """The agent's environment: the caller's, plus S3 checkpointing under ``<artifacts>/<job>``
    with the client's AWS credentials when ``artifacts=`` is set, and ``HF_TOKEN`` for a hub
    push (over SSH only, like every value here)."""
    out = dict(env or {})
    if hub and "HF_TOKEN" in os.environ:
        out.setdefault("HF_TOKEN", os.environ["HF_TOKEN"])  # for the push, over SSH only
    if artifacts:
        out.setdefault(ENV_ARTIFACTS, f"{artifacts.rstrip('/')}/{job_id}")
        for key in _AWS_ENV:
            if key in os.environ:
                out.setdefault(key, os.environ[key])
    return out


def _disk_gb(model: str, exports: list[Any]) -> int:
    """The instance disk the job's exports need (the providers' default without any)."""
    from .._cost.shapes import model_shape
    from .._exceptions import EstimateError

    try:
        ms = model_shape(model)
    except EstimateError:
        return 50 if exports == [{"kind": "adapter"}] else 200
    return export_cost(exports, ms.params, ms.download_bytes).disk_gb


def _run_chain(
    job_id: str,
    candidates: list[Candidate],
    bundle: Bundle,
    ledger: Ledger,
    view: ProgressView,
    output_dir: Path,
    *,
    max_cost: float | None,
    max_runtime: float | None,
    env: Mapping[str, str] | None,
    durations: dict[str, float],
    t_start: float,
    spent: float = 0.0,
    disk_gb: int = 50,
    requested_backend: str = "auto",
) -> JobResult:
    attempts: list[AttemptRow] = []
    resume_dir = runs_dir() / job_id / CHECKPOINT_DIR
    index, lost_here = 0, 0
    while index < len(candidates):
        cand = candidates[index]
        backend = _backend(requested_backend, cand.provider)
        run = Attempt(
            job_id=job_id,
            attempt=ledger.next_attempt(job_id),
            provider=cand.provider,
            offer=cand.offer,
            ledger=ledger,
            view=view,
            spent_before=spent,
            max_cost=max_cost,
            max_runtime=max_runtime,
            env=env,
            disk_gb=disk_gb,
            backend=backend,
        )
        label = f"{cand.provider.name} {cand.offer.gpu}"
        ledger.update_job(job_id, status="running", provider=cand.provider.name, gpu=cand.offer.gpu)
        history.record_planned(ledger, job_id, cand.provider.name, cand.row)  # history hook
        view.rate(cand.offer.price_per_hour)  # the progress line's $/h
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
            adapter, metrics = _collect_or_hold(run, output_dir)
        except KeyboardInterrupt:
            outcome = "cancelled"
            raise JobCancelledError(
                f"job {job_id} was cancelled during {label}; nothing is left running", job_id=job_id
            ) from None
        except (CapacityError, AuthError) as exc:
            outcome = f"{'capacity' if isinstance(exc, CapacityError) else 'auth'}: {exc}"
            index += 1
            continue
        except InstanceLostError as exc:
            outcome = f"lost: {exc}"
            lost_here += 1
            if lost_here > _LOST_RETRIES_PER_OFFER:
                index, lost_here = index + 1, 0
            view.message(f"{exc}; relaunching and resuming from the last checkpoint")
            continue
        except HostKeyMismatchError as exc:
            # Another machine answers at the instance's address: stop here, tear down, and
            # rent nothing else until a person has looked.
            outcome = f"host key: {exc}"
            raise
        except LocalStorageError as exc:
            # This machine's disk, not the offer: the next offer would meet the same disk.
            outcome = f"local disk: {exc}"
            raise
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
                if not run.held:
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
        status = _status(state.phase, run.state.stop_reason, run.stop_requested)
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
        report_path = finish_report(ledger, job_id, metrics, durations, spent, view)
        exports, hub = read_results(adapter.parent)  # exports hook: made and checked remotely
        for e in exports:
            view.message(e.describe())
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
            exports=exports,
            hub=hub,
            report_path=report_path,
        )
    ledger.update_job(job_id, status="failed")
    raise PlacementError(
        f"job {job_id}: every offer failed", [(a.provider, a.gpu, a.outcome) for a in attempts]
    )


def _collect_or_hold(run: Attempt, output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``run.collect``; when this machine cannot store the adapter, hold the instance that has
    its only copy (for ``loraburst attach``) instead of letting teardown destroy it."""
    try:
        return run.collect(output_dir)
    except LocalStorageError as exc:
        raise run.hold(exc) from exc


def _existing_report(adapter: Path) -> Path | None:
    from .._api.report import REPORT_FILE

    report = adapter.parent / REPORT_FILE
    return report if report.is_file() else None


def _backend(requested: str, provider: Provider) -> str | None:
    """``train.backend`` as ``provider``'s machine will resolve it: ``auto`` follows the
    provider's declared ``capabilities.backend`` (the local provider says ``"mlx"`` on Apple
    Silicon); without one, None: the instance resolves it (MLX on a Mac)."""
    return requested if requested != "auto" else provider.capabilities.backend


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
    """Finish ``job_id`` for a client that is gone: follow its open instance, pull, tear down;
    when that instance is gone, resume from the local checkpoints on the same provider and GPU.

    Raises:
        ConfigError: no such job.
        JobError: another live process follows it, or it cannot be finished or resumed.
        LocalStorageError: this machine still cannot store the adapter (the instance is held).
    """
    from loraburst.providers import get_provider

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
        return _resume(row, ledger, providers, progress)
    inst = open_rows[-1]
    prov = (providers or {}).get(inst.provider) or get_provider(inst.provider)
    claim(job_id)  # from here on `loraburst cleanup` leaves this job's instance alone
    spec = json.loads(row.spec_json)
    view = ProgressView(row.name or job_id, enabled=progress)
    # The job's cost so far, without what this instance billed before a hold (recounted below).
    spent_before = max(0.0, row.cost_usd - inst.billed_usd)
    run = Attempt.resume(job_id=job_id, instance=inst, provider=prov, ledger=ledger, view=view,
                         spent_before=spent_before)  # fmt: skip
    output_dir = Path(spec.get("output_dir", "outputs")).expanduser()
    t0 = time.time()
    lost: InstanceLostError | None = None
    with view, _sigterm_as_interrupt():
        try:
            run.locate()
            run.connect()
            state = run.follow()
            adapter, metrics = _collect_or_hold(run, output_dir)
        except InstanceLostError as exc:
            lost = exc
        except KeyboardInterrupt:
            ledger.update_job(job_id, status="failed", error="cancelled during attach")
            raise JobCancelledError(
                f"job {job_id} was cancelled during attach; its instance was torn down",
                job_id=job_id,
            ) from None
        except LoraburstError as exc:
            if not run.held:
                ledger.update_job(job_id, status="failed", error=str(exc)[:500])
            raise
        finally:
            try:
                if not run.held:
                    run.teardown()
            finally:
                release(job_id)
                billed = run.cost_so_far() if run.launched_at else 0.0
                ledger.update_job(job_id, cost_usd=spent_before + billed)
    if lost is not None:
        ledger.update_job(job_id, status="interrupted", error=str(lost)[:500])
        again = ledger.job(job_id)
        assert again is not None
        return _resume(again, ledger, providers, progress, lost=lost)
    status = _status(state.phase, state.stop_reason, None)
    cost = spent_before + run.cost_so_far()
    ledger.update_job(
        job_id,
        status=status,
        adapter_path=str(adapter),
        metrics_json=json.dumps(metrics),
        cost_usd=cost,
        error=None,
    )
    exports, hub = read_results(adapter.parent)
    durations = {**run.durations, "total": time.time() - t0}
    report_path = finish_report(ledger, job_id, metrics, durations, cost, view)
    return JobResult(
        job_id=job_id,
        status=status,
        adapter_path=adapter,
        metrics=metrics,
        provider=inst.provider,
        gpu=inst.gpu,
        cost_usd=cost,
        durations=durations,
        exports=exports,
        hub=hub,
        report_path=report_path,
    )


def _resume(
    row: JobRow,
    ledger: Ledger,
    providers: Mapping[str, Provider] | None,
    progress: bool,
    *,
    lost: InstanceLostError | None = None,
) -> JobResult:
    """Relaunch a job whose instance is gone on the provider and GPU it last ran on, and resume
    from the newest checkpoint kept locally (what ``Job.run`` does after a preemption).

    Raises:
        InstanceLostError: nothing to resume from, or no such offer right now (the job stays
            resumable: attach again later).
        JobError: the job's bundle is gone from this machine.
    """
    from loraburst.providers import get_provider

    from .._cost.placement import Candidate

    job_id = row.id
    gone = f"{lost}; " if lost else f"job {job_id} has no running instance; "
    if row.status not in _RESUMABLE:
        # It ended for a reason of its own (a training error, a cancel, the budget): running
        # it again is the user's call, not attach's.
        raise JobError(
            f"{gone}it ended {row.status}"
            + (f" ({row.error})" if row.error else "")
            + "; nothing to attach to",
            job_id=job_id,
        )
    ckpt_dir = runs_dir() / job_id / CHECKPOINT_DIR
    complete = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    previous = ledger.instances(job_id=job_id)
    if not complete or not previous:
        if row.status in ("running", "interrupted", "pending"):
            ledger.update_job(job_id, status="failed", error=f"{gone}nothing to resume from")
        raise InstanceLostError(
            f"{gone}no checkpoint of it was kept in {ckpt_dir}, so it cannot be resumed; "
            f"run the job again (status {row.status})",
            job_id=job_id,
        )
    bundle_path = home() / "bundles" / f"{row.bundle_sha256}.tar"
    if not row.bundle_sha256 or not bundle_path.is_file():
        raise JobError(
            f"{gone}its bundle {bundle_path} is no longer on this machine, so it cannot be "
            "resumed; run the job again",
            job_id=job_id,
        )
    last = previous[-1]
    prov = (providers or {}).get(last.provider) or get_provider(last.provider)
    offers = [o for o in prov.offers() if o.gpu == last.gpu and o.available]
    if not offers:
        ledger.update_job(job_id, status="interrupted", error=f"{gone}no {last.gpu} offer")
        raise InstanceLostError(
            f"{gone}{last.provider} has no {last.gpu} to resume on right now; its checkpoints "
            f"are kept in {ckpt_dir}: run `loraburst attach {job_id}` again later",
            job_id=job_id,
        )
    offer = min(offers, key=lambda o: o.price_per_hour)
    spec = json.loads(row.spec_json)
    latest = max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    view = ProgressView(row.name or job_id, enabled=progress)
    bundle = Bundle(
        path=bundle_path,
        sha256=row.bundle_sha256,
        size=bundle_path.stat().st_size,
        files=0,
        model_dir=local_model_dir(str(spec.get("model", ""))),  # weights travel beside it
    )
    with view, _sigterm_as_interrupt():
        view.message(
            f"{gone}relaunching on {last.provider} {last.gpu}, resuming from {latest.name}"
        )
        return _guarded(
            job_id,
            ledger,
            lambda: _run_chain(
                job_id,
                [Candidate(prov, offer, None)],
                bundle,
                ledger,
                view,
                Path(spec.get("output_dir", "outputs")).expanduser(),
                max_cost=spec.get("max_cost"),
                max_runtime=spec.get("max_runtime"),
                env=_agent_env(spec.get("artifacts"), job_id, None, hub=bool(spec.get("hub"))),
                durations={},
                t_start=time.time(),
                spent=row.cost_usd,
                disk_gb=_disk_gb(str(spec.get("model", "")), spec.get("exports") or []),
                requested_backend=str(spec.get("train", {}).get("backend", "auto")),
            ),
        )
