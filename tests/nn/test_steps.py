"""Per-step activation ranges: which range a layer uses, and that every path (reference,
integer kernel) uses the one the sampler selected."""

import copy

import pytest
import torch
from torch import nn

from helpers import make_recipe
from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.errors import LowbitError
from lowbit.models import use_kernels
from lowbit.nn import QuantConv, select_step
from lowbit.nn.steps import step_group
from lowbit.primitives import QParams
from lowbit.primitives.activations import fake_quantize_static

W8 = {"bits": 8, "group_size": -1, "symmetric": True}
STEPS = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False,
         "step_groups": 3}  # fmt: skip


class Sampler(nn.Module):
    """A toy sampling loop: one convolution run at three timesteps, on inputs whose range grows
    with the timestep (as a diffusion model's early, noisy steps do)."""

    repeats_layers = True

    def __init__(self, timesteps=(900, 500, 100), select=True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.timesteps, self.select = timesteps, select

    def forward(self, x):
        for t in self.timesteps:
            if self.select:
                select_step(self, t / 1000)
            x = x + 0.1 * self.conv(x * (1 + t / 100))
        return x


def quantized(acts: dict, **sampler) -> nn.Module:
    model = Sampler(**sampler)
    images = image_calibration(torch.randn(4, 2, 6, 6), "noise")
    api.quantize(model, make_recipe(W8, acts, ignore=()), images, progress=False)
    return model


def test_the_group_is_the_slice_of_the_timestep_axis():
    assert [step_group(p, 4) for p in (0.0, 0.249, 0.25, 0.5, 0.999, 1.0)] == [0, 0, 1, 2, 3, 3]
    assert step_group(None, 1) == 0  # one range: no sampler needed
    with pytest.raises(LowbitError, match="select_step"):
        step_group(None, 2, "conv")
    with pytest.raises(LowbitError, match=r"in \[0, 1\]"):
        select_step(nn.Linear(2, 2), 1.5)


def test_each_slice_of_the_timesteps_gets_its_own_calibrated_range():
    model = quantized(STEPS)
    conv = model.conv
    assert isinstance(conv, QuantConv) and conv.act_scale.shape == (3,)
    lo, mid, hi = conv.act_scale.tolist()  # t = 100, 500, 900: inputs x(1 + t/100)
    assert lo < mid < hi and hi > 3 * lo
    one = quantized({**STEPS, "step_groups": 1}).conv.act_scale
    assert one.shape == (1,) and float(one) == pytest.approx(hi, rel=0.05)  # the widest
    x = torch.randn(1, 2, 6, 6)
    for position, group in ((0.1, 0), (0.5, 1), (0.9, 2)):
        select_step(model, position)
        zero = conv.act_zero[group : group + 1]
        want = fake_quantize_static(x, QParams(conv.act_scale[group : group + 1], zero), conv.act)
        torch.testing.assert_close(conv.quantize_input(x), want, rtol=0, atol=0)


def test_a_model_that_never_selects_a_step_or_misses_a_slice_is_an_error():
    with pytest.raises(LowbitError, match="select_step"):
        quantized(STEPS, select=False)
    with pytest.raises(LowbitError, match="step group 1 of conv saw no calibration data"):
        quantized(STEPS, timesteps=(100, 900))  # the middle third is never sampled
    with pytest.raises(LowbitError, match="dynamic: false"):
        make_recipe(W8, {**STEPS, "dynamic": True})
    with pytest.raises(LowbitError, match="step_groups"):
        make_recipe(W8, {**STEPS, "step_groups": 0})


def test_the_integer_kernel_uses_the_selected_range(suffix):
    model = quantized(STEPS)
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {f"w8a8-conv{suffix}": 1}
    x = torch.randn(2, 2, 6, 6) * 5
    with torch.inference_mode():
        for position in (0.1, 0.5, 0.9):
            select_step(model, position)
            select_step(fast, position)
            want, got = model.conv(x), fast.conv(x)
            assert (got - want).abs().max() < 1e-4 * want.abs().max()
    fast.conv.step_position = None  # as loaded, before the sampler selects a step
    with pytest.raises(LowbitError, match="select_step"):
        fast.conv(x)
