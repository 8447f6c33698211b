"""Where the kernel library is built: one folder per sources, flags and torch version."""

from __future__ import annotations

from lowbit.kernels.build import build_dir, native_ops


def test_the_build_folder_is_the_same_before_and_after_loading():
    """The loader appends to the flag lists it is given: the flags the folder's name is made
    of must not change with it."""
    before = build_dir()
    native_ops()
    assert build_dir() == before
