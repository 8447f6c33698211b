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
