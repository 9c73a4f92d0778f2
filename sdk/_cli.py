"""The ``loraburst`` command line. User errors print one clear message, never a traceback.

Only our own styling is rich markup: every piece of text that comes from a user (paths, job
names), a provider (messages, GPU names) or an instance (state, errors) is printed verbatim,
escaped or as ``Text`` — ``[/x]`` in a path once crashed the CLI with a MarkupError.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._exceptions import ConfigError, LoraburstError, TeardownError

if TYPE_CHECKING:
    from ._api.export import ExportResult

__all__ = ["main"]

_err = Console(stderr=True)
_out = Console()


_GPU_HELP = (
    "a GPU to allow (any spelling: 'RTX 3090', '3090'), optionally with a count: "
    "'2x RTX 3090' (two per instance); repeat for several"
)


def _cmd_validate(args: argparse.Namespace) -> int:
    from ._api.job import Job

    job = Job.from_yaml(args.job)
    try:
        train = job.validate()
    finally:
        # The report says what it found even when rows fail (the errors follow it).
        if args.report and job.report is not None:
            for line in job.report.lines():
                _out.print(line, markup=False, highlight=False, soft_wrap=True)
    _out.print(f"[green]valid[/]: {escape(str(args.job))}: {escape(train.stats.describe())}")
    if job.report is not None and not args.report:
        _out.print(
            job.report.summary() + " (--report for details)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ._api.job import Job

    job = Job.from_yaml(args.job)
    provider = args.provider[0] if len(args.provider) == 1 else args.provider
    result = job.run(
        provider=provider,
        gpu=args.gpu,
        max_cost=args.max_cost,
        max_price_per_hour=args.max_price_per_hour,
        prefer=args.prefer,
        cache=not args.no_cache,
    )
    _out.print(
        f"{result.status}: adapter at {result.adapter_path} "
        f"(job {result.job_id}, {result.provider} {result.gpu}, ${result.cost_usd:.4f})",
        markup=False,
    )
    _print_objective(result.metrics)
    _print_exports(result.exports, result.hub)
    ok = _print_evaluation(result.evaluation)
    if result.report_path is not None:
        _out.print(f"report: {result.report_path}", highlight=False, markup=False)
    return 0 if result.exports_ok and ok else 1


def _print_evaluation(ev: dict[str, Any]) -> bool:
    """The evaluation's verdict; False when it did not pass its threshold."""
    if not ev:
        return True
    passed = ev.get("passed")
    style = "" if passed is None else ("[green]" if passed else "[red]")
    _out.print(f"{style}evaluation: {escape(str(ev.get('verdict', '')))}{'[/]' if style else ''}",
               highlight=False)  # fmt: skip
    return passed is not False


def _print_objective(metrics: dict[str, Any] | None) -> None:
    from ._progress import objective_line

    line = objective_line(metrics or {})
    if line:
        _out.print(line, markup=False, highlight=False)


def _print_exports(exports: Sequence[ExportResult], hub: dict[str, Any] | None) -> None:
    for e in exports:
        _out.print(("[green]" if e.ok else "[red]") + e.describe() + "[/]", highlight=False)
        for c in e.checks:
            verdict = "measured" if c["ok"] is None else ("ok" if c["ok"] else "FAILED")
            _out.print(f"    {c['name']}: {verdict}: {c['detail']}", highlight=False, markup=False)
    if hub is not None:
        where = hub.get("url") or hub.get("repo")
        state = (
            f"pushed to {where} ({hub.get('commit')})"
            if hub.get("ok")
            else f"FAILED: {hub.get('error')}"
        )
        _out.print(f"hub: {state}", highlight=False, markup=False)


def _cmd_export(args: argparse.Namespace) -> int:
    from ._api.export import export

    hub = {"repo": args.hub_repo, "private": not args.public} if args.hub_repo else None
    run = export(
        args.source,
        args.to,
        model=args.model,
        prompt=args.prompt,
        hub=hub,
        output_dir=args.output_dir,
    )
    _out.print(f"exports in {run.folder / 'exports'}", highlight=False)
    _print_exports(run.results, run.hub)
    return 0 if run.ok else 1


