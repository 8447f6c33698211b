"""The end-to-end tuning loop on a toy model: options, the KL, held-out check and restore."""

import pytest
import torch

from lowbit.algorithms.tune import TuneOptions, kl_to, tune_end_to_end
from lowbit.errors import LowbitError


def toy(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))


def test_options_are_checked():
    assert TuneOptions().windows_needed() == 6
    for bad in ({"steps": 0}, {"batch_size": 0}, {"holdout": 0}, {"lr": 0.0}, {"lr": 1.0}):
        with pytest.raises(LowbitError, match="tune"):
            TuneOptions(**bad)


def test_kl_is_zero_only_for_the_same_distribution():
    a = torch.randn(2, 5, 7)
    assert float(kl_to(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to(a, a + 3.0)) == pytest.approx(0.0, abs=1e-6)  # a shift: same softmax
    assert float(kl_to(a, torch.randn(2, 5, 7))) > 0.01


def test_training_lowers_held_out_kl_and_a_useless_run_is_undone():
    teacher, student = toy(0), toy(1)
    with torch.no_grad():
        student[0].weight.copy_(teacher[0].weight)
    windows = torch.randint(0, 16, (12, 10), generator=torch.Generator().manual_seed(0))
    bias = student[1].bias
    options = TuneOptions(steps=40, batch_size=2, lr=0.05, holdout=2)
    groups = [{"params": [student[1].weight, bias], "lr": options.lr}]
    for p in student.parameters():
        p.requires_grad_(p is student[1].weight or p is bias)
    record = tune_end_to_end(groups, student, teacher, windows, options, progress=False)
    assert record["held_out_kl_after"] < 0.5 * record["held_out_kl_before"]
    same = toy(0)
    kept = same[1].weight.detach().clone()
    groups = [{"params": [same[1].weight], "lr": options.lr}]
    record = tune_end_to_end(groups, same, toy(0), windows, options, progress=False)
    assert record["held_out_kl_after"] == record["held_out_kl_before"]  # nothing to gain
    assert torch.equal(same[1].weight, kept)
    with pytest.raises(LowbitError, match="at least 4 calibration windows"):
        tune_end_to_end(groups, same, toy(0), windows[:3], options, progress=False)


def test_a_run_that_ends_worse_on_the_held_out_windows_is_put_back(monkeypatch):
    import lowbit.algorithms.tune as tune

    teacher, student = toy(0), toy(1)
    kept = student[1].weight.detach().clone()
    scores = iter([1.0, 2.0])  # before, after: worse
    monkeypatch.setattr(tune, "_held_out", lambda *args: next(scores))
    windows = torch.randint(0, 16, (12, 10), generator=torch.Generator().manual_seed(0))
    groups = [{"params": [student[1].weight], "lr": 0.05}]
    options = TuneOptions(steps=5, batch_size=2, lr=0.05, holdout=2)
    record = tune_end_to_end(groups, student, teacher, windows, options, progress=False)
    assert record["held_out_kl_after"] == record["held_out_kl_before"] == 1.0
    assert torch.equal(student[1].weight, kept)  # it did move during training: put back
