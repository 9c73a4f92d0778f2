"""Time, peak VRAM and dollars of a job on each GPU offer, before anything is rented.

One :class:`EstimateRow` per (provider, GPU type, GPU count). Prices come from live offers when
the caller passes them (``loraburst.providers.Offer``), else from the dated snapshot in
``_gpus.py``, and each row says which (``price_source``). Speed and memory come from
``loraburst.remote.memory`` with the coefficients fitted on an H200 (``data/calibration.json``).

Conventions: ``tokens`` is the number of tokens the trainer will process (train split times
epochs, or ``max_steps`` times tokens per step). Without packing, each micro-batch is padded to
its longest row; we approximate that length by the mean row length (speed) and size memory for
a full ``max_seq_len`` batch (the worst batch must fit). On an offer of N GPUs the trainer runs
under ``torchrun`` with the first strategy of ``loraburst.remote.sharding`` that fits (DDP, FSDP,
FSDP with parameter offload); the row gives its ``strategy``, the per-GPU peak and the host RAM
it needs (``host_ram_gb``). DPO/ORPO and MLX train on one GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from loraburst.remote.memory import (
    Coefficients,
    ObjectiveCost,
    choose_settings,
    lora_params,
    objective_cost,
    peak_vram,
    step_time,
)
from loraburst.remote.pairs import reference_mode
from loraburst.remote.sharding import rank_grad_accum

from .._api.export import export_cost
from .._api.spec import JobSpec
from .._exceptions import EstimateError
from . import billing as billing
from . import evaluation as evaluation
from .gpus import (
    CATALOG,
    SNAPSHOT,
    GPUSpec,
    billing_increment_s,
    parse_gpu,
    resolve_gpu,
    setup_model,
)
from .replay import Planner, RealPathCoeffs, Replay, workload
from .shapes import ModelShape, model_shape

if TYPE_CHECKING:
    from loraburst.providers import Offer

__all__ = ["Estimate", "EstimateRow", "estimate", "load_calibration", "model_shape", "resolve_gpu"]

SAVE_S = 2.0  # seconds per adapter checkpoint save
TOKEN_GUESS_ERROR = 0.25  # chars-per-token estimates are this far off, either way
SETUP_RANGE = (0.6, 2.0)  # setup overhead: low and high multipliers
OTHER_GPU_ERROR = 0.15  # added speed uncertainty on GPUs other than the calibration one
# Added on Apple Silicon rows (the MLX backend): their speed is derived from public mlx-lm
# numbers (see _gpus.py), not measured on a Mac: chip peaks +-15%, and how much of its GEMM rate
# MLX's training step keeps (taken as our H200 trainer's share) +-25%.
MLX_ERROR = 0.35


@dataclasses.dataclass(frozen=True)
class EstimateRow:
    """The estimate for one (provider, GPU type, GPU count); times in seconds, VRAM in GiB."""

    provider: str
    gpu: str
    gpu_count: int
    fits: bool
    peak_vram_gb: float
    vram_gb: float
    micro_batch_size: int
    gradient_checkpointing: bool
    tokens_per_s: float
    train_s: float
    setup_s: float
    total_s: float
    price_per_hour: float
    price_source: str
    billing_increment_s: int
    cost_usd: float
    cost_low_usd: float
    cost_high_usd: float
    note: str
    steps: int = 0
    available: bool = True
    export_s: float = 0.0  # merged/GGUF exports and their checks (in total_s and the cost)
    disk_gb: int = 50  # instance disk the job needs (base, adapter, exports)
    total_low_s: float = 0.0  # the stated range of total_s (what cost_low/high_usd bill)
    total_high_s: float = 0.0
    mean_tokens: float = 0.0  # real tokens per micro-batch, as the trainer will cut them
    strategy: str = "1 GPU"  # "1 GPU", "ddp", "fsdp" or "fsdp+offload" (remote/sharding.py)
    host_ram_gb: float = 0.0  # host RAM the job needs, GiB (what fsdp+offload keeps there)

    @property
    def feasible(self) -> bool:
        """Fits in memory, is available, and has a known price."""
        return self.fits and self.available and self.price_source != "unpriced"


@dataclasses.dataclass
class Estimate:
    """All rows for one job, cheapest feasible first."""

    rows: list[EstimateRow]
    model: str
    tokens: int
    tokens_exact: bool
    steps: int
    notes: list[str] = dataclasses.field(default_factory=list)

    def feasible(self) -> list[EstimateRow]:
        """Rows that fit, are available and have a price."""
        return [r for r in self.rows if r.feasible]

    def cheapest(self) -> EstimateRow | None:
        """The feasible row with the lowest cost (then the shortest time)."""
        rows = self.feasible()
        return min(rows, key=lambda r: (r.cost_usd, r.total_s)) if rows else None

    def fastest(self) -> EstimateRow | None:
        """The feasible row with the shortest total time (then the lowest cost)."""
        rows = self.feasible()
        return min(rows, key=lambda r: (r.total_s, r.cost_usd)) if rows else None

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.rows]

    def _cells(self, compact: bool = False) -> tuple[list[str], list[list[str]]]:
        """Header and rows; ``compact`` keeps what a narrow terminal has room for."""
        head = ["provider", "gpu", "n", "fits", "peak/VRAM GiB", "batch", "tok/s", "train",
                "setup", "total (range)", "$/hr", "cost (range)", "note"]  # fmt: skip
        if compact:
            head = ["provider", "gpu", "fits", "peak GiB", "tok/s", "total", "cost"]
        body = []
        for r in self.rows:
            priced = r.price_source != "unpriced"
            cost = f"${r.cost_usd:.2f} ({r.cost_low_usd:.2f}-{r.cost_high_usd:.2f})"
            if not priced:
                cost = "no price"
            elif not r.fits:
                cost = "-"
            gpu = r.gpu if r.gpu_count == 1 else f"{r.gpu_count}x {r.gpu}"
            if compact:
                body.append([
                    r.provider, gpu, "yes" if r.fits else "NO", f"{r.peak_vram_gb:.1f}",
                    f"{r.tokens_per_s:,.0f}" if r.fits else "-",
                    _dur(r.total_s) if r.fits else "-",
                    cost if not priced or not r.fits else f"${r.cost_usd:.2f}",
                ])  # fmt: skip
                continue
            body.append([
                r.provider, r.gpu, str(r.gpu_count), "yes" if r.fits else "NO",
                f"{r.peak_vram_gb:.1f}/{r.vram_gb:.0f}",
                f"{r.micro_batch_size}{'+ckpt' if r.gradient_checkpointing else ''}",
                f"{r.tokens_per_s:,.0f}" if r.fits else "-",
                _dur(r.train_s) if r.fits else "-", _dur(r.setup_s),
                f"{_dur(r.total_s)} ({_dur(r.total_low_s)}-{_dur(r.total_high_s)})"
                if r.fits else "-",
                f"{r.price_per_hour:.2f}" if priced else "no price", cost, r.note,
            ])  # fmt: skip
        return head, body

    def _title(self) -> str:
        kind = "exact" if self.tokens_exact else "estimated"
        return f"{self.model}: {self.tokens:,} tokens ({kind}), {self.steps:,} steps"

    def table(self, width: int | None = None) -> str:
        """Plain-text table, one line per row, then the notes.

        Args:
            width: the terminal's columns; where the full table is wider, the compact columns
                (GPU, fits, peak, tok/s, total, cost) are shown, and where even those are wider,
                one block of lines per offer.
        """
        lines = [self._title()]
        for compact in (False, True):
            head, body = self._cells(compact)
            widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
            if width is None or sum(widths) + 2 * (len(widths) - 1) <= width or compact:
                break
        if width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
            lines += self._vertical()
        else:
            for cells in [head, *body]:
                lines.append(
                    "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _vertical(self) -> list[str]:
        """One short block per offer, for terminals too narrow for columns."""
        head, body = self._cells(compact=False)
        out = []
        for cells in body:
            row = dict(zip(head, cells, strict=True))
            n = "" if row["n"] == "1" else f" x{row['n']}"
            out.append(f"{row['provider']} {row['gpu']}{n}: fits {row['fits']}, "
                       f"{row['peak/VRAM GiB']} GiB, batch {row['batch']}")  # fmt: skip
            out.append(f"  {row['tok/s']} tok/s, total {row['total (range)']}")
            out.append(f"  {row['$/hr']} $/hr, cost {row['cost (range)']}")
            if row["note"]:
                out.append(f"  {row['note']}")
        return out

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """A table that fits the terminal: every column (notes wrapped), the compact columns,
        or a block of lines per offer (an 80-column terminal gets the compact table)."""
        from rich.table import Table
        from rich.text import Text

        width = int(options.max_width)
        for compact in (False, True):
            head, body = self._cells(compact)
            widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
            if not compact:  # the note column wraps; give it 24 columns at least
                widths[-1] = min(widths[-1], 24)
            if sum(widths) + 3 * len(widths) + 1 <= width:
                # Text, not str: model and GPU names and notes come from users and providers,
                # and a str would be parsed as markup.
                caption = Text("\n".join(self.notes)) if self.notes else None
                table = Table(title=Text(self._title()), caption=caption)
                for h in head:
                    right = h in ("tok/s", "$/hr", "n", "peak GiB")
                    table.add_column(h, justify="right" if right else "left")
                for cells in body:
                    table.add_row(*(Text(c) for c in cells))
                yield table
                return
        notes = [f"note: {n}" for n in self.notes]
        yield Text("\n".join([self._title(), *self._vertical(), *notes]))

    def __str__(self) -> str:
        return self.table()


def _dur(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.0f}m" if m < 600 else f"{m / 60:.1f}h"


@lru_cache(maxsize=1)
def load_calibration() -> dict[str, Any]:
    """``data/calibration.json`` (fitted coefficients, points, date, GPU, versions)."""
    text = resources.files("loraburst").joinpath("data/calibration.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def _coeffs() -> Coefficients:
    return Coefficients.from_dict(load_calibration()["coefficients"])


@dataclasses.dataclass(frozen=True)
class _Workload:
    seq_mem: int  # sequence length memory must hold
    seq_speed: int  # sequence length that sets speed (mean padded length)
    sequences: float  # training sequences per epoch
    tokens_unknown: bool


def _packs(spec: JobSpec, tokens: int, rows: int) -> bool:
    """``train.packing`` resolved as the trainer does: "auto" packs rows under half a sequence."""
    packing = spec.train.packing
    if spec.objective.preference:
        return False  # a pair is one unit of its two sequences, never packed with others
    if packing != "auto":
        return bool(packing)
    if tokens <= 0 or rows < 2:
        return True  # unknown lengths are taken as half full: the trainer would pack those
    return tokens / rows < 0.5 * spec.train.max_seq_len


def _workload(spec: JobSpec, tokens: int, rows: int) -> _Workload:
    t = spec.train
    keep = 1.0 - t.eval_fraction
    # A preference row is a pair: two sequences of up to max_seq_len in one unit.
    max_seq = t.max_seq_len * (2 if spec.objective.preference else 1)
    if _packs(spec, tokens, rows):
        seq = max_seq
        known = tokens if tokens > 0 else rows * max_seq / 2  # unknown: rows half full
        sequences = max(1.0, math.ceil(known * keep / max_seq))
    else:
        mean = tokens / rows if tokens > 0 and rows > 0 else max_seq / 2  # unknown: half full
        seq = max(1, min(max_seq, round(mean)))
        sequences = max(1.0, rows * keep)
    return _Workload(max_seq, seq, sequences, tokens <= 0)


@dataclasses.dataclass(frozen=True)
class _Slot:
    provider: str
    gpu: GPUSpec
    count: int
    price: float
    source: str
    increment: int
    available: bool
    vram_gb: float

    @property
    def same_machine(self) -> bool:
        """The provider declares that its instances are this very machine (no download, the
        local setup model): read from its declared capabilities, never from its name."""
        return _same_machine(self.provider)


@cache
def _same_machine(provider: str) -> bool:
    from loraburst.providers import provider_class

    from .._exceptions import ConfigError

    try:
        caps = getattr(provider_class(provider), "capabilities", None)
    except ConfigError:  # a snapshot row of a provider not installed here
        return False
    return bool(getattr(caps, "same_machine", False))


def _slots(
    offers: Sequence[Offer] | None,
    local_gpus: Sequence[tuple[str, float]],
    skipped: list[str],
) -> list[_Slot]:
    slots = []
    if offers is None:
        for p in SNAPSHOT:
            g = CATALOG[p.gpu]
            inc = billing_increment_s(p.provider)
            slots.append(
                _Slot(p.provider, g, p.gpu_count, p.price_per_hour, p.source, inc, True, g.vram_gb)
            )
    else:
        for o in offers:
            try:
                g = resolve_gpu(o.gpu)
            except EstimateError:
                skipped.append(f"{o.provider} {o.gpu} (not in the GPU catalog)")
                continue
            slots.append(
                _Slot(
                    o.provider,
                    g,
                    o.gpu_count,
                    o.price_per_hour,
                    o.price_source,
                    o.billing_increment_s,
                    o.available,
                    g.vram_gb,
                )
            )
    cards: dict[tuple[str, float], int] = {}
    for card in local_gpus:  # per card model: one of them, and all (torchrun) where several
        cards[card] = cards.get(card, 0) + 1
    for (name, vram), count in cards.items():
        try:
            g = resolve_gpu(name)
        except EstimateError:
            g = GPUSpec(name, vram, 100.0, 900)  # unknown local card: a mid-range guess
            skipped.append(f"local {name}: not in the catalog, speed guessed as 100 TFLOP/s")
        for n in sorted({1, count}):
            slots.append(_Slot("local", g, n, 0.0, "local (free)", 1, True, vram))
    return slots


def estimate(
    spec: JobSpec,
    *,
    tokens: int,
    rows: int,
    tokens_exact: bool,
    gpus: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    offers: Sequence[Offer] | None = None,
    local_gpus: Sequence[tuple[str, float]] = (),
    lengths: Sequence[int] | None = None,
    history: bool = False,
) -> Estimate:
    """Estimate ``spec`` on every offer (or the snapshot), cheapest feasible first.

    Args:
        spec: the job.
        tokens: tokens in the dataset (all rows, before the eval split).
        rows: rows in the dataset.
        tokens_exact: whether ``tokens`` was counted with the model's tokenizer; if not, the
            cost range widens by ``TOKEN_GUESS_ERROR``.
        gpus: keep only these GPU types (any spelling the catalog knows), each optionally
            with a count: ``"2x RTX 3090"`` keeps only two-GPU offers of it.
        providers: keep only these providers.
        offers: live offers; ``None`` uses the dated price snapshot.
        local_gpus: ``(name, vram GiB)`` of local cards, priced at 0.
        lengths: every row's token count, when the client counted them: the trainer's
            batching is replayed over them (else rows are taken as the mean row).
        history: correct each row by what the user's finished jobs measured on the same
            provider, GPU and model family (:mod:`.history`), saying so in a note.

    Raises:
        EstimateError: unknown GPU or model, or the job fits none of the GPUs considered
            (the message says what would make it fit).
    """
    if tokens < 0 or rows < 0:
        raise EstimateError(f"tokens ({tokens}) and rows ({rows}) must be >= 0")
    ms = model_shape(spec.model, spec.model_revision)
    coeffs = _coeffs()
    wl = _workload(spec, tokens, rows)
    # gpus: names, each with an optional count ("2x RTX 3090": that GPU, two per instance).
    asked = [parse_gpu(g) for g in gpus] if gpus else []
    wanted = {g.name for g, _ in asked} if gpus else None
    counts = {g.name: {n for h, n in asked if h.name == g.name} for g, _ in asked}
    want_p = {p.lower() for p in providers} if providers else None
    skipped: list[str] = []
    # train.backend: mlx trains only on Apple Silicon, torch only elsewhere; auto on either.
    backend = spec.train.backend
    slots = [
        s
        for s in _slots(offers, local_gpus, skipped)
        if (wanted is None or s.gpu.name in wanted)
        and (not counts or None in counts[s.gpu.name] or s.count in counts[s.gpu.name])
        and (want_p is None or s.provider in want_p)
        and (backend == "auto" or s.gpu.apple == (backend == "mlx"))
    ]
    if backend == "mlx" and wanted is None and not slots:
        # No Mac here and none asked for: show every Apple chip (nobody rents them out).
        wanted = {g.name for g in CATALOG.values() if g.apple}
    for name in sorted((wanted or set()) - {s.gpu.name for s in slots}):
        g = CATALOG[name]
        if backend == "auto" or g.apple == (backend == "mlx"):
            for n in sorted(counts.get(name, {1}), key=lambda c: c or 1):
                slots.append(_Slot("-", g, n or 1, 0.0, "unpriced", 1, True, g.vram_gb))
    planner = Planner(spec, ms.shape, ms.config,
                      workload(spec, lengths, rows, tokens, padded=ms.shape.eager_attention))  # fmt: skip
    rows_out = [_row(spec, ms, wl, s, coeffs, tokens_exact, planner) for s in slots]
    rows_out.sort(key=lambda r: (not r.feasible, r.cost_usd, r.total_s))
    best = min(rows_out, key=lambda r: (not r.feasible, r.cost_usd), default=None)
    real = load_calibration().get("real_path", {})
    rp = _real_path()
    notes = [
        f"speed and loading fitted to the trainer's real path on "
        f"{load_calibration().get('gpu', 'an H200')} ({real.get('date', 'undated')}); other GPUs "
        "scaled by TFLOP/s and bandwidth",
        "setup: "
        + setup_model("runpod").describe().split(", load/")[0]
        + f" + load/quantise {rp.load_s:.0f}s + {rp.load_gbs:.2f} GB/s"
        " (RunPod; Lambda boots in ~4 min)",
    ]
    replayed = planner.wl
    notes.append(
        f"batches replayed as the trainer cuts them ({'packed' if replayed.packing else 'unpacked'}"
        f"{', padded' if replayed.padded else ', padding-free'}) over "
        + ("every row's token count" if lengths else "rows of the mean length")
    )
    if tokens <= 0:
        notes.append("token count unknown: rows taken as half of max_seq_len")
    if spec.objective.preference:
        ref = reference_mode(spec.objective, spec.init_adapter)
        notes.append(
            f"{spec.objective.type}: each row is a pair, chosen + rejected (two sequences a step)"
            + {"live": "; the reference adds a forward per step", "precompute": "; the "
               "reference is one forward pass over the data before training"}.get(ref or "", "")
        )  # fmt: skip
    export_note = export_cost(spec.exports, ms.params, ms.download_bytes).note
    if export_note:
        notes.append(export_note + "; included in time and cost")
    notes += evaluation.notes(spec)  # evaluation hook
    if skipped:
        notes.append("skipped: " + "; ".join(skipped))
    steps = best.steps if best else 0
    tokens_total = round(steps * spec.train.grad_accum * (best.mean_tokens if best else 0.0))
    est = Estimate(rows_out, ms.name, tokens_total, tokens_exact, steps, notes)
    if rows_out and not any(r.fits for r in rows_out):
        raise EstimateError(_no_fit_message(spec, ms, wl, rows_out, coeffs), estimate=est)
    if history:  # estimates that learn (history.py): a bounded correction from finished jobs
        from .history import apply

        est = apply(est, ms)
    return est


def _steps(spec: JobSpec, wl: _Workload, micro_batch: int) -> int:
    t = spec.train
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(wl.sequences * t.epochs / (micro_batch * t.grad_accum)))


def _real_path() -> RealPathCoeffs:
    return RealPathCoeffs.from_dict(load_calibration().get("real_path", {}).get("coefficients", {}))


def _objective(spec: JobSpec, ms: ModelShape, wl: _Workload, ckpt: bool) -> ObjectiveCost:
    """What the spec's objective adds to an SFT step (remote/memory.py: objective_cost)."""
    lora = lora_params(ms.shape, spec.lora.r, spec.lora.target_modules)
    return objective_cost(
        ms.shape, wl.seq_speed, lora, preference=spec.objective.preference,
        reference=reference_mode(spec.objective, spec.init_adapter), gradient_checkpointing=ckpt,
    )  # fmt: skip


