"""Atomic outputs: complete or absent, ordinary permissions, stale temporaries of dead processes
removed, and --overwrite that replaces only lowbit's own folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.assets.atomic import RECORDS, atomic_dir, atomic_file, prepare_out, sweep_stale
from lowbit.errors import LowbitError


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are owner-only; what is renamed into place is readable as usual."""
    import stat

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f.bin").write_bytes(b"1")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f.bin").stat().st_mode) == 0o644


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    stale_dir = tmp_path / f".out.{dead}.abcd1234.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    stale_file = tmp_path / f".out.{dead}.zzzz_999.tmp"
    stale_file.write_bytes(b"half")
    mine = tmp_path / f".out.{os.getpid()}.abcd1234.tmp"  # a live process's: left alone
    mine.mkdir()
    other = tmp_path / f".out.x.{dead}.abcd1234.tmp"  # the temporary of "out.x", not of "out"
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "lowbit.json").write_text('{"lowbit_version": "0.1"}')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name, other.name])
    assert sweep_stale(out) == []


def test_overwrite_replaces_only_empty_or_lowbit_folders(tmp_path):
    mine = tmp_path / "mine"
    with atomic_dir(mine) as tmp:
        (tmp / RECORDS[0]).write_text('{"lowbit_version": "0.1"}')
    with pytest.raises(LowbitError, match="already exists.*--overwrite"):
        prepare_out(mine, overwrite=False)
    prepare_out(mine, overwrite=True)
    (tmp_path / "empty").mkdir()
    prepare_out(tmp_path / "empty", overwrite=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(LowbitError, match="not a folder lowbit wrote .*thesis.tex"):
        prepare_out(user, overwrite=True)
    with pytest.raises(LowbitError, match="not a folder lowbit wrote"), atomic_dir(user, True):
        pass
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    for name in RECORDS:  # a record's name alone does not make a folder lowbit's
        (user / name).write_text("{}")
    with pytest.raises(LowbitError, match="not a folder lowbit wrote"):
        prepare_out(user, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "user"]


def test_the_current_folder_or_one_holding_it_is_never_an_out(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (Path("."), tmp_path / "here", Path("..")):
        with pytest.raises(LowbitError, match="current folder"):
            prepare_out(out, overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_destination_is_found_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(LowbitError, match="cannot write .*locked/a/b: .*locked is not a writable"):
        prepare_out(locked / "a" / "b", overwrite=False)


def test_a_file_in_the_way_of_the_path_is_named(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(LowbitError, match="is not a writable folder"):
        prepare_out(tmp_path / "f" / "out", overwrite=False)
    with atomic_file(tmp_path / "g.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "g.txt").read_text() == "x"


def test_a_destination_with_a_name_near_the_limit_is_written_and_swept(tmp_path):
    """A file name holds 255 bytes: the temporaries' tags must not push one past it."""
    from lowbit.assets.atomic import hidden_stem
    from lowbit.models.workdir import work_path

    name = "é" + "m" * 250  # 252 bytes
    with atomic_file(tmp_path / name) as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / (name[:-1] + "d")) as tmp:
        (tmp / "f").write_text("y")
    assert (tmp_path / name).read_text() == "x" and (tmp_path / (name[:-1] + "d") / "f").exists()
    assert len(work_path(tmp_path / name).name.encode()) <= 255
    assert hidden_stem(tmp_path / name) != hidden_stem(tmp_path / (name[:-1] + "d"))
    stale = tmp_path / f"{hidden_stem(tmp_path / name)}.{dead_pid()}.abcd1234.tmp"
    stale.mkdir()
    assert sweep_stale(tmp_path / name) == [stale]
    assert hidden_stem(tmp_path / "short") == ".short"  # ordinary names as before
