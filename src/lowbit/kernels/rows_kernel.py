"""Which kernel runs a 4-bit layer's inputs of several rows on an AVX-512 CPU, measured once per
machine.

lowbit's 4-bit GEMV has an AVX-512 VNNI and an AVX2 form. For one row the AVX-512 one is the
faster or level everywhere it was timed; for 2-32 rows (short prompts, a prompt's experts,
batched decode) it depends on the CPU: on Intel's it is faster, on AMD's Zen 4, which runs a
512-bit instruction as two 256-bit halves, the AVX2 form ran 8-32 rows ~1.6x faster
(25.5 against 40 us per row of a 1024x2048 matrix). So the first time the kernels load on an
AVX-512 CPU both are timed on that shape and the faster one is kept, in a small file beside the
built kernels keyed by the CPU's model name, so that a machine keeps one arithmetic from run to
run (the two forms' outputs differ in the last bits). The C++ reads the choice from
``LOWBIT_KERNEL_ROWS`` ("avx2", or "" for the AVX-512 form), which a user may also set.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.assets import write_text_atomic
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

ENV = "LOWBIT_KERNEL_ROWS"
FILE = "rows_kernel.json"
CHOICES = ("", "avx2")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def choose_rows_kernel(folder: Path, measure: Callable[[str], float] | None = None) -> str:
    """Set ``LOWBIT_KERNEL_ROWS`` for this process from ``folder``'s record for this CPU, or
    from a measurement (``measure(choice)``: seconds, lower is better) recorded there; a value
    the user set is kept. Returns the choice."""
    if ENV in os.environ:
        if os.environ[ENV] not in CHOICES:
            raise LowbitError(f"{ENV}={os.environ[ENV]!r}: expected avx2, or empty for the "
                              f"AVX-512 form")  # fmt: skip
        return os.environ[ENV]
    path, model = Path(folder) / FILE, cpu_model()
    try:
        record = json.loads(path.read_text())
        choice = record["choice"] if record.get("cpu") == model else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        choice = None
    if choice not in CHOICES:
        times = _timings(measure or _time_rows)
        choice = min(CHOICES, key=lambda c: statistics.median(times[c]))
        write_text_atomic(path, json.dumps({"cpu": model, "choice": choice,
                                            "seconds": times}))  # fmt: skip
        medians = {c or "avx512": round(statistics.median(t), 6) for c, t in times.items()}
        log.info("4-bit rows kernel for %s: %s (median s: %s)", model, choice or "avx512",
                 medians)  # fmt: skip
    os.environ[ENV] = choice
    return choice


def _timings(measure: Callable[[str], float], rounds: int = 7) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {c: [] for c in CHOICES}
    for _ in range(rounds):  # alternating, so that a drift of the machine hits both
        for c in CHOICES:
            times[c].append(measure(c))
    return times


def _time_rows(choice: str, rows: int = 8, copies: int = 16) -> float:
    """Seconds for ``rows`` rows of x through ``copies`` random 1024x2048 4-bit matrices (16 MB,
    beyond most L2 caches), groups of 32, float16 scales: the prompt-sized case."""
    before = os.environ.get(ENV)
    os.environ[ENV] = choice
    try:
        g = torch.Generator().manual_seed(0)
        ws = [torch.randint(0, 256, (1024, 1024), dtype=torch.uint8, generator=g)
              for _ in range(copies)]  # fmt: skip
        scale = torch.rand(1024, 64, generator=g).half()
        x, empty = torch.randn(rows, 2048, generator=g), torch.empty(0, dtype=torch.half)
        op = torch.ops.lowbit_cpu.affine_linear
        op(x, ws[0], scale, empty, 32, 4, True)  # warm
        start = time.perf_counter()
        for w in ws:
            op(x, w, scale, empty, 32, 4, True)
        return time.perf_counter() - start
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