def _row(
    spec: JobSpec,
    ms: ModelShape,
    wl: _Workload,
    s: _Slot,
    coeffs: Coefficients,
    exact: bool,
    planner: Planner,
) -> EstimateRow:
    t = spec.train
    rp = _real_path()
    setup = setup_model("local" if s.gpu.apple or s.same_machine else s.provider)
    # GPUs that train: all of the offer's (torchrun), but one for MLX and preference objectives.
    single = s.gpu.apple or spec.objective.preference
    gpus = 1 if single else max(1, s.count)
    strategy, host_ram = "1 GPU", 0.0
    download = 0.0 if ms.source.endswith("config.json") and s.same_machine else 1.0
    if s.gpu.apple:
        pick, step_s, mean_tokens, batches = _apple_pick(spec, ms, wl, s, coeffs)
        fits, peak, mb = (
            bool(pick["fits"]),
            float(pick["peak_vram_gb"]),
            int(pick["micro_batch_size"]),
        )
        ckpt, first_s = bool(pick["gradient_checkpointing"]), 0.0
        setup_s = setup.seconds(ms.download_bytes * download)
    else:
        r: Replay = planner.replay(
            s.vram_gb, tflops=s.gpu.bf16_tflops, bandwidth_gbs=s.gpu.bandwidth_gbs,
            gemm_efficiency=s.gpu.gemm_efficiency, coeffs=rp, gpus=gpus,
        )  # fmt: skip
        fits, peak, mb, ckpt = r.fits, r.peak_gib, r.micro_batch, r.recompute_layers > 0
        strategy, host_ram = r.strategy, r.host_ram_gib
        step_s, mean_tokens, batches, first_s = (
            r.step_s,
            r.mean_tokens,
            r.batches_per_epoch,
            rp.first_step_s,
        )
        # The instance's own setup, then what the real path measured on the H200 besides the
        # steps (start, tokenise, read and quantise the checkpoint, measure memory, save, pull).
        fetched = dataclasses.replace(setup, load_gbs=math.inf)
        load_s = rp.load_s + ms.download_bytes / (rp.load_gbs * 1e9)
        setup_s = fetched.seconds(ms.download_bytes * download) + load_s
    # Each rank accumulates its share of grad_accum (sharding.rank_grad_accum): a step covers
    # the job's global batch on any number of GPUs.
    per_rank = rank_grad_accum(t.grad_accum, gpus)
    if t.max_steps is not None:
        steps = t.max_steps
    else:
        steps = max(1, math.ceil(batches * t.epochs / (per_rank * gpus)))
    saves = steps // t.save_every_steps if t.save_every_steps else 0
    extra = _objective(spec, ms, wl, ckpt)  # a reference's forwards (DPO)
    step_s *= extra.step_factor
    # A precomputed reference: one forward pass over the data before training.
    pass_s = extra.data_passes * batches * step_s / extra.step_factor
    train_s = steps * per_rank * step_s + first_s + saves * SAVE_S + pass_s
    exports = export_cost(spec.exports, ms.params, ms.download_bytes)  # exports hook
    exports = evaluation.with_evaluation(  # evaluation hook: its time counts with the exports
        spec, exports, ms.params, batches * mean_tokens, mean_tokens / step_s, s.gpu
    )
    total_s = train_s + setup_s + exports.seconds
    notes = []
    if not fits:
        notes.append(
            f"needs {peak:.1f} GiB even at micro-batch {mb}{' with checkpointing' if ckpt else ''}"
        )
    elif t.gradient_checkpointing == "auto" and ckpt:
        notes.append(f"checkpointing on: fits micro-batch {mb}")
    if s.count > 1 and gpus == 1:
        what = "MLX" if s.gpu.apple else f"{spec.objective.type} (preference tuning)"
        notes.append(f"{what} trains on one GPU: uses 1 of {s.count}")
    elif gpus > 1 and fits:
        notes.append(
            f"{strategy} on {gpus} GPUs (torchrun), {peak:.1f} GiB each"
            + (f", host RAM {host_ram:.0f} GiB" if strategy.startswith("fsdp") else "")
        )
    if not s.gpu.bf16:
        notes.append("no bf16: trains in fp16")
    if not s.available:
        notes.append("not available now")
    if s.source == "unpriced":
        notes.append("no price known for this GPU")
    real = load_calibration().get("real_path", {}).get("accuracy", {})
    err_speed = float(real.get("max_rel_error_tokens_per_s", 0.2))
    if s.gpu.name != "H200":
        err_speed += OTHER_GPU_ERROR
    if s.gpu.apple:
        err_speed += MLX_ERROR
        notes.append("MLX (Apple Silicon): speed derived from public mlx-lm numbers")
    err_tok = 0.0 if exact or t.max_steps else TOKEN_GUESS_ERROR
    if wl.tokens_unknown:
        err_tok = 0.5
    fixed = setup_s + exports.seconds
    low_s = train_s * (1 - err_speed) * (1 - err_tok) + fixed * SETUP_RANGE[0]
    high_s = train_s * (1 + err_speed) * (1 + err_tok) + fixed * SETUP_RANGE[1]

    def cost(seconds: float) -> float:
        return round(billing.billed_cost(s.price, seconds, s.increment), 4)

    return EstimateRow(
        provider=s.provider,
        gpu=s.gpu.name,
        gpu_count=s.count,
        fits=fits,
        peak_vram_gb=round(peak, 2),
        vram_gb=s.vram_gb,
        micro_batch_size=mb,
        gradient_checkpointing=ckpt,
        tokens_per_s=round(gpus * mean_tokens / step_s if step_s > 0 else 0.0, 1),
        train_s=round(train_s, 1),
        setup_s=round(setup_s, 1),
        total_s=round(total_s, 1),
        price_per_hour=s.price,
        price_source=s.source,
        billing_increment_s=s.increment,
        cost_usd=cost(total_s),
        cost_low_usd=cost(low_s),
        cost_high_usd=cost(high_s),
        note="; ".join(notes),
        steps=steps,
        available=s.available,
        export_s=exports.seconds,
        disk_gb=exports.disk_gb,
        total_low_s=round(low_s, 1),
        total_high_s=round(high_s, 1),
        mean_tokens=round(mean_tokens, 1),
        strategy=strategy,
        host_ram_gb=host_ram,
    )


