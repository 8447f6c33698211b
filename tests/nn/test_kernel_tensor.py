"""The load-time swap of W8A8 layers with per-tensor activations to an integer convolution and
linear (oneDNN's on VNNI CPUs, lowbit's AVX2 kernel elsewhere, both run here where they can):
which layers it takes, and that a swapped model computes what its reference path computes."""

import copy

import pytest
import torch
from torch import nn

from helpers import convnet, make_recipe
from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.errors import LowbitError
from lowbit.eval.size import model_size
from lowbit.models import use_kernels
from lowbit.nn import Int8TensorKernel, QuantConv, QuantLinear
from lowbit.nn.kernel_tensor import tensor_eligible, tensor_kernel_module

W8 = {"bits": 8, "group_size": -1, "symmetric": True}
STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}


def quantized(weights: dict, acts: dict | None) -> nn.Module:
    model = convnet()
    images = image_calibration(torch.rand(4, 3, 10, 10), "noise")
    api.quantize(model, make_recipe(weights, acts, ignore=()), images, progress=False)
    return model


@pytest.mark.parametrize("acts", [STATIC, {**STATIC, "dynamic": True, "symmetric": True}])
def test_w8a8_convolutions_take_the_integer_path(acts, suffix):
    model = quantized(W8, acts)
    fast = copy.deepcopy(model)
    counts = use_kernels(fast)
    if suffix:  # lowbit's AVX2 kernel takes one group only: the grouped convolution (the
        # second) runs on the weight-only module with its static input range rounded as the
        # reference rounds it, or (dynamic ranges) on the reference path
        grouped = "reference" if acts["dynamic"] else "w8a8-float-conv"
        assert counts == {"w8a8-conv-avx2": 2, grouped: 1}
    else:
        assert counts == {"w8a8-conv": 3}
    assert all(isinstance(fast[i], Int8TensorKernel) for i in ((0, 4) if suffix else (0, 2, 4)))
    x = torch.rand(2, 3, 10, 12)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    # each layer's sums are exact: the float32 order of the sums can flip a rounded code
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert model_size(fast).quantized_weights == model_size(model).quantized_weights
    with pytest.raises(LowbitError, match=r"expected \(N, 3, H, W\)"):
        fast(torch.rand(1, 4, 8, 8))


@pytest.mark.parametrize(
    ("weights", "acts"),
    [({"bits": 4, "group_size": -1, "symmetric": True}, STATIC),  # 4-bit weights
     ({**W8, "symmetric": False}, STATIC),  # an asymmetric weight grid
     (W8, {**STATIC, "bits": 4}),  # 4-bit activations
     (W8, None)],  # weight-only
)  # fmt: skip
def test_other_formats_keep_the_reference_path(weights, acts):
    model = quantized(weights, acts)
    assert not any(tensor_eligible(m) for m in model if isinstance(m, QuantConv))
    assert all(tensor_kernel_module(m) is None for m in model if isinstance(m, QuantConv))


def test_linears_with_per_tensor_inputs_take_the_integer_path_too(suffix):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8)).eval()
    model.quantized_whole = True
    images = image_calibration(torch.randn(6, 2, 5, 24), "rows as a (N, C, H, W) batch")
    api.quantize(model, make_recipe(W8, STATIC, ignore=()), images, progress=False)
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {f"w8a8-linear-tensor{suffix}": 2}
    x = torch.randn(3, 2, 7, 24)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    with pytest.raises(LowbitError, match=r"expected \(\.\.\., 24\)"):
        fast(torch.randn(2, 25))
