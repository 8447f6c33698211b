"""Which kernel runs an 8-bit layer's int8 inputs of several rows on an AVX-512 CPU,
measured once per machine.

lowbit's 8-bit GEMV on int8 inputs has an AVX-512 VNNI and an AVX2 form. For one row the
AVX-512 one is the faster or level everywhere it was timed; for 2-32 rows (short prompts,
batched decode) it depends on the CPU: on Intel's it is faster, on AMD's Zen 4, which runs a
512-bit instruction as two 256-bit halves, the AVX2 form of the earlier row-by-row 4-bit kernel
ran 8-32 rows ~1.6x faster. (4-bit codes, stored in blocks of 16 interleaved rows, take the
AVX-512 block kernel for any number of rows: on Zen 4 it ran 4 and 8 rows 2.2x faster than its
AVX2 form did then, before that form read each block in one pass.) So the first time the
kernels load on an AVX-512 CPU both are timed on an 8-bit shape and the faster one is kept, in
a small file beside the built kernels keyed by the CPU
(vendor, family, model, stepping, name) and torch's thread count, so that a machine keeps one
arithmetic from run to run (the two forms' outputs differ in the last bits). Processes that
start together take turns on a lock beside the record, so they measure once and agree. The C++
reads the choice from ``LOWBIT_KERNEL_ROWS`` ("avx2", or "" for the AVX-512 form) at every
call, which a user may also set.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lowbit.assets import write_text_atomic
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

ENV = "LOWBIT_KERNEL_ROWS"
FILE = "rows_kernel.json"
CHOICES = ("", "avx2")


def cpu_key() -> str:
    """The CPU as /proc/cpuinfo names it (vendor, family, model, stepping and model name: a
    cloud VM's model name alone, e.g. "AMD EPYC", covers several generations), with torch's
    thread count, which moves the balance between arithmetic and memory."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("vendor_id", "cpu family", "model", "stepping", "model name"):
                fields.setdefault(name.strip(), value.strip())
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    cpu = " ".join(f"{k}={fields[k]}" for k in ("vendor_id", "cpu family", "model", "stepping")
                   if k in fields)  # fmt: skip
    return f"{cpu} ({fields.get('model name', '')}), {torch.get_num_threads()} threads"


def user_setting() -> str | None:
    """``LOWBIT_KERNEL_ROWS`` as the user set it (None: unset); a value other than "avx2" or
    "" is a one-line error, on any CPU."""
    value = os.environ.get(ENV)
    if value is not None and value not in CHOICES:
        raise LowbitError(f"{ENV}={value!r}: expected avx2, or empty for the AVX-512 form")
    return value


def choose_rows_kernel(folder: Path, measure: Callable[[str], float] | None = None) -> str:
    """Set ``LOWBIT_KERNEL_ROWS`` for this process from ``folder``'s record for this CPU and
    thread count, or from a measurement (``measure(choice)``: seconds, lower is better)
    recorded there; a value the user set is kept. Returns the choice."""
    user = user_setting()
    if user is not None:
        return user
    path, key = Path(folder) / FILE, cpu_key()
    try:
        with locked(Path(folder) / (FILE + ".lock")):
            records = _records(path)  # again under the lock: another process may have written
            choice = records.get(key, {}).get("choice")
            if choice not in CHOICES:
                choice = _measure_and_record(path, key, records, measure or _time_rows)
    except OSError as exc:  # no lock file here (a read-only folder): measure for this run only
        log.warning("8-bit rows kernel: cannot lock %s (%s); measuring for this run", folder, exc)
        times = _timings(measure or _time_rows)
        choice = min(CHOICES, key=lambda c: statistics.median(times[c]))
    os.environ[ENV] = choice
    return choice


def _measure_and_record(path: Path, key: str, records: dict, measure) -> str:
    times = _timings(measure)
    choice = min(CHOICES, key=lambda c: statistics.median(times[c]))
    records[key] = {"choice": choice, "seconds": times}
    try:
        write_text_atomic(path, json.dumps({"version": 3, "machines": records}))
    except OSError as exc:  # a full disk: the choice holds for this run, measured again next
        log.warning("8-bit rows kernel: could not record the choice in %s (%s)", path, exc)
    medians = {c or "avx512": round(statistics.median(t), 6) for c, t in times.items()}
    log.info("8-bit rows kernel for %s: %s (median s: %s)", key, choice or "avx512", medians)
    return choice


def _records(path: Path) -> dict:
    """The recorded choices by CPU key (empty for a missing, damaged or older file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        machines = data["machines"] if data.get("version") == 3 else {}
        return {k: v for k, v in machines.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:  # (closing the file releases the lock, also where flock itself failed)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _timings(measure: Callable[[str], float], rounds: int = 7) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {c: [] for c in CHOICES}
    for _ in range(rounds):  # alternating, so that a drift of the machine hits both
        for c in CHOICES:
            times[c].append(measure(c))
    return times


def _time_rows(choice: str, rows: int = 8, copies: int = 8) -> float:
    """Seconds for ``rows`` rows of x through ``copies`` random 1024x2048 8-bit matrices (16 MB,
    beyond most L2 caches), groups of 32, float16 scales: the prompt-sized case."""
    before = os.environ.get(ENV)
    os.environ[ENV] = choice
    try:
        g = torch.Generator().manual_seed(0)
        ws = [torch.randint(0, 256, (1024, 2048), dtype=torch.uint8, generator=g)
              for _ in range(copies)]  # fmt: skip
        scale = torch.rand(1024, 64, generator=g).half()
        x, empty = torch.randn(rows, 2048, generator=g), torch.empty(0, dtype=torch.half)
        op = torch.ops.lowbit_cpu.affine_linear
        op(x, ws[0], scale, empty, 32, 8, True)  # warm
        start = time.perf_counter()
        for w in ws:
            op(x, w, scale, empty, 32, 8, True)
        return time.perf_counter() - start
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