def _cmd_estimate(args: argparse.Namespace) -> int:
    from ._api.job import Job

    job = Job.from_yaml(args.job)
    est = job.estimate(
        gpus=args.gpu or None, providers=args.provider or None, history=not args.no_history
    )
    if args.json:
        print(json.dumps(est.to_dicts(), indent=2))
    else:
        _out.print(est)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._state.ledger import Ledger

    ledger = Ledger()
    jobs = ledger.jobs()
    t = Table("job", "status", "provider", "gpu", "cost $", "adapter", title="jobs")
    for j in jobs:
        t.add_row(
            *_plain(
                j.id,
                j.status,
                j.provider or "",
                j.gpu or "",
                f"{j.cost_usd:.4f}",
                j.adapter_path or "",
            )
        )
    _out.print(t)
    # What each job was estimated at beside what it measured (the estimator learns from it).
    t = Table("job", "est $", "cost $", "est tok/s", "tok/s", "eval", title="estimate and actual")
    for j in jobs:
        plan, got = j.estimate, j.actual
        ev = j.metrics.get("evaluation") or {}
        passed = ev.get("passed")
        verdict = "" if passed is None else ("passed" if passed else "NOT PASSING")
        if not verdict and ev.get("tuned_eval_loss") is not None:
            verdict = f"{ev['base_eval_loss']:.3f}->{ev['tuned_eval_loss']:.3f}"
        t.add_row(
            *_plain(
                j.id,
                f"{plan['cost_usd']:.4f}" if plan.get("cost_usd") is not None else "-",
                f"{j.cost_usd:.4f}",
                f"{plan['tokens_per_s']:,.0f}" if plan.get("tokens_per_s") else "-",
                f"{got['tokens_per_s']:,.0f}" if got.get("tokens_per_s") else "-",
                verdict,
            )
        )
    _out.print(t)
    t = Table("instance tag", "provider", "id", "state", "$/h", "billed $", title="instances")
    for i in ledger.instances():
        t.add_row(
            *_plain(
                i.tag,
                i.provider,
                i.provider_id or "",
                i.state,
                f"{i.price_per_hour:.2f}",
                f"{i.billed_usd:.4f}",
            )
        )
    _out.print(t)
    return 0


def _plain(*cells: str) -> list[Text]:
    """Table cells shown exactly as written (a str cell would be parsed as markup)."""
    return [Text(c) for c in cells]


def _cmd_logs(args: argparse.Namespace) -> int:
    from ._state.home import runs_dir

    run = runs_dir() / args.job
    if not run.is_dir():
        raise ConfigError(f"no local run folder for job {args.job!r}; `loraburst ls` lists jobs")
    for name in ("events.jsonl", "agent.log"):
        p = run / name
        if p.is_file():
            print(p.read_text(encoding="utf-8", errors="replace"), end="")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._api.report import write_report

    path = write_report(args.job, folder=args.output_dir)
    _out.print(f"report: {path}", highlight=False, markup=False)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def _cmd_attach(args: argparse.Namespace) -> int:
    from ._api.job import Job

    result = Job.attach(args.job)
    _out.print(
        f"{result.status}: adapter at {result.adapter_path} (${result.cost_usd:.4f})",
        markup=False,
    )
    _print_objective(result.metrics)
    _print_exports(result.exports, result.hub)
    return 0 if result.exports_ok else 1


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from ._lifecycle.cleanup import cleanup

    report = cleanup(dry_run=args.dry_run, release_held=args.release_held)
    for line in report.lines():
        _out.print(line, markup=False, highlight=False)
    return 0 if report.ok else 1


def _cmd_batch(args: argparse.Namespace) -> int:
    from ._api.batch import Batch

    batch = Batch.from_yaml(args.batch)
    result = batch.run()
    _out.print(result.table())
    if result.report_path is not None:
        _out.print(f"report: {result.report_path}", highlight=False, markup=False)
    return 0 if result.all_ok else 1


