"""Where the client's time goes around a rented-GPU job, and what a 1 GB dataset costs to ship.

Run (about 3 minutes on a 2-core box; needs ~5 GB of free disk under the temp folder)::

    .venv/bin/python benchmarks/orchestration_overhead.py            # both parts
    .venv/bin/python benchmarks/orchestration_overhead.py --dataset-mb 64 --runs 1   # quicker

It prints two tables and writes ``benchmarks/results/orchestration_overhead.json``.

**Part 1, job phases.** The quickstart job (a tiny random Llama, 6 steps) runs through the
public API, ``Job.estimate()`` then ``Job.run(provider=RunPodProvider(...))``, against the RunPod
emulator started in-process (``tests.fakes.runpod.RunPodFake``). Its pods are real ``sshd``
processes on loopback, so SSH, SFTP, the remote bootstrap and the detached agent are the real
thing; the "GPU" is this machine's CPU, so the train phase measures nothing about GPUs, only the
orchestration around it. Phases come from ``JobResult.durations`` (bundle, provision, upload,
train, pull, teardown, total) and, finer, from thin timing wrappers around the provider and the
SSH host that delegate every call unchanged (launch call vs readiness wait, bundle upload vs
bootstrap vs agent start, agent start to first step).

**Part 2, a 1 GB dataset.** A JSONL of chat rows is generated, then a *child process* prepares
it (validate + normalise + spill), bundles it, and uploads the bundle over SFTP to a plain sshd
(``tests.fakes.sshd.SSHD``) with ``SSHHost.upload_bundle``. The child reports its peak RSS
(``/proc/self/status`` VmHWM; not ``ru_maxrss``, which Linux carries over from the parent across
fork+exec) after imports and after each phase, so the growth
is what streaming costs, not what the interpreter was already holding. ``upload_bundle`` is
called twice: the second call finds the bundle by sha256 and only re-extracts it, so
``first - second`` is the SFTP transfer alone. Client and sshd share this machine's cores, so the
transfer rate is bounded by ssh's ciphers on both ends at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "orchestration_overhead.json"
SAMPLE_DATA = ROOT / "examples" / "data" / "chat.jsonl"
MB = 1_000_000


# -- part 1: the job's phases -------------------------------------------------------------------
class _TimedHost:
    """Delegates to the real ``SSHHost``; records how long the runner's calls take."""

    def __init__(self, inner: Any, marks: dict[str, float]) -> None:
        self._inner = inner
        self._marks = marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _timed(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._marks[key] = self._marks.get(key, 0.0) + time.perf_counter() - t0

    def upload_bundle(self, local_path: Path, sha256: str) -> bool:
        out: bool = self._timed("upload_bundle", self._inner.upload_bundle, local_path, sha256)
        self._marks["upload_done_at"] = time.perf_counter()
        return out

    def run(self, command: str, timeout: float = 600.0) -> tuple[int, str, str]:
        # Before the agent starts, every command is the bootstrap's environment check.
        key = "bootstrap" if "agent_started_at" not in self._marks else "follow_commands"
        out: tuple[int, str, str] = self._timed(key, self._inner.run, command, timeout)
        return out

    def start_agent(self, env: Any) -> None:
        self._timed("start_agent", self._inner.start_agent, env)
        self._marks["agent_started_at"] = time.perf_counter()

    def read_text(self, rel: str) -> str | None:
        text: str | None = self._inner.read_text(rel)
        first = rel == "state.json" and text and "first_step_at" not in self._marks
        if first and json.loads(text or "{}").get("step", 0) >= 1:
            self._marks["first_step_at"] = time.perf_counter()
        return text

    def fetch_tree(self, rel: str, dest: Path) -> None:
        self._timed("fetch_tree", self._inner.fetch_tree, rel, dest)


class _TimedProvider:
    """Delegates to the real provider; times ``launch``, ``get`` and ``terminate``."""

    def __init__(self, inner: Any, marks: dict[str, float]) -> None:
        self._inner = inner
        self._marks = marks
        self.name = inner.name
        self.unsupported = inner.unsupported

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def launch(self, request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner.launch(request)
        finally:
            self._marks["launch_call"] = time.perf_counter() - t0

    def terminate(self, machine_id: str) -> None:
        t0 = time.perf_counter()
        self._inner.terminate(machine_id)
        self._marks["terminate_calls"] = self._marks.get("terminate_calls", 0.0) + (
            time.perf_counter() - t0
        )

    def connect(self, machine: Any, key_path: Any, workdir: str) -> Any:
        t0 = time.perf_counter()
        host = self._inner.connect(machine, key_path, workdir)
        self._marks["connect"] = self._marks.get("connect", 0.0) + time.perf_counter() - t0
        return _TimedHost(host, self._marks)


def _job(model: Path, out: Path, name: str) -> Any:
    from loraburst import Job

    return Job(
        str(model),
        SAMPLE_DATA,
        output_dir=out,
        name=name,
        train={"max_steps": 6, "micro_batch_size": 4, "save_every_steps": 3, "max_seq_len": 96},
    )


def run_job_once(model: Path, work: Path, fake: Any, index: int) -> dict[str, float]:
    """One job end to end against ``fake``; returns seconds per phase."""
    from loraburst.providers.runpod import RunPodProvider

    marks: dict[str, float] = {}
    provider = _TimedProvider(
        RunPodProvider(fake.api_key, base_url=fake.url, connect_timeout_s=15), marks
    )
    job = _job(model, work / f"out{index}", f"bench{index}")
    t0 = time.perf_counter()
    job.prepare()
    t_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimate = job.estimate(providers=["runpod"])
    t_estimate = time.perf_counter() - t0
    assert estimate.rows, "the estimate has no rows for runpod"
    t0 = time.perf_counter()
    result = job.run(provider=provider, progress=False, cache=False)
    wall = time.perf_counter() - t0
    assert result.status == "succeeded" and fake.running() == [], result
    d = result.durations
    return {
        "prepare_validate": t_prepare,
        "estimate": t_estimate,
        "bundle": d["bundle"],
        "launch_api_call": marks["launch_call"],
        "readiness_wait": d["provision"] - marks["launch_call"],
        "ssh_connect": marks["connect"],
        "upload_and_extract": marks["upload_bundle"],
        "bootstrap_env_check": marks.get("bootstrap", 0.0),
        "agent_start_call": marks["start_agent"],
        "agent_start_to_first_step": marks["first_step_at"] - marks["agent_started_at"],
        "follow_total_incl_training": d["train"],
        "pull_and_verify": d["pull"],
        "teardown_confirmed": d["teardown"],
        "run_total": d["total"],
        "run_wall": wall,
        "billed_seconds": float(fake.billed_seconds(next(reversed(fake.pods)))),
    }


def part_jobs(work: Path, runs: int) -> dict[str, Any]:
    from loraburst.testing import make_tiny_model

    from tests.fakes.runpod import RunPodFake

    texts = [
        m["content"]
        for line in SAMPLE_DATA.read_text().splitlines()
        if line.strip()
        for m in json.loads(line)["messages"]
    ]
    model = make_tiny_model(work / "model", texts)
    fake = RunPodFake(api_key="rpa_" + secrets.token_hex(16), folder=work / "runpod")
    fake.start()
    # Live offers for Job.estimate() come from the emulator, as they would from RunPod.
    os.environ["LORABURST_RUNPOD_API_KEY"] = fake.api_key
    os.environ["LORABURST_RUNPOD_BASE_URL"] = fake.url
    try:
        samples = [run_job_once(model, work, fake, i) for i in range(runs)]
    finally:
        fake.stop()
    median = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {"runs": samples, "median": median}


# -- part 2: a big dataset, bundled and uploaded, in a child process ----------------------------
_CHILD = r"""
import json, sys, time
from pathlib import Path

def peak_mb():
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec into
    # ru_maxrss, which would hide this process's own growth behind the parent's size.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

from loraburst._data.bundle import build_bundle
from loraburst._data.dataset import prepare_dataset
from loraburst._api.spec import JobSpec
from loraburst.providers import Machine, SSHEndpoint
from loraburst.providers._ssh import SSHHost

data, host, port, key = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {"peak_mb_after_imports": peak_mb()}
t0 = time.perf_counter()
ds = prepare_dataset(data, max_seq_len=2048)
out["prepare_s"] = time.perf_counter() - t0
out["peak_mb_after_prepare"] = peak_mb()
out["rows"] = ds.stats.rows
out["normalised_bytes"] = ds.size
t0 = time.perf_counter()
bundle = build_bundle(JobSpec(model="org/model", dataset=data), ds, None)
out["bundle_s"] = time.perf_counter() - t0
out["bundle_bytes"] = bundle.size
out["peak_mb_after_bundle"] = peak_mb()
machine = Machine(provider="ssh", id="bench", tag="lb-bench-1", status="running",
                  ssh=SSHEndpoint(host=host, port=port, user="root"))
conn = SSHHost(machine, Path(key), "runs/bench", connect_timeout_s=15).connect()
t0 = time.perf_counter()
assert conn.upload_bundle(bundle.path, bundle.sha256) is True
out["upload_and_extract_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
assert conn.upload_bundle(bundle.path, bundle.sha256) is False
out["extract_only_s"] = time.perf_counter() - t0
conn.close()
out["peak_mb_after_upload"] = peak_mb()
print(json.dumps(out))
"""


def write_dataset(path: Path, target_bytes: int) -> int:
    """Chat rows of ~2 KB each until ``target_bytes``; returns the size written."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "again"]
    size = i = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            answer = " ".join(words[(i + j) % len(words)] for j in range(330))
            row = {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"Question number {i}: what comes next?"},
                    {"role": "assistant", "content": answer},
                ]
            }
            line = json.dumps(row) + "\n"
            f.write(line)
            size += len(line.encode())
            i += 1
    return size


def part_dataset(work: Path, megabytes: int) -> dict[str, Any]:
    from tests.fakes.sshd import SSHD

    data = work / "big.jsonl"
    t0 = time.perf_counter()
    source_bytes = write_dataset(data, megabytes * MB)
    generate_s = time.perf_counter() - t0
    key = work / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sshd = SSHD(work / "sshd", key.with_suffix(".pub").read_text().strip())
    sshd.start()
    env = {**os.environ, "LORABURST_HOME": str(work / "home-big")}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(data), sshd.host, str(sshd.port), str(key)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=False,
        )
    finally:
        sshd.stop()
    if proc.returncode != 0:
        raise SystemExit(f"dataset child failed:\n{proc.stderr[-3000:]}")
    child: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    transfer_s = child["upload_and_extract_s"] - child["extract_only_s"]
    base = child["peak_mb_after_imports"]
    return {
        "source_bytes": source_bytes,
        "generate_s": generate_s,
        **child,
        "sftp_transfer_s": transfer_s,
        "prepare_mb_per_s": source_bytes / MB / child["prepare_s"],
        "bundle_mb_per_s": child["bundle_bytes"] / MB / child["bundle_s"],
        "sftp_mb_per_s": child["bundle_bytes"] / MB / transfer_s,
        "upload_incl_extract_mb_per_s": child["bundle_bytes"] / MB / child["upload_and_extract_s"],
        "peak_rss_growth_mb": max(
            child[k]
            for k in ("peak_mb_after_prepare", "peak_mb_after_bundle", "peak_mb_after_upload")
        )
        - base,
    }


# -- report -------------------------------------------------------------------------------------
# Phases that follow one another (they add up to the wall time); the rest are inside them.
_SEQUENTIAL = (
    "prepare_validate",
    "estimate",
    "bundle",
    "launch_api_call",
    "readiness_wait",
    "ssh_connect",
    "upload_and_extract",
    "bootstrap_env_check",
    "agent_start_call",
    "follow_total_incl_training",
    "pull_and_verify",
    "teardown_confirmed",
)


def _print_jobs(jobs: dict[str, Any]) -> None:
    med = jobs["median"]
    wall = med["run_wall"] + med["estimate"] + med["prepare_validate"]
    print(f"\nPart 1: tiny job on the RunPod emulator, median of {len(jobs['runs'])} run(s)")
    print(f"{'phase':<30}{'seconds':>10}{'share':>8}")
    for key in _SEQUENTIAL:
        print(f"{key:<30}{med[key]:>10.2f}{100 * med[key] / wall:>7.1f}%")
    other = wall - sum(med[k] for k in _SEQUENTIAL)
    print(f"{'(unaccounted)':<30}{other:>10.2f}{100 * other / wall:>7.1f}%")
    print(f"{'= client wall time':<30}{wall:>10.2f}")
    print(f"{'  of which agent start->step 1':<30}{med['agent_start_to_first_step']:>10.2f}")
    overhead = wall - med["follow_total_incl_training"]
    print(f"{'  orchestration outside follow':<30}{overhead:>10.2f}")
    print(f"{'billed seconds (emulator)':<30}{med['billed_seconds']:>10.0f}")


def _print_dataset(ds: dict[str, Any]) -> None:
    print(f"\nPart 2: {ds['source_bytes'] / MB:,.0f} MB JSONL ({ds['rows']:,} rows), child process")
    rows = [
        ("prepare (validate+normalise+spill)", ds["prepare_s"], ds["prepare_mb_per_s"]),
        ("bundle (stream into tar)", ds["bundle_s"], ds["bundle_mb_per_s"]),
        ("SFTP transfer", ds["sftp_transfer_s"], ds["sftp_mb_per_s"]),
        (
            "upload incl. remote extract",
            ds["upload_and_extract_s"],
            ds["upload_incl_extract_mb_per_s"],
        ),
    ]
    print(f"{'step':<36}{'seconds':>9}{'MB/s':>9}")
    for name, s, rate in rows:
        print(f"{name:<36}{s:>9.1f}{rate:>9.1f}")
    print(
        f"peak RSS: {ds['peak_mb_after_imports']:.0f} MB after imports -> "
        f"{ds['peak_mb_after_prepare']:.0f} / {ds['peak_mb_after_bundle']:.0f} / "
        f"{ds['peak_mb_after_upload']:.0f} MB after prepare / bundle / upload "
        f"(growth {ds['peak_rss_growth_mb']:.0f} MB for {ds['source_bytes'] / MB:,.0f} MB of data)"
    )


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lb-overhead-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="jobs to run against the emulator")
    parser.add_argument("--dataset-mb", type=int, default=1000, help="generated JSONL size")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--skip-dataset", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with _scratch() as work:
        os.environ["LORABURST_HOME"] = str(work / "home")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if not args.skip_jobs:
            result["job"] = part_jobs(work, args.runs)
            _print_jobs(result["job"])
        if not args.skip_dataset:
            result["dataset"] = part_dataset(work, args.dataset_mb)
            _print_dataset(result["dataset"])
        result["client_peak_rss_mb_parent"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
