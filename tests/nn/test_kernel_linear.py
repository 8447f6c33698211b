"""Kernel modules against the QuantLinear they replace (the reference of every format)."""

import pytest
import torch

from lowbit.formats import ActivationSpec, WeightSpec
from lowbit.kernels import affine
from lowbit.nn import AffineKernelLinear, Int8KernelLinear, QuantLinear, kernel_module
from lowbit.primitives import quantize_weight

COVERED = [
    WeightSpec(bits=4, group_size=64),
    WeightSpec(bits=4, group_size=32, zero_point="int"),
    WeightSpec(bits=4, symmetric=True, group_size=96),
    WeightSpec(bits=4, group_size=-1),
    WeightSpec(bits=8, symmetric=True, group_size=-1),
    WeightSpec(bits=8, group_size=64),
    WeightSpec(bits=4, granularity="tensor"),
]
NOT_COVERED = [
    WeightSpec(bits=3, group_size=32),
    WeightSpec(format="nf4", group_size=64),
    WeightSpec(format="fp8_e4m3", bits=8, group_size=-1),
    WeightSpec(bits=2, group_size=64),
]


def layer_of(spec, n=40, k=192, bias=True, act=None):
    w, b = torch.randn(n, k), torch.randn(n) if bias else None
    return QuantLinear.from_quantized(quantize_weight(w, spec), b, act=act)


@pytest.mark.parametrize("spec", COVERED, ids=lambda s: s.short())
@pytest.mark.parametrize("m", [1, 7, 64])
def test_covered_formats_match_quantlinear(spec, m):
    """Float inputs: QuantLinear's numbers. Decode-sized inputs (4- and 8-bit) take the act8
    path: its own reference exactly, and QuantLinear within the int8 input rounding."""
    layer = layer_of(spec)
    fast = kernel_module(layer)
    assert isinstance(fast, AffineKernelLinear)
    x = torch.randn(2, m, 192)
    ref, got = layer(x), fast(x)
    if 2 * m <= affine.GEMV_MAX_ROWS:
        aw = affine.AffineWeight(fast.w, fast.scale, fast.offset, fast.group, spec.bits, 192)
        act8 = affine.affine_linear_act8_reference(x, aw) + fast.bias
        assert torch.allclose(got, act8, rtol=1e-4, atol=1e-4 * act8.abs().max().item())
        assert (got - ref).norm() / ref.norm() < 1e-2
    else:
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("spec", NOT_COVERED, ids=lambda s: s.short())
def test_uncovered_formats_stay_on_the_reference(spec):
    assert kernel_module(layer_of(spec, k=128)) is None


def test_w4_kernel_module_holds_half_a_byte_per_weight():
    fast = kernel_module(layer_of(COVERED[0], n=64, k=576, bias=False))
    held = sum(t.numel() * t.element_size() for t in fast.buffers())
    assert fast.w.numel() == 64 * 576 // 2
    # codes + scale and offset, float16 as saved (exact: the kernel holds no wider copy)
    assert fast.scale.dtype == torch.float16
    assert held == 64 * 576 // 2 + 2 * 2 * 64 * (576 // 64)


def test_w8a8_layer_becomes_the_int8_kernel():
    act = ActivationSpec(bits=8, granularity="token", dynamic=True)
    layer = layer_of(WeightSpec(bits=8, symmetric=True, group_size=-1), act=act)
    fast = kernel_module(layer)
    assert isinstance(fast, Int8KernelLinear)
    x = torch.randn(3, 192)
    ref = layer(x)
    assert (fast(x) - ref).norm() / ref.norm() < 1e-3
    from lowbit.eval import model_size

    assert model_size(torch.nn.Sequential(fast)).total_bytes >= 40 * 192


@pytest.mark.parametrize(
    ("spec", "act"),
    [
        (WeightSpec(bits=4, group_size=32), ActivationSpec(bits=8)),
        (WeightSpec(bits=8, symmetric=True, group_size=-1), ActivationSpec(bits=4)),
        (WeightSpec(bits=8, symmetric=True, group_size=-1),
         ActivationSpec(granularity="tensor", dynamic=False)),
    ],
)  # fmt: skip
def test_other_activation_grids_keep_the_reference_path(spec, act):
    qw = quantize_weight(torch.randn(32, 64), spec)
    assert kernel_module(QuantLinear.from_quantized(qw, None, "l", act)) is None


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_16bit_float_layers_run_on_the_half_kernel_in_16_bits(fmt):
    from lowbit.nn import HalfKernelLinear

    layer = layer_of(WeightSpec(format=fmt, bits=16), n=24, k=100)
    fast = kernel_module(layer)
    assert isinstance(fast, HalfKernelLinear) and fast.kind == fmt
    assert fast.storage_bytes()["codes"] == 24 * 100 * 2
    for m in (1, 40):
        x = torch.randn(m, 100)
        ref = layer(x)
        assert torch.allclose(fast(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_the_kernel_weight_is_held_while_the_buffers_stay():
    from helpers import random_affine

    layer = AffineKernelLinear(random_affine(16, 64, 32, 4), 16, None)
    held = layer.affine_weight()
    assert layer.affine_weight() is held and held.w is layer.w
    layer.w = layer.w.clone()  # a buffer replaced (as .to() does): the weight follows
    assert layer.affine_weight() is not held and layer.affine_weight().w is layer.w
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), affine.affine_linear(x, layer.affine_weight()))
