"""GPU catalog, a dated price snapshot, billing granularity and setup overhead per provider.

Specs are vendor datasheet numbers: VRAM in GiB as the card reports it, dense (non-sparse)
bf16 tensor TFLOP/s with fp32 accumulation (the mode PyTorch uses; GeForce cards run it at half
their fp16-accumulate rate), memory bandwidth in GB/s. ``gemm_efficiency`` is the share of that
peak a large bf16 matmul reaches: measured 0.80 on the calibration H200 (788 of 989); the other
values are typical published PyTorch GEMM results, not measured here.

Apple Silicon rows (the MLX backend) are whole chips: ``vram_gb`` is the share of the chip's
unified memory Metal lets the GPU use (:func:`apple_gpu_memory_gib`) for the row's smallest
memory configuration of that GPU (a detected Mac uses its own memory); ``bf16_tflops`` is the
GPU's peak (cores x 128 ALUs x 2 x clock; Apple publishes FP32 TFLOP/s for M1/M2, the M3/M4 clocks
are measured by reviewers, so these carry +-15%); MLX runs bf16 matmuls at the FP32 rate there.
Their ``gemm_efficiency`` 0.80 is derived, not measured here: mlx-lm's own benchmark
(BENCHMARKS.md, 64 GB M4 Max, mlx 0.29) prefills 2,048 tokens of Qwen3-4B in bf16 at 1,781
tok/s = 8.6 GFLOP/token x 1,781 = 15.3 TFLOP/s, 0.83 of 18.4; mlx-lm's LORA.md quotes ~250
tok/s for Mistral-7B LoRA (4 layers, batch 1) on an M1 Max, which is 0.39 of its peak for the
whole step, i.e. 0.72 in this model's terms (short WikiSQL rows, 2023's MLX). The estimator's
speed band is wider for these rows (``_estimate.MLX_ERROR``).

Prices are a snapshot, never a promise: live offers from the provider APIs replace them when
keys are present. Sources are in ``../shared/provider-apis.md`` §9 (SkyPilot catalogs v7/v8 and
a Lambda ``/instance-types`` response of Nov 2025).
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from .._exceptions import EstimateError

__all__ = [
    "CATALOG",
    "GPUSpec",
    "SNAPSHOT",
    "SnapshotPrice",
    "SetupModel",
    "apple_gpu_memory_gib",
    "billing_increment_s",
    "parse_gpu",
    "resolve_gpu",
    "setup_model",
]


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """One GPU model: memory, dense bf16 TFLOP/s (fp32 accumulate) and bandwidth."""

    name: str
    vram_gb: float
    bf16_tflops: float
    bandwidth_gbs: float
    gemm_efficiency: float = 0.80
    bf16: bool = True
    aliases: tuple[str, ...] = ()
    unified_memory_gb: float | None = None  # Apple Silicon: the chip's memory (trains with MLX)

    @property
    def apple(self) -> bool:
        """An Apple Silicon chip: unified memory, trained with the MLX backend."""
        return self.unified_memory_gb is not None


def apple_gpu_memory_gib(unified_gb: float) -> float:
    """The GPU's share of ``unified_gb`` of unified memory: Metal's recommended working set,
    about 2/3 of the memory below 36 GB and 3/4 from 36 GB (macOS keeps the rest for itself)."""
    return round(unified_gb * (0.75 if unified_gb >= 36 else 2 / 3), 1)


def _apple(name: str, cores: int, tflops: float, bandwidth: float, memory_gb: float) -> GPUSpec:
    short = name.lower()
    return GPUSpec(
        name,
        apple_gpu_memory_gib(memory_gb),
        tflops,
        bandwidth,
        0.80,
        aliases=(f"apple {short}", f"{short} {cores}-core gpu", f"{short} {cores}c"),
        unified_memory_gb=memory_gb,
    )


CATALOG: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("RTX 3090", 24, 71.0, 936, 0.85, aliases=("3090", "geforce rtx 3090")),
        GPUSpec("RTX 4090", 24, 165.2, 1008, 0.85, aliases=("4090", "geforce rtx 4090")),
        GPUSpec("RTX 5080", 16, 112.6, 960, 0.85, aliases=("5080", "geforce rtx 5080")),
        GPUSpec("RTX 5090", 32, 209.5, 1792, 0.85, aliases=("5090", "geforce rtx 5090")),
        GPUSpec("RTX A5000", 24, 111.1, 768, 0.85, aliases=("a5000",)),
        GPUSpec("RTX A6000", 48, 154.8, 768, 0.85, aliases=("a6000",)),
        GPUSpec("RTX 6000 Ada", 48, 364.2, 960, 0.80, aliases=("rtx 6000 ada generation",)),
        GPUSpec("L4", 24, 121.0, 300, 0.75),
        GPUSpec("L40", 48, 181.0, 864, 0.80),
        GPUSpec("L40S", 48, 362.1, 864, 0.75),
        GPUSpec("A10", 24, 125.0, 600, 0.80, aliases=("a10g",)),
        GPUSpec("A40", 48, 149.7, 696, 0.80),
        GPUSpec(
            "A100 40GB",
            40,
            312.0,
            1555,
            0.85,
            aliases=("a100", "a100-40gb", "a100 sxm4", "a100-sxm4-40gb", "a100-pcie-40gb"),
        ),
        GPUSpec(
            "A100 80GB",
            80,
            312.0,
            2039,
            0.85,
            aliases=("a100-80gb", "a100 80gb sxm", "a100-sxm4-80gb", "a100 80gb pcie"),
        ),
        GPUSpec("H100 PCIe", 80, 756.0, 2000, 0.80, aliases=("h100-pcie",)),
        GPUSpec("H100 SXM", 80, 989.0, 3350, 0.80, aliases=("h100", "h100 80gb hbm3", "h100 sxm5")),
        GPUSpec("H100 NVL", 94, 835.0, 3900, 0.80),
        GPUSpec("GH200", 96, 989.0, 4000, 0.80),
        GPUSpec("H200", 141, 989.0, 4800, 0.80, aliases=("h200 sxm", "h200 nvl")),
        GPUSpec("B200", 180, 2250.0, 8000, 0.75),
        # Apple Silicon, top GPU bin of each chip: (cores, TFLOP/s, GB/s, smallest memory
        # that bin ships with). No M4 Ultra has shipped; the M3 Ultra is the newest Ultra.
        _apple("M1", 8, 2.6, 68, 8),
        _apple("M2", 10, 3.6, 100, 8),
        _apple("M3", 10, 4.1, 100, 8),
        _apple("M4", 10, 4.6, 120, 16),
        _apple("M1 Pro", 16, 5.2, 200, 16),
        _apple("M1 Max", 32, 10.4, 400, 32),
        _apple("M1 Ultra", 64, 21.0, 800, 64),
        _apple("M2 Pro", 19, 6.8, 200, 16),
        _apple("M2 Max", 38, 13.6, 400, 32),
        _apple("M2 Ultra", 76, 27.2, 800, 64),
        _apple("M3 Pro", 18, 7.4, 150, 18),
        _apple("M3 Max", 40, 16.4, 400, 48),
        _apple("M3 Ultra", 80, 32.8, 819, 96),
        _apple("M4 Pro", 20, 9.2, 273, 24),
        _apple("M4 Max", 40, 18.4, 546, 48),
        GPUSpec(
            "V100",
            16,
            125.0,
            900,
            0.70,
            bf16=False,
            aliases=("tesla v100", "tesla v100-sxm2-16gb", "v100-sxm2-16gb"),
        ),
    )
}


def _norm(name: str) -> str:
    n = name.lower().strip()
    n = re.sub(r"^(nvidia|geforce|apple)\s+", "", n)
    n = n.removeprefix("geforce ")
    return re.sub(r"[\s_-]+", " ", n)


_LOOKUP: dict[str, str] = {}
for _spec in CATALOG.values():
    for _key in (_spec.name, *_spec.aliases):
        _LOOKUP[_norm(_key)] = _spec.name


def resolve_gpu(name: str) -> GPUSpec:
    """The catalog entry for ``name`` (case, spaces and vendor prefixes ignored).

    Raises:
        EstimateError: unknown name; lists the known names, closest first.
    """
    key = _norm(name)
    if key in _LOOKUP:
        return CATALOG[_LOOKUP[key]]
    spaced = key.replace(" ", "")
    for alias, canonical in _LOOKUP.items():
        if alias.replace(" ", "") == spaced:
            return CATALOG[canonical]
    known = list(CATALOG)
    ranked = sorted(
        known,
        key=lambda k: -difflib.SequenceMatcher(None, key, _norm(k)).ratio(),
    )
    raise EstimateError(
        f"unknown GPU {name!r}; known GPUs (closest first): {', '.join(ranked)}", gpu=name
    )


_COUNT_RE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(.+)$", re.IGNORECASE)


def parse_gpu(name: str) -> tuple[GPUSpec, int | None]:
    """A GPU and, when given, how many: ``"2x RTX 3090"`` -> (RTX 3090, 2); ``"H100"`` ->
    (H100 SXM, None) (any count).

    Raises:
        EstimateError: unknown GPU name (closest first), or a count below 1.
    """
    m = _COUNT_RE.match(name)
    if m is None:
        return resolve_gpu(name), None
    count = int(m.group(1))
    if count < 1:
        raise EstimateError(f"GPU count in {name!r} must be at least 1 (e.g. '2x RTX 3090')",
                            gpu=name)  # fmt: skip
    return resolve_gpu(m.group(2)), count


@dataclasses.dataclass(frozen=True)
class SnapshotPrice:
    """One snapshot offer: whole-instance price for ``gpu_count`` GPUs, and where it came from."""

    provider: str
    gpu: str
    gpu_count: int
    price_per_hour: float
    instance_type: str
    source: str


_RP8 = "snapshot ≈2026 (SkyPilot catalog v8, RunPod secure)"
_RP7 = "snapshot ≈mid-2025 (SkyPilot catalog v7, RunPod secure)"
_RPN = "snapshot 2026-09 (client notes, RunPod secure)"
_LA8 = "snapshot ≈2026 (SkyPilot catalog v8, Lambda)"
_LAN = "snapshot 2025-11 (Lambda /instance-types response)"

SNAPSHOT: tuple[SnapshotPrice, ...] = (
    SnapshotPrice("runpod", "RTX 3090", 1, 0.50, "NVIDIA GeForce RTX 3090", _RP8),
    SnapshotPrice("runpod", "RTX 4090", 1, 0.74, "NVIDIA GeForce RTX 4090", _RP8),
    SnapshotPrice("runpod", "RTX 5090", 1, 0.99, "NVIDIA GeForce RTX 5090", _RP8),
    SnapshotPrice("runpod", "RTX A6000", 1, 0.53, "NVIDIA RTX A6000", _RP8),
    SnapshotPrice("runpod", "L4", 1, 0.44, "NVIDIA L4", _RP7),
    SnapshotPrice("runpod", "L40", 1, 1.14, "NVIDIA L40", _RP7),
    SnapshotPrice("runpod", "L40S", 1, 0.99, "NVIDIA L40S", _RP8),
    SnapshotPrice("runpod", "A40", 1, 0.44, "NVIDIA A40", _RPN),
    SnapshotPrice("runpod", "A100 80GB", 1, 1.39, "NVIDIA A100 80GB PCIe", _RP8),
    SnapshotPrice("runpod", "H100 PCIe", 1, 2.39, "NVIDIA H100 PCIe", _RP7),
    SnapshotPrice("runpod", "H100 SXM", 1, 3.29, "NVIDIA H100 80GB HBM3", _RP8),
    SnapshotPrice("runpod", "H100 NVL", 1, 3.19, "NVIDIA H100 NVL", _RP8),
    SnapshotPrice("runpod", "H200", 1, 3.99, "NVIDIA H200", _RP7),
    SnapshotPrice("lambda", "A10", 1, 1.29, "gpu_1x_a10", _LA8),
    SnapshotPrice("lambda", "RTX A6000", 1, 1.09, "gpu_1x_a6000", _LA8),
    SnapshotPrice("lambda", "A100 40GB", 1, 1.29, "gpu_1x_a100_sxm4", _LAN),
    SnapshotPrice("lambda", "A100 80GB", 8, 22.32, "gpu_8x_a100_80gb_sxm4", _LA8),
    SnapshotPrice("lambda", "H100 PCIe", 1, 3.29, "gpu_1x_h100_pcie", _LA8),
    SnapshotPrice("lambda", "H100 SXM", 1, 4.29, "gpu_1x_h100_sxm5", _LA8),
    SnapshotPrice("lambda", "GH200", 1, 1.49, "gpu_1x_gh200", _LAN),
)


def _multi(price: SnapshotPrice, counts: tuple[int, ...]) -> tuple[SnapshotPrice, ...]:
    """The same GPU in instances of ``counts`` GPUs, at ``count`` x the one-GPU price.

    RunPod prices a pod per GPU (``gpuCount`` x the GPU's hourly rate, the same rate for any
    count); Lambda's ``gpu_<N>x_`` types are priced per GPU at about the one-GPU type's rate
    (its Nov 2025 list: within a few percent). The label says the price was derived.
    """
    out = []
    for n in counts:
        itype = price.instance_type
        if price.provider == "lambda":
            itype = itype.replace("gpu_1x_", f"gpu_{n}x_", 1)
        out.append(dataclasses.replace(
            price, gpu_count=n, price_per_hour=round(price.price_per_hour * n, 2),
            instance_type=itype, source=f"{price.source}, x{n} the one-GPU rate",
        ))  # fmt: skip
    return tuple(out)


_ONE = {(p.provider, p.gpu): p for p in SNAPSHOT}
# Multi-GPU instances (torchrun: DDP, or FSDP-QLoRA when the model needs more than one card).
SNAPSHOT += (
    *_multi(_ONE["runpod", "RTX 3090"], (2, 4, 8)),
    *_multi(_ONE["runpod", "RTX 4090"], (2, 4, 8)),
    *_multi(_ONE["runpod", "RTX A6000"], (2, 4, 8)),
    *_multi(_ONE["runpod", "A100 80GB"], (2, 4, 8)),
    *_multi(_ONE["runpod", "H100 SXM"], (2, 4, 8)),
    *_multi(_ONE["lambda", "RTX A6000"], (2, 4)),
    *_multi(_ONE["lambda", "A100 40GB"], (2, 4, 8)),
    *_multi(_ONE["lambda", "H100 SXM"], (2, 4, 8)),
)

_BILLING_S = {"runpod": 1, "lambda": 60, "local": 1}


def billing_increment_s(provider: str) -> int:
    """Seconds per billed unit: RunPod bills per second, Lambda per minute."""
    return _BILLING_S.get(provider, 60)


@dataclasses.dataclass(frozen=True)
class SetupModel:
    """Seconds from "launch" to the first training step, and the assumptions behind them."""

    boot_s: float
    image_s: float
    install_s: float
    download_gbs: float  # model download, GB/s
    load_gbs: float  # reading + quantising weights on the instance, GB/s
    teardown_s: float

    def seconds(self, model_bytes: float) -> float:
        download = model_bytes / (self.download_gbs * 1e9) if self.download_gbs else 0.0
        load = model_bytes / (self.load_gbs * 1e9)
        return self.boot_s + self.image_s + self.install_s + download + load + self.teardown_s

    def describe(self) -> str:
        dl = f"{self.download_gbs * 8:.1f} Gbit/s download" if self.download_gbs else "no download"
        return (
            f"boot {self.boot_s:.0f}s + image {self.image_s:.0f}s + pip {self.install_s:.0f}s"
            f" + model at {dl}, load/quantise at {self.load_gbs:.1f} GB/s"
            f" + teardown {self.teardown_s:.0f}s"
        )


# Assumptions (not measured here): RunPod pods with the stock PyTorch image start in ~1 min
# plus an image pull when the host lacks it; Lambda VMs take ~3-5 min to boot with PyTorch
# preinstalled. The model comes from the Hugging Face hub at ~1 Gbit/s (125 MB/s).
_SETUP = {
    "runpod": SetupModel(
        boot_s=60, image_s=90, install_s=60, download_gbs=0.125, load_gbs=1.0, teardown_s=20
    ),
    "lambda": SetupModel(
        boot_s=240, image_s=0, install_s=60, download_gbs=0.125, load_gbs=1.0, teardown_s=20
    ),
    "local": SetupModel(
        boot_s=0, image_s=0, install_s=0, download_gbs=0.0, load_gbs=1.0, teardown_s=0
    ),
}


def setup_model(provider: str) -> SetupModel:
    """Setup overhead assumptions for ``provider`` (RunPod's for providers we do not know)."""
    return _SETUP.get(provider, _SETUP["runpod"])
