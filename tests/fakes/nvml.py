"""A fake NVML: the few ``pynvml`` functions telemetry calls, over scripted GPU readings.

A real object with the library's interface (not a mock): ``NvmlSource(FakeNvml(...))`` runs the
same code as ``NvmlSource(pynvml)`` on a GPU machine, so the parsing is tested on CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence


class NVMLError(Exception):
    """What pynvml raises (here: a call before ``nvmlInit``, or no power sensor)."""


@dataclasses.dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclasses.dataclass
class _Memory:
    total: int
    used: int
    free: int


class FakeNvml:
    """``devices`` GPUs of ``total_gib``; each read takes the next utilisation of ``utils``
    (cycled) and reports memory rising by ``mem_step_gib`` per read; ``power_w`` None means the
    board has no power sensor (pynvml raises)."""

    def __init__(
        self,
        utils: Sequence[int] = (90, 95, 85),
        *,
        devices: int = 1,
        total_gib: float = 80.0,
        mem_step_gib: float = 0.5,
        power_w: float | None = 350.0,
    ) -> None:
        self._utils: Iterator[int] = itertools.cycle(utils)
        self.devices, self.total_gib, self.mem_step_gib, self.power_w = (
            devices,
            total_gib,
            mem_step_gib,
            power_w,
        )
        self.initialised = False
        self.reads = 0

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Utilization:
        self._check()
        self.reads += 1
        return _Utilization(gpu=next(self._utils), memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        self._check()
        total = int(self.total_gib * 1024**3)
        used = min(total, int(self.reads * self.mem_step_gib * 1024**3))
        return _Memory(total=total, used=used, free=total - used)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._check()
        if self.power_w is None:
            raise NVMLError("Not Supported")
        return int(self.power_w * 1000)  # milliwatts, as NVML reports

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError("Uninitialized")
