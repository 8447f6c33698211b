"""Facts about the machine a speed measurement ran on: memory bandwidth, energy counters, threads.

Energy comes from the counters the hardware exposes to this user: RAPL package domains under
``/sys/class/powercap`` on CPUs (Intel, and AMD through the same interface), NVML on NVIDIA GPUs
(``pynvml``, when installed). Where neither is readable the meter reports None ("n/a"); RAPL counts
the whole package, so other processes' work is included in its figure.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``repeats`` full reductions over a buffer much larger
    than any cache (a reduction reads every byte once and writes almost nothing)."""
    buf = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def thread_settings() -> dict[str, object]:
    """What decides CPU speed besides the code: torch's threads, OpenMP's wait policy, how
    long the decode kernels' threads spin before they sleep, who runs those threads (the
    spinning pool, or OpenMP where its threads never sleep: ``kernels/csrc/pool.h``) and the
    instruction set lowbit's kernels run on (``avx512-vnni``, ``avx2+avx-vnni``, ``avx2``, as
    the CPU and ``LOWBIT_KERNEL_ISA`` allow), and the form that runs an 8-bit layer's int8
    inputs of several rows (``kernel_rows``: on an AVX-512 CPU, the one measured faster there:
    ``lowbit.kernels.rows_kernel``)."""
    from lowbit.kernels.build import native_ops
    from lowbit.kernels.rows_kernel import ENV as ROWS

    native = native_ops()
    isa = torch.ops.lowbit_cpu.kernel_isa() if native else "reference"
    rows = "avx2" if isa == "avx512-vnni" and os.environ.get(ROWS) == "avx2" else isa
    return {
        "kernels": isa,
        "kernel_rows": rows,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "lowbit_spin_us": os.environ.get("LOWBIT_SPIN_US", "1000"),
        "decode_threads": torch.ops.lowbit_cpu.decode_threads() if native else "reference",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


class EnergyMeter:
    """Joules consumed between :meth:`start` and :meth:`stop`, or None where nothing is readable."""

    def __init__(self, device: str = "cpu", powercap: Path = POWERCAP) -> None:
        self.device = device
        self.domains = _rapl_domains(powercap) if device == "cpu" else []
        self._nvml = _nvml_handle() if device.startswith("cuda") else None
        self._begin: list[int] | None = None

    @property
    def source(self) -> str | None:
        if self.domains:
            return "rapl"
        return "nvml" if self._nvml is not None else None

    def _read(self) -> list[int] | None:
        if self.domains:
            try:
                return [int((d / "energy_uj").read_text()) for d in self.domains]
            except (OSError, ValueError):
                return None
        if self._nvml is not None:
            import pynvml

            return [pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml) * 1000]  # mJ -> uJ
        return None

    def start(self) -> None:
        self._begin = self._read()

    def stop(self) -> float | None:
        end, begin = self._read(), self._begin
        if end is None or begin is None:
            return None
        total = 0
        for i, (a, b) in enumerate(zip(begin, end, strict=True)):
            if b < a:  # the counter wrapped
                b += _max_range(self.domains[i]) if self.domains else 0
            total += b - a
        return total / 1e6


def _rapl_domains(root: Path) -> list[Path]:
    """Top-level package domains (``intel-rapl:0``, not their ``:0:0`` subdomains), readable."""
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.glob("*rapl:*")):
        if d.name.count(":") != 1:
            continue
        try:
            int((d / "energy_uj").read_text())
        except (OSError, ValueError):
            log.debug("%s is not readable", d)
            continue
        found.append(d)
    return found


def _max_range(domain: Path) -> int:
    try:
        return int((domain / "max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return 0


def _nvml_handle() -> object | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:  # pynvml absent or NVML unusable: energy is "n/a", not an error
        log.debug("NVML energy unavailable: %s", exc)
        return None