def _apple_pick(
    spec: JobSpec, ms: ModelShape, wl: _Workload, s: _Slot, coeffs: Coefficients
) -> tuple[dict[str, Any], float, float, float]:
    """MLX on Apple Silicon: the analytic model (the replay is the CUDA trainer's)."""
    bits = spec.quant.bits if spec.quantized else 16
    common: dict[str, Any] = {
        "lora_r": spec.lora.r,
        "bits": bits,
        "target_modules": spec.lora.target_modules,
        "coeffs": coeffs,
    }
    pick = choose_settings(
        ms.config,
        vram_gb=s.vram_gb,
        seq_len=wl.seq_mem,
        mean_seq_len=wl.seq_speed,
        micro_batch_size=spec.train.micro_batch_size,
        gradient_checkpointing=spec.train.gradient_checkpointing,
        tflops=s.gpu.bf16_tflops,
        bandwidth_gbs=s.gpu.bandwidth_gbs,
        gemm_efficiency=s.gpu.gemm_efficiency,
        **common,
    )
    mb, ckpt = int(pick["micro_batch_size"]), bool(pick["gradient_checkpointing"])
    timing = step_time(
        ms.shape,
        seq_len=wl.seq_speed,
        micro_batch_size=mb,
        gradient_checkpointing=ckpt,
        tflops=s.gpu.bf16_tflops,
        bandwidth_gbs=s.gpu.bandwidth_gbs,
        gemm_efficiency=s.gpu.gemm_efficiency,
        **common,
    )
    batches = wl.sequences / mb
    return pick, float(timing["total"]), float(mb * wl.seq_speed), batches


