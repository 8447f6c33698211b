"""The resumable work folder beside --out."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.workdir import WorkFolder, work_path


def test_records_stop_at_the_first_unfinished_unit(tmp_path):
    work = WorkFolder(tmp_path / "out", {"recipe": "a"})
    assert work.path == work_path(tmp_path / "out") == tmp_path / ".out.lowbit-work"
    work.write_unit(0, {"w": torch.ones(2)}, {"n": 0}, [torch.zeros(1, 2, 3)])
    work.write_unit(1, {"w": torch.ones(2)}, {"n": 1}, [torch.full((1, 2, 3), 2.0)])
    (work.path / "units" / "00001.json").unlink()  # killed before the record was written
    again = WorkFolder(tmp_path / "out", {"recipe": "a"})
    assert again.records() == [{"n": 0}]
    assert again.hidden(0) is None  # the saved states are those after block 1, not block 0
    assert torch.equal(again.hidden(1)[0], torch.full((1, 2, 3), 2.0))


def test_another_fingerprint_is_refused_until_restart(tmp_path):
    WorkFolder(tmp_path / "out", {"recipe": "a", "seed": 0}).write_unit(0, {}, {"n": 0})
    with pytest.raises(LowbitError, match="another recipe.*--restart"):
        WorkFolder(tmp_path / "out", {"recipe": "b", "seed": 0})
    assert WorkFolder(tmp_path / "out", {"recipe": "b", "seed": 0}, restart=True).records() == []


def test_finish_publishes_shards_and_removes_the_work_folder(tmp_path):
    work = WorkFolder(tmp_path / "out", {})
    work.write_unit(0, {"a": torch.ones(3)}, {})
    work.write_unit(1, {"b": torch.zeros(2)}, {})
    out = work.finish(2, False, lambda folder: (folder / "lowbit.json").write_text("{}"))
    assert sorted(p.name for p in out.iterdir()) == ["lowbit.json", "model.safetensors"]
    assert not work.path.exists()
