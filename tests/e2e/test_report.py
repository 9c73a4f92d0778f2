"""After the run: evaluation before teardown, the report beside the adapter (parsed, and
rendered in a real headless Chromium), what the ledger keeps, and the CLI that shows it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from loraburst import Job, JobResult
from loraburst._api.batch import BatchResult, BatchRow
from loraburst._api.report import write_batch_report, write_report
from loraburst._cli import main
from loraburst._state.ledger import Ledger

from tests.conftest import ROOT, SAMPLE_DATA

EVAL_DATA = ROOT / "examples" / "data" / "chat_eval.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobResult]:
    """One quickstart-shaped job with evaluation (and a threshold it cannot meet), run once
    for every test here in a home of its own."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORABURST_HOME", str(root / "home"))
        job = Job(
            str(tiny_model),
            SAMPLE_DATA,
            eval_dataset=EVAL_DATA,
            name="report",
            output_dir=root / "out",
            train={
                "max_steps": 10,
                "micro_batch_size": 8,
                "learning_rate": 5e-3,
                "max_seq_len": 128,
                "save_every_steps": 100,
            },  # fmt: skip
            evaluation={"samples": 2, "max_new_tokens": 12, "min_loss_drop": 50.0},
        )
        yield job.run(provider="local", progress=False)


