"""Weight-only integer convolutions on the affine kernel's layout: which layers the load-time
swap takes, and that they compute what the reference path computes."""

import copy

import pytest
import torch

from helpers import convnet, make_recipe
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.eval.size import model_size
from lowbit.models import use_kernels
from lowbit.nn import AffineKernelConv


def quantized(weights: dict) -> torch.nn.Module:
    model = convnet()  # a conv, a grouped conv, a transposed conv
    api.quantize(model, make_recipe(weights, ignore=()), progress=False)
    return model


@pytest.mark.parametrize("weights", [
    {"bits": 8, "group_size": -1, "symmetric": True},
    {"bits": 4, "group_size": -1},
    {"bits": 4, "group_size": -1, "symmetric": True, "zero_point": "int"},
])  # fmt: skip
def test_weight_only_convolutions_run_on_the_affine_layout_exactly(weights):
    model = quantized(weights)
    fast = copy.deepcopy(model)
    bits = weights["bits"]
    assert use_kernels(fast) == {f"w{bits}a16-conv": 3}
    assert all(isinstance(fast[i], AffineKernelConv) for i in (0, 2, 4))
    x = torch.rand(2, 3, 9, 11)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-6, atol=1e-6)
    assert model_size(fast).quantized_weights <= model_size(model).quantized_weights + 64
    with pytest.raises(LowbitError, match=r"expected \(N, 3, H, W\)"):
        fast(torch.rand(1, 4, 8, 8))


@pytest.mark.parametrize("weights", [
    {"bits": 3, "group_size": -1},  # no 3-bit kernel
    {"format": "nf4", "bits": 4, "group_size": -1},
])  # fmt: skip
def test_other_weight_formats_keep_the_reference_path(weights):
    fast = quantized(weights)
    assert use_kernels(fast) == {"reference": 3}


@pytest.mark.parametrize("bits", [8, 4])
def test_a_convolution_with_few_outputs_for_its_weight_takes_the_im2col_gemm(bits):
    """Few output positions per weight: im2col rows through the affine GEMM (the codes read
    once); many: the dequantized weight into torch's convolution. Both equal the reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 256, 3, stride=2, padding=2, dilation=2))
    model.quantized_whole = True
    api.quantize(model, make_recipe({"bits": bits, "group_size": 32}, ignore=()), progress=False)
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {f"w{bits}a16-conv": 1}
    small, large = torch.rand(2, 32, 9, 9), torch.rand(2, 32, 24, 24)  # 2x25 / 2x144 outputs
    assert fast[0].weight_bound(small) and not fast[0].weight_bound(large)
    with torch.inference_mode():
        for x in (small, large):
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_dequantize_path_runs_channels_last():
    """The dequantize + conv path gives torch's convolution a channels-last input (oneDNN's
    faster layout for it), a plain one and a transposed one held as columns alike."""
    fast = quantized({"bits": 8, "group_size": -1, "symmetric": True})
    use_kernels(fast)
    x = torch.rand(1, 3, 16, 16)
    channels_last = torch.channels_last
    with torch.inference_mode():
        assert not fast[0].weight_bound(x)
        assert fast[0](x).is_contiguous(memory_format=channels_last)
        y = torch.rand(1, 32, 8, 8)  # into the transposed layer, NCHW
        assert fast[4].columns and not fast[4].weight_bound(y)
        out = fast[4](y)
    assert fast[4].geometry.transposed and out.is_contiguous(memory_format=channels_last)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("geometry", [
    {"kernel_size": 4, "stride": 2, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
    {"kernel_size": 4, "stride": 1, "padding": 0},
    {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
])  # fmt: skip
def test_a_transposed_convolution_with_few_inputs_takes_one_gemm_and_an_overlap_add(bits, geometry):
    """A per-channel transposed convolution holds its codes as its (out·kh·kw, in) column
    matrix: few input pixels (a generator's first layers) take one GEMM and F.fold (one pixel:
    the GEMM's patch itself, cropped), many the dequantized weight into torch's transposed
    convolution. All equal the reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(256, 128, **geometry))
    model.quantized_whole = True
    api.quantize(model, make_recipe({"bits": bits, "group_size": -1}, ignore=()), progress=False)
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {f"w{bits}a16-conv": 1}
    assert fast[0].columns
    small, large = torch.rand(1, 256, 2, 3), torch.rand(2, 256, 12, 12)  # 6 / 288 pixels
    latent = torch.rand(3, 256, 1, 1)  # one pixel each: the patch is the output (no F.fold)
    assert fast[0].weight_bound(small) and not fast[0].weight_bound(large)
    assert fast[0].weight_bound(latent)
    with torch.inference_mode():
        for x in (latent, small, large):
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert model_size(fast).quantized_weights <= model_size(model).quantized_weights + 64


