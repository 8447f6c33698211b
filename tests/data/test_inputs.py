"""ModelInputs: the tensors of a multi-input forward, split and sliced as calibration batches."""

import pytest
import torch
from torch import nn

from lowbit.calibration import input_calibration
from lowbit.data import ModelInputs
from lowbit.errors import LowbitError
from lowbit.models.modules import forward_logits


def inputs(n: int = 5) -> ModelInputs:
    return ModelInputs((torch.arange(n * 6.0).reshape(n, 2, 3),), {"t": torch.arange(n)})


def test_split_and_slices_keep_samples_together():
    x = inputs()
    assert len(x) == 5
    parts = x.split(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert torch.equal(parts[1].kwargs["t"], torch.tensor([2, 3]))
    assert torch.equal(parts[2].args[0], x.args[0][4:])
    assert torch.equal(x[1:3].args[0], x.args[0][1:3])
    with pytest.raises(TypeError, match="sliced"):
        x[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "at least one tensor"),
        ((torch.zeros(3, 2), torch.zeros(4)), {}, "different numbers of samples"),
        ((torch.zeros(3, 2),), {"t": torch.tensor(7)}, "t: expected a tensor with the samples"),
        ((torch.zeros(3, 2), 5), {}, r"args\[1\]: expected a tensor.*got int"),
    ],
)
def test_bad_inputs_are_one_line_errors(args, kwargs, message):
    with pytest.raises(LowbitError, match=message):
        ModelInputs(args, kwargs)


def test_digest_changes_with_any_value_or_name():
    a, b = inputs(), inputs()
    assert a.sha256() == b.sha256()
    changed = ModelInputs(a.args, {"t": a.kwargs["t"] + 1})
    renamed = ModelInputs(a.args, {"s": a.kwargs["t"]})
    assert len({a.sha256(), changed.sha256(), renamed.sha256()}) == 3


def test_calibration_describes_the_inputs():
    calib = input_calibration(inputs(), "noise")
    desc = calib.describe()
    assert desc["samples"] == 5 and desc["inputs"] == {"args[0]": [2, 3], "t": []}
    assert desc["inputs_sha256"] == inputs().sha256()
    with pytest.raises(LowbitError, match="ModelInputs"):
        input_calibration(torch.zeros(2, 3), "x")


class _Conditional(nn.Module):
    def forward(self, x, t, scale=None):
        return (x * t[:, None, None] * (1 if scale is None else scale), "extra")


def test_forward_logits_calls_with_every_input_and_takes_the_main_output():
    x = inputs(2)
    out = forward_logits(_Conditional(), ModelInputs(x.args, {"t": x.kwargs["t"].float()}))
    assert torch.equal(out, x.args[0] * x.kwargs["t"][:, None, None])


def test_mixed_positions_run_one_call_each_in_sample_order_and_leave_no_step_set():
    x = torch.arange(6.0)[:, None]
    inputs = ModelInputs((x,), positions=torch.tensor([0.9, 0.1, 0.9, 0.1, 0.5, 0.9]))
    batches = input_calibration(inputs, "steps").windows.split(4)  # the order given
    assert [len(b) for b in batches] == [4, 2]
    assert torch.cat([b.positions for b in batches]).tolist() == pytest.approx(
        [0.9, 0.1, 0.9, 0.1, 0.5, 0.9]
    )

    class Stepped(nn.Module):
        step_position = None
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x * 0 + self.step_position

    model = Stepped()
    out = forward_logits(model, inputs)
    assert out.flatten().tolist() == pytest.approx(inputs.positions.tolist())
    assert model.calls == 3 and model.step_position is None  # reset after the call
    with pytest.raises(LowbitError, match=r"\[0, 1\]"):
        ModelInputs((x,), positions=torch.full((6,), 2.0))
    with pytest.raises(LowbitError, match="one per sample"):
        ModelInputs((x,), positions=torch.zeros(5))