def _no_fit_message(
    spec: JobSpec, ms: ModelShape, wl: _Workload, rows: list[EstimateRow], coeffs: Coefficients
) -> str:
    bits = spec.quant.bits if spec.quantized else 16
    largest = max(r.vram_gb for r in rows)

    def need(seq: int) -> float:
        return float(
            peak_vram(
                ms.shape,
                seq_len=seq,
                micro_batch_size=1,
                lora_r=spec.lora.r,
                gradient_checkpointing=True,
                bits=bits,
                coeffs=coeffs,
            )["total"]
        )

    fixes = []
    if spec.train.micro_batch_size not in ("auto", 1):
        fixes.append("train.micro_batch_size: 1 (raise grad_accum to keep the batch)")
    if spec.train.gradient_checkpointing is False:
        fixes.append('train.gradient_checkpointing: "auto"')
    seq = wl.seq_mem // 2
    while seq >= 128 and need(seq) > largest * 0.97:
        seq //= 2
    if seq >= 128:
        fixes.append(f"train.max_seq_len: {seq} (needs {need(seq):.1f} GiB)")
    bigger = [
        g.name
        for g in sorted(CATALOG.values(), key=lambda g: g.vram_gb)
        if g.vram_gb * 0.97 >= need(wl.seq_mem)
    ]
    if bigger:
        fixes.append(f"a larger GPU: {', '.join(bigger[:4])}")
    if not spec.objective.preference and all(r.gpu_count <= 1 for r in rows):
        card = max(rows, key=lambda r: r.vram_gb).gpu
        fixes.append(f"several GPUs of one instance, sharded (FSDP): gpu='2x {card}' or more")
    if bits > 4:
        fixes.append("quant.bits: 4")
    lines = [
        f"{ms.name} fits none of the GPUs considered (largest {largest:.0f} GiB); "
        f"at micro-batch 1 with checkpointing it needs {need(wl.seq_mem):.1f} GiB "
        f"for max_seq_len {wl.seq_mem}. What would make it fit:"
    ]
    lines += [f"  - {f}" for f in fixes] or ["  - a smaller model"]
    return "\n".join(lines)
