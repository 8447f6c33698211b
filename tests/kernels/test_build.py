"""Where the kernel library is built: one folder per sources, flags and torch version."""

from __future__ import annotations

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
