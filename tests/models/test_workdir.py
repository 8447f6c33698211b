"""The resumable work folder beside --out."""

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.workdir import WorkFolder, drop_published, work_path


def hidden(work: WorkFolder, after: int, value: float) -> Path:
    folder = work.hidden_folder(after)
    (folder / "00000.safetensors").write_text(str(value))
    return folder


def crash(*args, **kwargs):
    raise KeyboardInterrupt


def test_records_stop_at_the_first_unfinished_unit(tmp_path):
    work = WorkFolder(tmp_path / "out", {"recipe": "a"})
    assert work.path == work_path(tmp_path / "out") == tmp_path / ".out.lowbit-work"
    work.write_unit(0, {"w": torch.ones(2)}, {"n": 0}, hidden(work, 0, 1.0))
    state = hidden(work, 1, 2.0)
    original = WorkFolder._hidden
    with pytest.MonkeyPatch.context() as mp:  # killed after the states, before the record
        mp.setattr("lowbit.models.workdir.write_text_atomic", crash)
        with pytest.raises(KeyboardInterrupt):
            work.write_unit(1, {"w": torch.ones(2)}, {"n": 1}, state)
    again = WorkFolder(tmp_path / "out", {"recipe": "a"})
    assert again.records() == [{"n": 0}]
    assert original(again, 1).is_dir()  # committed, but the record says block 1 is not done
    assert (again.hidden(0) / "00000.safetensors").read_text() == "1.0"  # kept until then
    again.write_unit(1, {"w": torch.ones(2)}, {"n": 1}, hidden(again, 1, 3.0))
    assert again.hidden(0) is None  # forgotten once block 1's record is written
    assert (again.hidden(1) / "00000.safetensors").read_text() == "3.0"


def test_another_fingerprint_is_refused_until_restart(tmp_path):
    WorkFolder(tmp_path / "out", {"recipe": "a", "seed": 0}).write_unit(0, {}, {"n": 0})
    with pytest.raises(LowbitError, match="another recipe.*--restart"):
        WorkFolder(tmp_path / "out", {"recipe": "b", "seed": 0})
    assert WorkFolder(tmp_path / "out", {"recipe": "b", "seed": 0}, restart=True).records() == []


def test_another_process_count_is_named_and_another_ranks_folder_leaves_nothing(tmp_path):
    WorkFolder(tmp_path / "out", {"recipe": "a", "world_size": 2}).write_unit(0, {}, {"n": 0})
    with pytest.raises(LowbitError, match=r"number of processes \(saved 2, now 1\); pass"):
        WorkFolder(tmp_path / "out", {"recipe": "a"})  # (one process records no world_size)
    other = tmp_path / "elsewhere"  # a host that does not share --out: rank 1's folder alone
    WorkFolder(other / "out", {"recipe": "a"}, rank=1).remove()
    assert list(other.iterdir()) == []


def test_finish_publishes_shards_and_removes_the_work_folder(tmp_path):
    work = WorkFolder(tmp_path / "out", {})
    work.write_unit(0, {"a": torch.ones(3)}, {})
    work.write_unit(1, {"b": torch.zeros(2)}, {})
    out = work.finish(
        2, False, lambda folder: (folder / "lowbit.json").write_text('{"lowbit_version": "0"}')
    )
    assert sorted(p.name for p in out.iterdir()) == ["lowbit.json", "model.safetensors"]
    assert not work.path.exists()


def test_a_run_stopped_after_it_published_leaves_nothing_a_rerun_keeps(tmp_path):
    """Killed between publishing --out and removing its work folder: the next run on that out
    removes the folder (its units repeat out's weights); a run stopped before it published
    keeps its work, also when publishing itself failed."""
    manifest = lambda folder: (folder / "lowbit.json").write_text("{}")  # noqa: E731
    out = tmp_path / "out"
    work = WorkFolder(out, {})
    work.write_unit(0, {"a": torch.ones(3)}, {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WorkFolder, "remove", crash)
        with pytest.raises(KeyboardInterrupt):
            work.finish(1, False, manifest)
    work._lock.close()  # (the stopped process's lock ends with it)
    assert out.is_dir() and work.path.is_dir()
    assert drop_published(out) and not work.path.exists() and out.is_dir()

    again = WorkFolder(tmp_path / "other", {})
    again.write_unit(0, {"a": torch.ones(3)}, {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lowbit.models.workdir.publish_dir", crash)
        with pytest.raises(KeyboardInterrupt):
            again.finish(1, False, manifest)
    (tmp_path / "other").mkdir()  # another run's folder appeared meanwhile
    assert not drop_published(tmp_path / "other") and again.records() == [{}]


def test_a_second_process_writing_the_same_out_is_refused(tmp_path):
    import subprocess
    import sys

    work = WorkFolder(tmp_path / "out", {"recipe": "a"})
    code = ("import sys\nfrom lowbit.errors import LowbitError\n"
            "from lowbit.models.workdir import WorkFolder\n"
            "try:\n    WorkFolder(sys.argv[1], {'recipe': 'a'})\n"
            "except LowbitError as e:\n    print(e)\n    sys.exit(3)\n")  # fmt: skip
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")],
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 3 and "another lowbit run is writing" in other.stdout
    work.remove()  # the lock goes with the folder
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")])
    assert again.returncode == 0


def test_a_work_folder_killed_before_its_fingerprint_starts_afresh(tmp_path):
    path = work_path(tmp_path / "out")
    (path / "units").mkdir(parents=True)
    (path / "units" / "00000.json").write_text("{}")  # of no known run
    assert WorkFolder(tmp_path / "out", {"recipe": "a"}).records() == []
