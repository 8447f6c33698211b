"""Where the kernel library is built: one folder per sources, flags and torch version."""

from __future__ import annotations

import functools

import pytest

from lowbit.errors import LowbitError
from lowbit.kernels import build
from lowbit.kernels.build import build_dir, native_ops


def test_the_build_folder_is_the_same_before_and_after_loading():
    """The loader appends to the flag lists it is given: the flags the folder's name is made
    of must not change with it."""
    before = build_dir()
    native_ops()
    assert build_dir() == before


def test_a_misspelt_kernel_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "AVX512")
    with pytest.raises(LowbitError, match="LOWBIT_KERNEL_ISA='AVX512': expected avx2 or avxvnni"):
        build.kernel_isa_env()
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "AVXVNNI")  # case does not matter
    assert build.kernel_isa_env() == "avxvnni"


def test_threads_that_ask_together_share_one_load(monkeypatch):
    """The first load (build, load, rows-kernel timing) runs once when several threads ask at
    the same time: the others wait for its answer instead of loading and timing too."""
    import threading
    import time

    calls = []

    def slow_load() -> bool:
        calls.append(threading.get_ident())
        time.sleep(0.2)  # every thread has asked by now
        return True

    monkeypatch.setattr(build, "_load", functools.cache(slow_load))
    build.native_ops.cache_clear()
    try:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(native_ops())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [True] * 4 and len(calls) == 1
    finally:
        build.native_ops.cache_clear()  # (answered again by the real, cached load)
