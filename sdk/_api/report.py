"""The report a finished job leaves beside its adapter: did it help, what did it cost.

``<output_dir>/<job id>/report.html`` is one self-contained page (styles inline, charts as
inline PNG ``data:`` images, no script, nothing fetched) and ``loss.png`` the loss curves, both
drawn from the ledger's row alone (the verified metrics with the run's timeline, the estimate and
what was measured), so ``loraburst report JOB`` redraws it at any time, for a cached or an
attached job alike.

Charts need matplotlib (``pip install 'loraburst[report]'``; the ``train`` extra has it): it is
imported only here, when a report is written, so the client never needs it otherwise. Without
it the page still has every table, and says how to get the charts.

A batch gets a page of its own comparing its jobs (loss, evaluation, cost), sortable by any
column (the one small inline script), linking each job's report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError

if TYPE_CHECKING:
    from .._progress import ProgressView
    from .._state.ledger import JobRow, Ledger
    from .batch import BatchResult

__all__ = ["LOSS_PNG", "REPORT_FILE", "finish", "series", "write_batch_report", "write_report"]

REPORT_FILE = "report.html"
LOSS_PNG = "loss.png"
PHASES = ("boot", "upload", "load", "train", "evaluate", "export", "pull", "teardown")
_CHARTS_HINT = "charts need matplotlib: pip install 'loraburst[report]'"

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;
     padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #d8dce3;padding:4px 8px;
     text-align:left;vertical-align:top}th{background:#f2f4f7}td.n{text-align:right}
.ok{color:#17702e;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#667}
.warn{background:#fff4d6;border:1px solid #e8c46a;padding:6px 10px;margin:6px 0}
.charts img{display:block;max-width:100%;margin:8px 0}
pre{white-space:pre-wrap;margin:0;font:12px/1.35 ui-monospace,monospace}
th.sort{cursor:pointer}
"""


# -- the job report -------------------------------------------------------------------------
def finish(
    ledger: Ledger,
    job_id: str,
    metrics: Mapping[str, Any],
    durations: Mapping[str, float],
    cost_usd: float,
    view: ProgressView,
) -> Path | None:
    """After a job came back: keep what it measured beside its estimate, write its report and
    say where (the report hook of the run chain). A report that cannot be written is said and
    skipped: the adapter and the money are already safe, the page can be redrawn with
    ``loraburst report``."""
    from .._cost.history import record_measured

    record_measured(ledger, job_id, metrics, durations, cost_usd)
    for warning in (metrics.get("timeline") or {}).get("warnings") or []:
        view.message(f"warning: {warning}")  # e.g. a GPU that sat mostly idle
    try:
        path = write_report(job_id, ledger=ledger)
    except (OSError, ValueError) as exc:
        view.message(f"report not written ({exc}); `loraburst report {job_id}` tries again")
        return None
    view.message(f"report: {path}")
    return path


def write_report(job_id: str, *, ledger: Ledger | None = None, folder: Path | None = None) -> Path:
    """Write ``report.html`` and ``loss.png`` for ``job_id`` (default: beside its adapter).

    Raises:
        ConfigError: no such job, or it has no adapter and no ``folder`` was given.
    """
    from .._state.ledger import Ledger

    ledger = ledger or Ledger()
    row = ledger.job(job_id)
    if row is None:
        raise ConfigError(f"no job {job_id!r} in the ledger; `loraburst ls` lists jobs")
    if folder is None:
        if not row.adapter_path:
            raise ConfigError(
                f"job {job_id} has no adapter ({row.status}); nothing to report beside it"
            )
        folder = Path(row.adapter_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    charts = _job_charts(row, folder)
    page = _job_page(row, charts)
    out = folder / REPORT_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def _job_page(row: JobRow, charts: list[tuple[str, str]] | None) -> str:
    m, plan, got = row.metrics, row.estimate, row.actual
    spec = json.loads(row.spec_json) if row.spec_json else {}
    ev = m.get("evaluation") or {}
    parts = [
        f"<h1>{_e(row.name or row.id)}: {_e(row.status)}</h1>",
        f"<p class=muted>job {_e(row.id)} · {_e(spec.get('model', '?'))} · "
        f"{_e(spec.get('method', '?'))} · {_e(row.provider or '?')} {_e(row.gpu or '')} · "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(row.created_at))}</p>",
        _verdict(ev),
        *(f"<div class=warn>{_e(w)}</div>" for w in _warnings(m)),
        "<h2>Did it help?</h2>",
        _eval_table(m, ev),
        "<h2>What did it cost?</h2>",
        _cost_table(row, plan, got),
        "<h2>Where the time went</h2>",
        _phase_table(got.get("phases") or {}, plan),
        "<h2>The run</h2>",
        _run_table(m, got),
    ]
    if charts is None:
        parts.append(f"<p class=muted>{_e(_CHARTS_HINT)}</p>")
    else:
        parts.append("<div class=charts>")
        parts += [
            f'<img class=chart alt="{_e(alt)}" title="{_e(alt)}" src="data:image/png;base64,{b64}">'
            for alt, b64 in charts
        ]
        parts.append("</div>")
    parts += ["<h2>Samples: base and tuned, same prompt, same decoding</h2>", _samples(ev)]
    # The plotted numbers, as data (never run): what the charts show, for tools and tests.
    data = json.dumps(series(row), separators=(",", ":")).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="series">{data}</script>')
    return _page(f"loraburst report: {row.id}", "\n".join(parts))


