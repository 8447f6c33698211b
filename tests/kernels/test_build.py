"""The built kernel library: bound at load time (no lazy symbol resolution while kernels run)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lowbit.kernels.build import build_dir, native_ops


@pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_the_library_binds_every_symbol_when_it_loads():
    library = build_dir() / "lowbit_cpu_kernels.so"
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    flags = [line for line in dynamic.splitlines() if "(FLAGS" in line]
    assert any("BIND_NOW" in line or " NOW" in line for line in flags), flags