@pytest.fixture
def its_home(finished: JobResult, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    assert finished.adapter_path is not None
    home = finished.adapter_path.parents[2] / "home"
    monkeypatch.setenv("LORABURST_HOME", str(home))
    return Ledger()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.series = ""
        self._in_series = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_series = tag == "script" and dict(attrs).get("id") == "series"

    def handle_endtag(self, tag: str) -> None:
        self._in_series = False

    def handle_data(self, data: str) -> None:
        if self._in_series:
            self.series += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _external(page: _Page) -> list[str]:
    """Every attribute that would make the browser fetch something from elsewhere."""
    out = []
    for tag, attrs in page.tags:
        for name in ("src", "href", "data", "poster", "srcset"):
            value = (attrs.get(name) or "").strip().lower()
            if value and not value.startswith(("data:", "#", "file:")):
                out.append(f"<{tag} {name}={value[:60]}>")
        if tag == "link" or (tag == "script" and attrs.get("src")):
            out.append(f"<{tag}>")
    return out


def test_evaluation_comes_back_and_a_threshold_marks_without_losing(finished: JobResult) -> None:
    r = finished
    assert r.status == "succeeded" and r.ok
    assert r.adapter_path is not None and (r.adapter_path / "adapter_config.json").is_file()
    ev = r.evaluation
    assert math.isfinite(ev["base_eval_loss"]) and math.isfinite(ev["tuned_eval_loss"])
    assert ev["tuned_eval_loss"] < ev["base_eval_loss"]  # ten steps already help
    assert r.passed is False and "NOT PASSING" in ev["verdict"]  # a drop of 50 is impossible
    assert len(ev["samples"]) == 2
    for s in ev["samples"]:
        assert s["prompt"] and s["reference"]
        assert 0 < s["base_tokens"] <= 12 and 0 < s["tuned_tokens"] <= 12


def test_report_is_self_contained_and_carries_the_series(
    finished: JobResult, its_home: Ledger
) -> None:
    assert finished.adapter_path is not None
    report = finished.report_path
    assert report == finished.adapter_path.parent / "report.html" and report.is_file()
    png = report.with_name("loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _parse(report)
    assert _external(page) == []
    charts = [a for t, a in page.tags if t == "img" and "chart" in (a.get("class") or "")]
    assert len(charts) == 3  # loss, speed (and GPU when sampled), phases
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for a in charts)
    series = json.loads(page.series)
    m = finished.metrics
    assert series["loss"]["step"] == list(range(1, 11))
    assert series["loss"]["loss"] == pytest.approx(m["losses"], abs=1e-4)
    assert series["eval_loss"]["base"] == finished.evaluation["base_eval_loss"]
    assert len(series["tokens_per_s"]["value"]) >= 9
    text = report.read_text()
    assert "NOT PASSING" in text and finished.evaluation["samples"][0]["tuned"][:20] in text
    # What the ledger keeps: the phases measured, beside the estimate (none on a CPU).
    row = its_home.job(finished.job_id)
    assert row is not None and row.estimate == {}
    assert {"load", "train", "evaluate", "pull"} <= set(row.actual["phases"])
    assert row.actual["tokens_per_s"] == m["tokens_per_s"]


def test_cli_report_redraws_and_ls_shows_the_verdict(
    finished: JobResult,
    its_home: Ledger,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loraburst import _cli

    monkeypatch.setattr(_cli._out, "width", 300)  # a wide terminal: no cell cut short
    assert finished.report_path is not None
    finished.report_path.unlink()
    assert main(["report", finished.job_id]) == 0
    assert finished.report_path.is_file()
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert str(finished.report_path) in out.replace("\n", "")
    assert "NOT PASSING" in out and "est $" in out
    assert main(["report", "no-such-job"]) == 2


def test_report_without_matplotlib_still_has_the_tables(
    finished: JobResult, its_home: Ledger, tmp_path: Path
) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pathlib import Path\n"
        "from loraburst._api.report import write_report\n"
        f"print(write_report({finished.job_id!r}, folder=Path({str(tmp_path)!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "report.html").read_text()
    assert "pip install &#x27;loraburst[report]&#x27;" in page and "<img" not in page
    assert "held-out loss" in page


# -- in a real browser -----------------------------------------------------------------------
_PROBE_HEAD = (
    "<script>window.__errors=[];window.addEventListener('error',function(e){"
    "window.__errors.push(String(e.message||e));});</script>"
)
_PROBE_TAIL = """<script>window.addEventListener('load', function () {
  var act = %s;
  var out = {errors: window.__errors, images: [], order: null};
  document.querySelectorAll('img.chart').forEach(function (img) {
    var r = img.getBoundingClientRect();
    out.images.push({ok: img.complete && img.naturalWidth > 0, x: r.left + window.scrollX,
                     y: r.top + window.scrollY, w: r.width, h: r.height});
  });
  if (act) { out.order = act(); }
  var pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--window-size=1200,3200", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _render(page: Path, tmp: Path, action: str = "null") -> tuple[dict[str, Any], Any]:
    """The page as Chromium lays it out: what a probe saw (script errors, each chart's box and
    whether it decoded, an action's result) and a screenshot of the unmodified page."""
    from PIL import Image

    probed = tmp / f"probe-{page.name}"
    text = page.read_text(encoding="utf-8")
    text = text.replace("<head>", "<head>" + _PROBE_HEAD, 1)
    text = text.replace("</body>", (_PROBE_TAIL % action) + "</body>", 1)
    probed.write_text(text, encoding="utf-8")
    dom = _chromium("--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="__probe">') + len('<pre id="__probe">')
    probe = json.loads(
        dom.stdout[start : dom.stdout.index("</pre>", start)].replace("&quot;", '"')
        .replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )  # fmt: skip
    shot = tmp / f"{page.stem}.png"
    run = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]  # no script error in the console
    return probe, Image.open(shot).convert("RGB")


def _drawn(image: Any, box: dict[str, float]) -> bool:
    """The chart's area in the screenshot holds a drawing: many colours, much non-white."""
    crop = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["w"]),
                       int(box["y"] + box["h"])))  # fmt: skip
    raw = crop.tobytes()  # RGB, 3 bytes a pixel (Image.getdata is deprecated in Pillow 12)
    pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
    inked = sum(1 for p in pixels if min(p) < 235) / max(1, len(pixels))
    return len(set(pixels)) > 20 and inked > 0.02


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_report_draws_in_a_real_browser(
    finished: JobResult, its_home: Ledger, tmp_path: Path
) -> None:
    assert finished.report_path is not None
    probe, shot = _render(finished.report_path, tmp_path)
    assert probe["errors"] == []
    assert len(probe["images"]) == 3
    for box in probe["images"]:
        assert box["ok"] and box["w"] > 300 and box["h"] > 100
        assert box["y"] + box["h"] <= shot.height, "chart below the screenshot"
        assert _drawn(shot, box), box


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_batch_report_sorts_in_a_real_browser(
    finished: JobResult, its_home: Ledger, tmp_path: Path
) -> None:
    result = BatchResult(
        rows=(
            BatchRow("report", finished.status, "local", "cpu", 0.0, 0.0,
                     str(finished.adapter_path), job_id=finished.job_id),
            BatchRow("zz-failed", "failed", cost_usd=0.5, error="boom"),
            BatchRow("aa-cheap", "skipped (budget)", cost_usd=0.25),
        ),
        budget=1.0,
        spent_usd=0.75,
    )  # fmt: skip
    page = write_batch_report(result, tmp_path / "batch", name="b")
    parsed = _parse(page)
    assert _external(parsed) == []
    assert any(t == "a" and (a.get("href") or "").startswith("file:") for t, a in parsed.tags)
    # Click "spent $" twice (ascending, then descending) and read the job column back.
    click = """function () {
      var th = Array.prototype.filter.call(document.querySelectorAll('#jobs th'),
        function (h) { return h.textContent === 'spent $'; })[0];
      var names = function () { return Array.prototype.map.call(
        document.querySelectorAll('#jobs tbody tr'), function (r) { return r.cells[0].textContent; }); };
      th.click(); var up = names(); th.click(); return [up, names()];
    }"""
    probe, shot = _render(page, tmp_path, click)
    assert probe["errors"] == []
    assert probe["order"] == [
        ["report", "aa-cheap", "zz-failed"],
        ["zz-failed", "aa-cheap", "report"],
    ]
    (box,) = probe["images"]
    assert box["ok"] and _drawn(shot, box)


def test_write_report_refuses_unknown_jobs(tmp_path: Path) -> None:
    from loraburst import ConfigError

    with pytest.raises(ConfigError, match="loraburst ls"):
        write_report("nope", folder=tmp_path)