def _verdict(ev: Mapping[str, Any]) -> str:
    if not ev:
        return "<p class=muted>No evaluation: the job had no held-out rows.</p>"
    passed = ev.get("passed")
    css = "muted" if passed is None else ("ok" if passed else "bad")
    word = "no threshold set" if passed is None else ("passed" if passed else "NOT PASSING")
    return f"<p class={css}>Evaluation: {_e(word)}: {_e(ev.get('verdict', ''))}</p>"


def _warnings(m: Mapping[str, Any]) -> list[str]:
    line = m.get("timeline") or {}
    out = [str(w) for w in line.get("warnings") or []]
    tele = m.get("telemetry") or {}
    if tele.get("off") and m.get("device") == "cuda":  # on a CPU there is nothing to sample
        out.append(f"GPU telemetry was off: {tele['off']}")
    return out


def _eval_table(m: Mapping[str, Any], ev: Mapping[str, Any]) -> str:
    rows = [("metric", "base", "tuned", "change")]
    if ev:
        b, t = ev.get("base_eval_loss"), ev.get("tuned_eval_loss")
        rows.append(("held-out loss", _f(b), _f(t), _delta(b, t)))
        rows.append(("held-out perplexity", _ppl(b), _ppl(t), ""))
        tasks = ev.get("tasks") or {}
        if "error" in tasks:
            rows.append(("lm-eval tasks", "", "", str(tasks["error"])))
        for task, metrics in sorted(tasks.items()):
            if task == "error":
                continue
            for name, pair in sorted(metrics.items()):
                bb, tt = pair.get("base"), pair.get("tuned")
                rows.append((f"{task} {name}", _f(bb), _f(tt), _delta(bb, tt)))
    rows.append(("train loss (first -> final)", _f(m.get("first_loss")),
                 _f(m.get("final_loss")), _delta(m.get("first_loss"), m.get("final_loss"))))  # fmt: skip
    return _table(rows)


