"""Facts about this process and machine that reports record (peak memory, threads)."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MiB (None where not available).

    On Linux this is ``VmHWM`` of ``/proc/self/status``: unlike ``getrusage``'s ``ru_maxrss``,
    it starts afresh at ``exec``, so a child process does not inherit its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (0 where not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def reset_peak_rss() -> bool:
    """Start this process's peak RSS (``VmHWM``) afresh from its current RSS (Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_freed_memory() -> None:
    """Make glibc give freed tensor buffers back to the OS (no-op elsewhere).

    glibc raises its mmap threshold each time a large mmapped buffer is freed, so after the first
    block later blocks' float weights come from the heap and stay resident after they are freed:
    a streamed run would grow by about one block per block. ``malloc_trim`` returns the heap's
    free pages (the process-wide mmap threshold is left alone: forcing it low would make every
    later large allocation fault in fresh pages and slow other work in the same process).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included; 0 where
    /proc is not available)."""
    import os
    import time

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