def test_a_transposed_convolution_in_groups_along_its_rows_keeps_the_row_layout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1))
    model.quantized_whole = True
    api.quantize(model, make_recipe({"bits": 4, "group_size": 32}, ignore=()), progress=False)
    fast = copy.deepcopy(model)
    assert use_kernels(fast) == {"w4a16-conv": 1}
    x = torch.rand(1, 64, 3, 3)
    assert not fast[0].columns and not fast[0].weight_bound(x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_columns_of_a_width_not_a_whole_run_are_padded_on_both_paths(bits):
    """A DCGAN's first layer reads a 100-d latent: columns of 100 codes, padded to 128."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(100, 512, 4, stride=1, padding=0))
    model.quantized_whole = True
    api.quantize(model, make_recipe({"bits": bits, "group_size": -1}, ignore=()), progress=False)
    fast = copy.deepcopy(model)
    use_kernels(fast)
    small, large = torch.rand(3, 100, 1, 1), torch.rand(2, 100, 12, 12)
    assert fast[0].columns and fast[0].weight_bound(small) and not fast[0].weight_bound(large)
    with torch.inference_mode():
        for x in (small, large):
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}


def static_inputs(weights: dict, acts: dict) -> torch.nn.Module:
    from lowbit.calibration import image_calibration

    model = convnet()
    images = image_calibration(torch.rand(4, 3, 10, 10), "noise")
    api.quantize(model, make_recipe(weights, acts, ignore=()), images, progress=False)
    return model


@pytest.mark.parametrize("acts", [STATIC, {**STATIC, "symmetric": True}])
@pytest.mark.parametrize("bits", [8, 4])
def test_convolutions_with_one_static_input_range_round_it_as_the_reference_does(acts, bits):
    """Where the integer convolution does not take a layer (a CPU without VNNI; or 4-bit
    weights), the affine module rounds its input to the calibrated 8-bit range itself."""
    from lowbit.nn.kernel_conv import affine_conv_module

    model = static_inputs({"bits": bits, "group_size": -1, "symmetric": True}, acts)
    x = torch.rand(2, 3, 9, 11) * 1.5  # beyond the calibrated range too: clipped alike
    with torch.inference_mode():
        ref = model(x)
        for i in (0, 2, 4):
            fast = affine_conv_module(model[i])
            assert fast is not None and fast.kind == f"w{bits}a8-float-conv"
            model[i] = fast
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_per_step_input_ranges_and_dynamic_inputs_keep_the_reference_path():
    from lowbit.nn.kernel_conv import affine_conv_module

    w8 = {"bits": 8, "group_size": -1, "symmetric": True}
    dynamic = static_inputs(w8, {**STATIC, "dynamic": True})
    assert affine_conv_module(dynamic[0]) is None
    stepped = static_inputs(w8, STATIC)
    stepped[0].act_scale = torch.ones(2)  # two ranges, one per slice of a sampler's steps
    assert affine_conv_module(stepped[0]) is None