def _cost_table(row: JobRow, plan: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    rng = ""
    if plan:
        rng = f"{_money(plan.get('cost_low_usd'))} - {_money(plan.get('cost_high_usd'))}"
    rows = [
        ("", "estimate", "actual"),
        ("dollars", f"{_money(plan.get('cost_usd'))} ({rng})" if plan else "-",
         _money(row.cost_usd)),
        ("price per hour", _money(plan.get("price_per_hour")) if plan else "-", ""),
        ("total time", _dur(plan.get("total_s")), _dur(got.get("total_s"))),
        ("training time", _dur(plan.get("train_s")), _dur(got.get("train_s"))),
        ("tokens/s", _f(plan.get("tokens_per_s"), 0), _f(got.get("tokens_per_s"), 0)),
        ("peak GPU memory GiB", _f(plan.get("peak_vram_gb"), 1), _f(got.get("peak_vram_gb"), 1)),
    ]  # fmt: skip
    table = _table(rows)
    corr = plan.get("correction") if plan else None
    if corr:
        table += (
            f"<p class=muted>The estimate was corrected by {int(corr['jobs'])} earlier job(s) "
            f"on {_e(corr['provider'])} {_e(corr['gpu'])} ({_e(corr['family'])}): speed "
            f"x{corr['speed']:.2f}, overhead x{corr['overhead']:.2f}.</p>"
        )
    if not plan:
        table += "<p class=muted>No estimate: the job ran where the estimator has no model "
        table += "(a CPU, or a GPU the catalog does not know).</p>"
    return table


def _phase_table(phases: Mapping[str, float], plan: Mapping[str, Any]) -> str:
    rows = [("phase", "seconds")]
    rows += [(p, _f(phases[p], 1)) for p in PHASES if p in phases]
    if len(rows) == 1:
        return "<p class=muted>No phase timings recorded.</p>"
    return _table(rows)


def _run_table(m: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    tele = m.get("telemetry") or {}
    rows = [
        ("steps", f"{m.get('steps', '?')} of {m.get('total_steps', '?')}"),
        ("tokens trained", f"{m.get('train_tokens', 0):,}"),
        ("tokens/s", _f(m.get("tokens_per_s"), 0)),
        ("peak GPU memory GiB", _f(m.get("peak_vram_gb") or tele.get("peak_mem_gb"), 2)),
        ("mean GPU utilisation while training %", _f(tele.get("mean_util_training"), 0)),
        ("mean GPU power W", _f(tele.get("mean_power_w"), 0)),
        ("micro-batch / checkpointing / packing",
         f"{m.get('micro_batch_size')} / {m.get('gradient_checkpointing')} / {m.get('packing')}"),
        ("device", str(m.get("device", "?"))),
    ]  # fmt: skip
    return _table(rows)


def _samples(ev: Mapping[str, Any]) -> str:
    samples = ev.get("samples") or []
    if not samples:
        return "<p class=muted>No samples.</p>"
    out = ["<table><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>"]
    for s in samples:
        cells = [s.get("prompt", ""), s.get("reference", ""), s.get("base", ""), s.get("tuned", "")]
        out.append("<tr>" + "".join(f"<td><pre>{_e(c)}</pre></td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


# -- charts -----------------------------------------------------------------------------------
def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)  # files only: never a window, safe from any thread
    import matplotlib.pyplot as plt

    return plt


def series(row: JobRow) -> dict[str, Any]:
    """The numbers the charts are drawn from (also embedded in the page as JSON, for tools)."""
    m = row.metrics
    line = m.get("timeline") or {}
    steps = [s for s in line.get("steps") or [] if s[2] is not None]
    ev = m.get("evaluation") or {}
    t0 = (line.get("phases") or {}).get("training")
    tps = [(s[0], s[3]) for s in line.get("steps") or [] if s[3] is not None and s[0] is not None]
    gpu = [g for g in line.get("gpu") or [] if g[0] is not None and g[1] is not None]
    base = t0 or (tps[0][0] if tps else (gpu[0][0] if gpu else 0.0))
    phases = row.actual.get("phases") or {}
    return {
        "loss": {
            "step": [s[1] for s in steps] or list(m.get("loss_steps") or []),
            "loss": [s[2] for s in steps] or list(m.get("losses") or []),
        },
        "eval_loss": {"base": ev.get("base_eval_loss"), "tuned": m.get("eval_loss")},
        "tokens_per_s": {
            "minute": [round((t - base) / 60, 4) for t, _ in tps],
            "value": [v for _, v in tps],
        },
        "gpu": {
            "minute": [round((g[0] - base) / 60, 4) for g in gpu],
            "util": [g[1] for g in gpu],
            "mem_gb": [g[2] for g in gpu],
        },
        "phases": {p: float(phases[p]) for p in PHASES if p in phases},
    }


def _job_charts(row: JobRow, folder: Path) -> list[tuple[str, str]] | None:
    plt = _pyplot()
    if plt is None:
        return None
    data = series(row)
    loss, ev, tps, gpu = data["loss"], data["eval_loss"], data["tokens_per_s"], data["gpu"]
    charts: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(loss["step"], loss["loss"], color="#2f6fdf", lw=1.6, label="train loss")
    if ev["tuned"] is not None and loss["step"]:
        ax.scatter([loss["step"][-1]], [ev["tuned"]], color="#17702e", zorder=3,
                   label="tuned eval loss")  # fmt: skip
    if ev["base"] is not None:
        ax.axhline(ev["base"], color="#b3261e", ls="--", lw=1.2, label="base eval loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(folder / LOSS_PNG, dpi=110)
    charts.append(("Loss: train, tuned eval, base eval", _b64(fig, plt)))

    if tps["value"] or gpu["util"]:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        if tps["value"]:
            ax.plot(tps["minute"], tps["value"], color="#2f6fdf", lw=1.4, label="tokens/s")
            ax.legend(loc="lower left")
        ax.set(xlabel="minutes since training began", ylabel="tokens/s", title="Speed and GPU")
        ax.grid(alpha=0.3)
        if gpu["util"]:
            ax2 = ax.twinx()
            ax2.plot(gpu["minute"], gpu["util"], color="#e08a00", lw=1.2,
                     label="GPU utilisation %")  # fmt: skip
            ax2.set_ylim(0, 105)
            ax2.set_ylabel("GPU %")
            ax2.legend(loc="lower right")
        fig.tight_layout()
        charts.append(("Tokens per second and GPU utilisation over time", _b64(fig, plt)))

    shown = list(data["phases"].items())
    if shown:
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.32 * len(shown)))
        ax.barh([p for p, _ in shown][::-1], [s for _, s in shown][::-1], color="#6b8fd6")
        ax.set(xlabel="seconds", title="Phases")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        charts.append(("Time per phase", _b64(fig, plt)))
    return charts


def _b64(fig: Any, plt: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- the batch report -----------------------------------------------------------------------
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var up = th.getAttribute("data-dir") !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
    th.setAttribute("data-dir", up ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def write_batch_report(
    result: BatchResult, folder: Path, *, ledger: Ledger | None = None, name: str = "batch"
) -> Path:
    """A page comparing the batch's jobs (status, loss, evaluation, estimate and cost), each
    column sortable, each job linked to its own report. Returns its path."""
    from .._state.ledger import Ledger

    ledger = ledger or Ledger()
    head = ["job", "status", "provider", "gpu", "final loss", "base eval", "tuned eval",
            "drop", "passed", "est $", "spent $", "report"]  # fmt: skip
    body, points = [], []
    for r in result.rows:
        row = ledger.job(r.job_id) if r.job_id else None
        m = row.metrics if row else {}
        ev = m.get("evaluation") or {}
        plan = row.estimate if row else {}
        b: Any = ev.get("base_eval_loss")
        t: Any = ev.get("tuned_eval_loss", m.get("eval_loss"))
        report = Path(row.adapter_path).parent / REPORT_FILE if row and row.adapter_path else None
        link = (
            f'<a href="{_e(report.resolve().as_uri())}">report</a>'
            if report and report.is_file()
            else ""
        )
        passed = ev.get("passed")
        cells = [
            (r.name, r.name),
            (r.status, r.status),
            (r.provider or "", r.provider or ""),
            (r.gpu or "", r.gpu or ""),
            (_f(m.get("final_loss")), _num(m.get("final_loss"))),
            (_f(b), _num(b)),
            (_f(t), _num(t)),
            (_delta(b, t), b - t if _ok(b) and _ok(t) else ""),
            ("" if passed is None else ("yes" if passed else "NO"), str(passed)),
            (_money(plan.get("cost_usd")) if plan else "-", _num(plan.get("cost_usd"))),
            (_money(r.cost_usd), _num(r.cost_usd)),
        ]
        tds = "".join(f'<td data-v="{_e(str(v))}">{_e(c)}</td>' for c, v in cells)
        body.append(f"<tr>{tds}<td>{link}</td></tr>")
        if t is not None:
            points.append((r.name, float(t), float(r.cost_usd)))
    parts = [
        f"<h1>{_e(name)}: {len(result.rows)} jobs</h1>",
        f"<p>spent {_money(result.spent_usd)} of {_money(result.budget)}. Click a column to "
        "sort.</p>",
        "<table class=sortable id=jobs><thead><tr>"
        + "".join(f"<th class=sort>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>",
    ]
    plt = _pyplot()
    if plt is None:
        parts.append(f"<p class=muted>{_e(_CHARTS_HINT)}</p>")
    elif points:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        ax.scatter([p[2] for p in points], [p[1] for p in points], color="#2f6fdf", zorder=3)
        for label, loss, cost in points:
            ax.annotate(label, (cost, loss), textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel="dollars spent", ylabel="tuned eval loss", title="Eval loss against cost")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        parts.append('<div class=charts><img class=chart alt="Eval loss against cost" '
                     f'src="data:image/png;base64,{_b64(fig, plt)}"></div>')  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-report.html"
    out.write_text(_page(f"loraburst batch: {name}", "\n".join(parts), _SORT_SCRIPT), "utf-8")
    return out


# -- HTML helpers -----------------------------------------------------------------------------
def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}{tail}</body></html>\n"
    )


def _table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _f(x: Any, digits: int = 4) -> str:
    return f"{x:,.{digits}f}" if _ok(x) else "-"


def _num(x: Any) -> Any:
    return x if _ok(x) else ""


def _delta(before: Any, after: Any) -> str:
    return f"{after - before:+.4f}" if _ok(before) and _ok(after) else ""


def _ppl(loss: Any) -> str:
    return f"{math.exp(loss):,.2f}" if _ok(loss) and loss < 50 else "-"


def _money(x: Any) -> str:
    return f"${x:,.4f}" if _ok(x) else "-"


def _dur(seconds: Any) -> str:
    if not _ok(seconds):
        return "-"
    return f"{seconds:,.0f} s" if seconds < 600 else f"{seconds / 60:,.1f} min"