def _cmd_version(args: argparse.Namespace) -> int:
    from loraburst import __version__

    from .remote.protocol import PROTOCOL_VERSION

    print(f"loraburst {__version__} (agent protocol {PROTOCOL_VERSION})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraburst", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("validate", help="check a job file and every dataset row")
    s.add_argument("job", type=Path)
    s.add_argument(
        "--report",
        action="store_true",
        help="print the data report: rows and tokens per source, lengths, duplicates, empty "
        "answers, echoes, encoding damage, each with file:line examples",
    )
    s.set_defaults(fn=_cmd_validate)
    s = sub.add_parser("run", help="run a job")
    s.add_argument("job", type=Path)
    s.add_argument(
        "--provider",
        action="append",
        default=None,
        help="provider name; repeat for a fallback chain; 'auto' for all",
    )
    s.add_argument("--gpu", action="append", default=None, help=_GPU_HELP)
    s.add_argument("--max-cost", type=float, default=None)
    s.add_argument("--max-price-per-hour", type=float, default=None)
    s.add_argument("--prefer", choices=["cheapest", "fastest"], default="cheapest")
    s.add_argument("--no-cache", action="store_true")
    s.set_defaults(fn=_cmd_run)
    s = sub.add_parser(
        "export", help="merge / GGUF / push a finished job's adapter (or an adapter folder)"
    )
    s.add_argument("source", help="a job id (`loraburst ls`) or an adapter folder")
    s.add_argument(
        "--to",
        action="append",
        required=True,
        help="merged[:dtype] or gguf:<f16|bf16|q8_0|q4_k_m|q5_k_m|...>; repeat for several",
    )
    s.add_argument("--model", default=None, help="the base model (default: the job's)")
    s.add_argument("--prompt", default=None, help="the user turn the checks generate from")
    s.add_argument("--hub-repo", default=None, help="push the verified exports to user/name")
    s.add_argument("--public", action="store_true", help="create the hub repo public")
    s.add_argument("--output-dir", type=Path, default=None, help="default: beside the adapter")
    s.set_defaults(fn=_cmd_export)
    s = sub.add_parser("estimate", help="time, peak VRAM and dollars on every GPU")
    s.add_argument("job", type=Path)
    s.add_argument("--gpu", action="append", default=[], help=_GPU_HELP)
    s.add_argument("--provider", action="append", default=[])
    s.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    s.add_argument(
        "--no-history",
        action="store_true",
        help="the raw model, without the correction learned from your finished jobs",
    )
    s.set_defaults(fn=_cmd_estimate)
    s = sub.add_parser("ls", help="jobs and instances, state and cost")
    s.set_defaults(fn=_cmd_ls)
    s = sub.add_parser(
        "report", help="write (or redraw) a finished job's HTML report beside its adapter"
    )
    s.add_argument("job")
    s.add_argument("--open", action="store_true", help="open it in the browser")
    s.add_argument("--output-dir", type=Path, default=None, help="default: beside the adapter")
    s.set_defaults(fn=_cmd_report)
    s = sub.add_parser("logs", help="a job's events and agent log")
    s.add_argument("job")
    s.set_defaults(fn=_cmd_logs)
    s = sub.add_parser(
        "attach",
        help="finish a job another client left (crashed, disk full): follow, pull, tear down; "
        "resume from its checkpoints if its instance is gone",
    )
    s.add_argument("job")
    s.set_defaults(fn=_cmd_attach)
    s = sub.add_parser("cleanup", help="terminate instances the ledger or providers left open")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument(
        "--release-held",
        action="store_true",
        help="also terminate instances kept for `attach` because this machine's disk was full "
        "(their adapter is lost)",
    )
    s.set_defaults(fn=_cmd_cleanup)
    s = sub.add_parser("batch", help="run a batch of jobs under one budget")
    s.add_argument("batch", type=Path)
    s.set_defaults(fn=_cmd_batch)
    s = sub.add_parser("version", help="print the version")
    s.set_defaults(fn=_cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loraburst`` console script."""
    args = _parser().parse_args(argv)
    if getattr(args, "provider", None) is None and args.command == "run":
        args.provider = ["local"]
    try:
        code: int = args.fn(args)
        return code
    except ConfigError as exc:
        _err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except TeardownError as exc:
        _err.print(
            f"[bold red]TEARDOWN FAILED:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return 3
    except LoraburstError as exc:
        _err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        _err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
