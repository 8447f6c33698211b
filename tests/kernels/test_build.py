"""Where the kernel library is built: one folder per sources, flags and torch version."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

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


def test_a_second_copy_of_the_sources_builds_in_its_own_folder(tmp_path, monkeypatch):
    """The compile commands name the sources' place: two installs of one lowbit sharing a
    folder took turns rebuilding every kernel (ninja reads a changed command as stale)."""
    import shutil

    here = build_dir()
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    monkeypatch.setattr(build, "CSRC", copy)
    assert build_dir() != here and build_dir().parent == here.parent


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


def _fake_loader(monkeypatch, seen: list) -> None:
    from torch.utils import cpp_extension

    def load(name, sources, build_directory, **kwargs):  # what torch's loader would meet
        seen.append((Path(build_directory) / "lock").exists())

    monkeypatch.setattr(cpp_extension, "load", load)


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch, caplog):
    """torch's loader waits forever on a "lock" file a killed build left; lowbit removes it
    under its own (kernel-released) lock before loading, and says it builds when it must."""
    (tmp_path / "lock").write_text("")
    seen: list = []
    _fake_loader(monkeypatch, seen)
    monkeypatch.setattr(build, "build_dir", lambda: tmp_path)
    monkeypatch.setattr(build, "cpu_supported", lambda: True)
    monkeypatch.setattr("lowbit.kernels.int8.has_avx512_vnni", lambda: False)
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    with caplog.at_level(logging.INFO, logger="lowbit.kernels.build"):
        assert build._load.__wrapped__() is True
    assert seen == [False] and not (tmp_path / "lock").exists()
    assert "left by a kernel build that was stopped" in caplog.text
    assert "building lowbit's CPU kernels" in caplog.text


def test_without_the_build_lock_a_lock_file_is_left_alone(tmp_path, monkeypatch):
    """A folder lowbit cannot lock (read-only, built elsewhere) keeps torch's lock file: it
    may belong to a build running now."""
    (tmp_path / "lock").write_text("")
    seen: list = []
    _fake_loader(monkeypatch, seen)
    build._build(tmp_path, held=False)
    assert seen == [True] and (tmp_path / "lock").exists()


def test_the_loader_runs_the_ninja_package_whatever_path_holds(tmp_path, monkeypatch):
    """torch's loader runs ``ninja`` from PATH: the ``ninja`` package's comes first while it
    runs (so an environment used without activating it finds one, and one ninja version
    keeps the build log), and PATH is as it was afterwards."""
    import os

    import ninja
    from torch.utils import cpp_extension

    seen: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: seen.append(os.environ["PATH"]))
    monkeypatch.setenv("PATH", "/nowhere")
    build._build(tmp_path, held=True)
    assert seen == [f"{ninja.BIN_DIR}{os.pathsep}/nowhere"]
    assert os.environ["PATH"] == "/nowhere"


@pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")
def test_built_kernels_load_with_no_ninja_or_compiler_on_path(tmp_path):
    """``.venv/bin/lowbit`` started from a shell whose PATH has no ninja (nor a compiler: the
    kernels are built already) still runs on them."""
    import os
    import subprocess
    import sys

    code = "from lowbit.kernels.build import native_ops; assert native_ops()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PATH": str(tmp_path)}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "could not be built" not in done.stderr
