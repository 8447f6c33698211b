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
from lowbit.nn import Int8TensorKernel, QuantConv, QuantLinear, kernel_tensor
from lowbit.nn.fused import FusedSequential
from lowbit.nn.kernel_tensor import tensor_eligible, tensor_kernel_module

W8 = {"bits": 8, "group_size": -1, "symmetric": True}
STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}


def quantized(weights: dict, acts: dict | None, model: nn.Module | None = None,
              channels: int = 3) -> nn.Module:  # fmt: skip
    model = convnet() if model is None else model
    model.quantized_whole = True
    images = image_calibration(torch.rand(4, channels, 10, 10), "noise")
    api.quantize(model, make_recipe(weights, acts, ignore=()), images, progress=False)
    return model


def swap_matches(model: nn.Module, counts: dict, x: torch.Tensor) -> None:
    """``use_kernels`` on a copy swaps ``counts``, and the copy computes what the model does."""
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == counts
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("acts", [STATIC, {**STATIC, "dynamic": True, "symmetric": True}])
def test_w8a8_convolutions_take_the_integer_path(acts, suffix):
    model = quantized(W8, acts)
    fast = copy.deepcopy(model)
    counts = use_kernels(fast)  # a plain, a grouped, a transposed convolution
    # lowbit's kernel runs the LeakyReLUs after the first two in its epilogue
    fused = {"fused activations": 2} if suffix else {}
    assert counts == {f"w8a8-conv{suffix}": 3, **fused}
    assert all(isinstance(fast[i], Int8TensorKernel) for i in (0, 2, 4))
    x = torch.rand(2, 3, 10, 12)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    # each layer's sums are exact: the float32 order of the sums can flip a rounded code
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert model_size(fast).quantized_weights == model_size(model).quantized_weights
    with pytest.raises(LowbitError, match=r"expected \(N, 3, H, W\)"):
        fast(torch.rand(1, 4, 8, 8))


def test_layers_with_too_many_inputs_keep_the_float_path(suffix, monkeypatch):
    """lowbit's AVX2 kernel keeps its int32 sums exact up to PANEL_MAX_INPUTS inputs per output
    (the op refuses more): a wider layer takes the weight-only module's float path instead of
    failing mid-run. Checked with the limit lowered between the grouped layer's 72 inputs and
    the transposed one's 512."""
    if not suffix:
        pytest.skip("oneDNN's kernel has no such limit here")
    monkeypatch.setattr(kernel_tensor, "PANEL_MAX_INPUTS", 100)
    counts = {"w8a8-float-conv": 1, "w8a8-conv-avx2": 2, "fused activations": 2}
    swap_matches(quantized(W8, STATIC), counts, torch.rand(2, 3, 10, 12))


@pytest.mark.parametrize("dynamic", [False, True])
def test_without_vnni_a_depthwise_convolution_keeps_the_float_path(suffix, dynamic):
    """A panel holds 8 outputs: a layer with fewer per group would compute 8x its products on
    lowbit's AVX2 kernel, so there it keeps the weight-only module's float path (its static
    input rounded as the reference rounds it), or with dynamic inputs the reference path."""
    if not suffix:
        pytest.skip("oneDNN's kernel takes depthwise layers")
    torch.manual_seed(0)
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 16, 3, padding=1, groups=4)).eval()  # fmt: skip
    acts = {**STATIC, "dynamic": True, "symmetric": True} if dynamic else STATIC
    model = quantized(W8, acts, depthwise)
    fast = copy.deepcopy(model)
    other = "reference" if dynamic else "w8a8-float-conv"
    assert use_kernels(fast) == {"w8a8-conv-avx2": 1, other: 1, "fused activations": 1}
    x = torch.rand(2, 3, 9, 7)
    with torch.inference_mode():
        want, got = model(x), fast(x)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_without_vnni_layers_with_few_inputs_keep_the_float_path(suffix, monkeypatch):
    """With a static range, a convolution with fewer than PANEL_MIN_INPUTS inputs per output
    (the phases' for a transposed one: 32 x 2 x 2 = 128 here) runs on the weight-only module's
    float path, as fast or faster there; with dynamic ranges, which that path does not take, on
    the kernel."""
    if not suffix:
        pytest.skip("oneDNN's kernel takes every layer")
    monkeypatch.setattr(kernel_tensor, "PANEL_MIN_INPUTS", 128)  # the real limit: 256
    model = quantized(W8, STATIC)  # 27, 72 and 128 inputs per output
    assert use_kernels(copy.deepcopy(model)) == {"w8a8-float-conv": 2, "w8a8-conv-avx2": 1}
    dynamic = quantized(W8, {**STATIC, "dynamic": True, "symmetric": True})
    assert use_kernels(dynamic) == {"w8a8-conv-avx2": 3, "fused activations": 2}
    monkeypatch.setattr(kernel_tensor, "PANEL_MIN_INPUTS", 256)
    assert use_kernels(model) == {"w8a8-float-conv": 3}


def test_activations_after_the_avx2_kernel_run_in_its_epilogue(suffix):
    """A ReLU or LeakyReLU (slope 0 to 1) right after a layer on lowbit's AVX2 kernel, in an
    nn.Sequential, runs in the kernel's epilogue; any other activation stays a module."""
    if not suffix:
        pytest.skip("oneDNN's path fuses nothing")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Identity(), nn.ReLU(),  # past it
                        nn.Conv2d(16, 16, 3, padding=1), nn.LeakyReLU(2.0),  # slope > 1: kept
                        nn.Conv2d(16, 8, 3, padding=1), nn.GELU()).eval()  # fmt: skip
    model = quantized(W8, STATIC, net)
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {"w8a8-conv-avx2": 4, "fused activations": 2}
    assert isinstance(fast, FusedSequential)  # its modules and names as they were
    assert [type(fast[i]) for i in (1, 3, 4, 6, 8)] == [nn.LeakyReLU, nn.Identity, nn.ReLU,
                                                        nn.LeakyReLU, nn.GELU]  # fmt: skip
    x = torch.rand(2, 3, 9, 11)
    with torch.inference_mode():
        want, got = model(x), fast(x)
        assert (got - want).abs().max() < 0.02 * want.abs().max()
        one_by_one = x
        for layer in fast:
            one_by_one = layer(one_by_one)
        assert torch.allclose(one_by_one, got, rtol=1e-6, atol=1e-6 * got.abs().max().item())
        # a slice that ends before an activation gives the layer's own output (on the AVX2
        # kernel it gave the activation's: the module had been replaced by an Identity)
        before, ref = fast[:3](x), model[:3](x)
        assert before.min() < 0 and (before - ref).abs().max() < 0.02 * ref.abs().max()


def test_a_transposed_layer_on_the_kernel_feeds_one_on_the_float_path(suffix, monkeypatch):
    """A transposed convolution's output is a cropped view of its phases; a transposed layer
    on the weight-only float path (fewer inputs per output than PANEL_MIN_INPUTS, lowered here
    between the two layers' 128 and 32) reads it as any input."""
    if not suffix:
        pytest.skip("oneDNN's kernel takes both layers")
    monkeypatch.setattr(kernel_tensor, "PANEL_MIN_INPUTS", 64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)).eval()  # fmt: skip
    counts = {"w8a8-conv-avx2": 1, "w8a8-float-conv": 1, "fused activations": 1}
    swap_matches(quantized(W8, STATIC, net, channels=32), counts, torch.rand(2, 32, 5, 6))


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
