"""Build (once per machine) and load lowbit's C++ CPU kernels.

The kernels need AVX2 + FMA + F16C, a C++ compiler and ninja; where any is missing, or the
build fails, :func:`native_ops` returns False and every op runs its plain-PyTorch reference
instead (logged once, never an error). ``make`` builds them at setup time (``python -m
lowbit.kernels.build``); otherwise the first model that wants them builds them (about half a
minute) into the cache.
Set ``LOWBIT_KERNELS=off`` to force the reference path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import sysconfig
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from lowbit.assets import cache_dir
from lowbit.errors import LowbitError
from lowbit.kernels.rows_kernel import choose_rows_kernel, locked, user_setting

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
NAMES = (
    "affine_gemv.cpp",
    "affine_q8.cpp",
    "affine_q8_gemm.cpp",
    "affine_experts.cpp",
    "float_gemv.cpp",
    "decode_ops.cpp",
    "decode_codes.cpp",
    "decode_step.cpp",
    "int8_gemm.cpp",
    "int8_conv.cpp",
    "hadamard.cpp",
    "act_quant.cpp",
)
SOURCES = tuple(CSRC / f for f in NAMES)
# -fopenmp: at::parallel_for is a header template whose OpenMP pragma is silently ignored
# without it, which left the kernels on one thread.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp")
LDFLAGS = ("-fopenmp",)
BUILD_LOCK = "build.lock"  # held by the process that builds or loads (see _build)


def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernels use (AVX2 and FMA; every CPU with
    them also has F16C)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_dir() -> Path:
    """Per source, flags and torch version, so an upgrade rebuilds instead of crashing, and per
    place of the sources and Python's headers, which the compile commands name: two installs
    of the same lowbit (two environments, a checkout beside an installed copy) sharing one
    folder each read the other's commands as changed and rebuilt every kernel whenever the
    other had run; under ``$LOWBIT_KERNEL_DIR`` if set, else the cache folder's ``kernels/``."""
    files = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))  # sources and headers
    key = hashlib.sha256(
        b"".join(f.read_bytes() for f in files) + " ".join(FLAGS + LDFLAGS).encode()
    )
    key.update(torch.__version__.encode())
    key.update(f"{CSRC.resolve()}\0{sysconfig.get_paths()['include']}".encode())
    root = os.environ.get("LOWBIT_KERNEL_DIR")
    return (Path(root) if root else cache_dir() / "kernels") / key.hexdigest()[:16]


def kernel_isa_env() -> str:
    """``LOWBIT_KERNEL_ISA`` in lower case: "" (the CPU's best), "avxvnni" (AVX2 and AVX-VNNI,
    no AVX-512) or "avx2" (AVX2 alone); the C++ kernels read it the same way at every call."""
    value = os.environ.get("LOWBIT_KERNEL_ISA", "")
    if value.lower() not in ("", "avxvnni", "avx2"):
        raise LowbitError(f"LOWBIT_KERNEL_ISA={value!r}: expected avx2 or avxvnni, or unset for "
                          f"the CPU's best")  # fmt: skip
    return value.lower()


# One thread builds, loads and times the kernels; threads that ask meanwhile wait for its answer
# (functools.cache alone would run the body in each of them: two builds, and the rows-kernel
# timing's setting of LOWBIT_KERNEL_ROWS while the other thread's kernels read it). Nothing
# _load() calls or imports may call native_ops() (the lock is not re-entrant).
_FIRST_LOAD = threading.Lock()


@functools.cache
def native_ops() -> bool:
    """Build or load the extension; True when ``torch.ops.lowbit_cpu`` is usable."""
    with _FIRST_LOAD:
        return _load()


@functools.cache
def _load() -> bool:
    kernel_isa_env()  # a misspelt value fails here, before any kernel runs
    user_setting()  # (so does LOWBIT_KERNEL_ROWS's, on any CPU)
    if os.environ.get("LOWBIT_KERNELS", "").lower() in ("off", "0", "no"):
        log.info("LOWBIT_KERNELS=off: using the reference kernels")
        return False
    if not cpu_supported():
        log.warning("this CPU lacks AVX2/FMA: lowbit uses its (slower) reference kernels")
        return False
    folder = build_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            try:
                stack.enter_context(locked(folder / BUILD_LOCK))
                held = True
            except OSError:  # a read-only folder of kernels built elsewhere: nothing to build
                held = False
            _build(folder, held)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, no ninja, build error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("lowbit's CPU kernels could not be built (%s); using the reference path", first)
        return False
    from lowbit.kernels.int8 import has_avx512_vnni

    if has_avx512_vnni():  # which form runs inputs of several rows, timed once per machine
        choose_rows_kernel(folder)
    return True


def _build(folder: Path, held: bool) -> None:
    """Compile (if needed) and load the extension from ``folder``; ``held``: whether this
    process holds the folder's build lock."""
    from torch.utils import cpp_extension

    # torch's loader guards a build with a file that only exists while it builds ("lock"), so a
    # build killed midway (Ctrl-C on the first command) leaves it behind and every later load
    # waits for it forever, silently. lowbit's builds take a kernel-released lock first, so a
    # "lock" file seen while holding that lock is such a leftover.
    stale = folder / "lock"
    if held and stale.exists():
        log.info("removing %s, left by a kernel build that was stopped", stale)
        stale.unlink(missing_ok=True)
    if not (folder / "lowbit_cpu_kernels.so").exists():
        log.warning("building lowbit's CPU kernels in %s (once per machine, a few minutes)", folder)
    with _ninja_on_path():
        cpp_extension.load(
            "lowbit_cpu_kernels",
            [str(s) for s in SOURCES],
            extra_cflags=list(FLAGS),  # copies: the loader appends to ldflags
            extra_ldflags=list(LDFLAGS),
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ``ninja`` package's binary first on PATH while torch's loader runs (it runs
    ``ninja`` from PATH, even to find the kernels up to date). Without this, ``.venv/bin/lowbit``
    run from outside the activated environment found no ninja on a machine without a system
    one (no kernels: the slow reference path), and where the system has its own version, runs
    inside and outside the environment took turns rebuilding every kernel (ninja 1.11 and
    1.13 each read the other's build log as stale: about 3 minutes on 2 cores each time)."""
    try:
        import ninja
    except ImportError:  # (a dependency; without it, whatever ninja PATH has)
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def main() -> int:
    """``python -m lowbit.kernels.build``: build now and say what happened."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = native_ops()
    print(f"lowbit kernels: {'built' if ok else 'not available'} ({build_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
