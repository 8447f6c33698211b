"""Hidden states between blocks: in memory or spilled to disk, read back exactly, one batch at
a time; the calls that pair them with each batch's other arguments."""

import pytest
import torch

from lowbit.calibration import BlockCall, HiddenStates, SpilledStates, saved_states
from lowbit.calibration.hidden import Calls
from lowbit.errors import LowbitError


def batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 8, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_states_read_back_what_was_written(tmp_path, dtype):
    states = SpilledStates(tmp_path / "h", dtype)
    for x in batches():
        states.append(x)
    assert len(states) == 3 and len(list((tmp_path / "h").iterdir())) == 3
    for got, x in zip(states, batches(), strict=True):
        assert got.dtype == dtype and torch.equal(got, x.to(dtype))
    with pytest.raises(IndexError):
        states[3]
    again = saved_states(tmp_path / "h", spill=True, dtype=dtype)
    assert again.spilled and torch.equal(again[2], states[2])


def test_in_memory_states_save_to_the_spilled_layout(tmp_path):
    states = HiddenStates(torch.bfloat16)
    for x in batches():
        states.append(x)
    states.save(tmp_path / "h")
    loaded = saved_states(tmp_path / "h", spill=False, dtype=torch.bfloat16)
    assert not loaded.spilled and len(loaded) == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded, states, strict=True))


def test_calls_pair_frames_with_states_and_slice_lazily(tmp_path):
    states = SpilledStates(tmp_path / "h")
    for x in batches():
        states.append(x)
    frames = [BlockCall(None, (i,), {"k": i}) for i in range(3)]
    calls = Calls(frames, states)
    assert [c.args for c in calls] == [(0,), (1,), (2,)]
    assert torch.equal(calls[1].hidden, batches()[1])
    head = calls[:2]
    assert isinstance(head, Calls) and len(head) == 2 and head[-1].kwargs == {"k": 1}
    assert len(calls[5:]) == 0 and not calls[5:]
    with pytest.raises(LowbitError, match="2 saved hidden states for 3 calibration batches"):
        Calls(frames, saved_states_of(tmp_path, 2))


def saved_states_of(tmp_path, n):
    states = HiddenStates()
    for x in batches()[:n]:
        states.append(x)
    return states


def test_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
    from lowbit.calibration import hidden

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hidden, "save_file", full)
    with pytest.raises(LowbitError, match="cannot spill hidden states to .*00000.safetensors: No"):
        SpilledStates(tmp_path / "h").append(torch.ones(1, 2, 3))
