"""lowbit's AVX2 W8A8 convolution (csrc/int8_conv.cpp): exact integer sums on full-range codes,
so its outputs are the int64 arithmetic's up to the float32 epilogue, for every geometry."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8_conv_avx2 import (
    panel_conv,
    panel_linear,
    prepare_panel_conv,
    prepare_panel_linear,
)
from lowbit.primitives import QParams
from lowbit.primitives.activations import act_codes

pytestmark = pytest.mark.skipif(not native_ops(), reason="lowbit's C++ kernels are not built")
ASYM = ActivationSpec(bits=8, granularity="tensor", dynamic=False, symmetric=False)


def _qp(scale: float, zero: int) -> QParams:
    return QParams(torch.tensor([scale]), torch.tensor([zero], dtype=torch.uint8))


def _exact(x, qp, codes, scale, bias, transposed=False, **geometry):
    """The integer sums in float64 (exact below 2^53), then scales and bias."""
    u = act_codes(x, qp, ASYM).double() - float(qp.zero)
    conv = F.conv_transpose2d if transposed else F.conv2d
    sums = conv(u, codes.double(), **geometry)
    y = sums * scale.double().reshape(1, -1, 1, 1) * float(qp.scale)
    return y + bias.double().reshape(1, -1, 1, 1)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "padding", "dilation", "groups"),
    [(3, 16, 3, 1, 0, 1, 1),  # the first layer of an image model: 27 inputs per output
     (32, 13, 3, 1, 1, 1, 1),  # a last panel of 5 real columns
     (17, 40, 3, 2, 1, 1, 1),
     (8, 24, 5, 2, 3, 2, 1),  # dilated, padded wider than the taps reach
     (5, 7, 1, 1, 0, 1, 1),
     (16, 32, 3, 1, 1, 1, 2),  # two groups of 16 outputs
     (12, 36, 3, 2, 1, 1, 3)],  # three groups of 12: each group's last panel 4 columns short
)  # fmt: skip
@pytest.mark.parametrize("zero", [0, 128, 255])
def test_convolution_equals_the_exact_sums(cin, cout, k, stride, padding, dilation, groups, zero):
    g = torch.Generator().manual_seed(cin * cout + zero)
    # the worst case for a saturating product: codes at both ends of the grid
    codes = torch.randint(-128, 128, (cout, cin // groups, k, k), generator=g, dtype=torch.int8)
    codes[0] = -128
    codes[1:2] = 127
    scale, bias = torch.rand(cout, generator=g) / 50 + 1e-3, torch.randn(cout, generator=g)
    x = torch.randn(2, cin, 13, 11, generator=g) * 3
    x[0, :, :4] = 1e3  # inputs clipped to code 255 and to 0
    x[1, :, :4] = -1e3
    qp = _qp(0.03, zero)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    weight = prepare_panel_conv(codes, scale, bias, (stride,) * 2, (padding,) * 2, (dilation,) * 2,
                                groups=groups)  # fmt: skip
    got = panel_conv(x, qp, ASYM, weight)
    want = _exact(x, qp, codes, scale, bias, **geometry)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("cin", "cout", "k", "s", "p", "op"),
                         [(24, 3, 4, 2, 3, 0), (8, 6, 3, 2, 1, 1), (4, 5, 4, 2, 1, 0)])  # fmt: skip
def test_transposed_convolution_equals_the_exact_sums(cin, cout, k, s, p, op):
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-128, 128, (cin, cout, k, k), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(cout, generator=g) / 50 + 1e-3, torch.randn(cout, generator=g)
    x = torch.randn(3, cin, 6, 5, generator=g)
    qp = _qp(0.02, 90)
    weight = prepare_panel_conv(codes, scale, bias, (s, s), (p, p), (1, 1), True, (op, op))
    want = _exact(x, qp, codes, scale, bias, True, stride=s, padding=p, output_padding=op)
    torch.testing.assert_close(panel_conv(x, qp, ASYM, weight).double(), want, rtol=1e-6,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("lead", [(5, 7), (2,)])  # rows enough to widen the panels, and few
def test_a_linear_is_a_one_by_one_convolution(lead):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-128, 128, (45, 300), generator=g, dtype=torch.int8)
    scale = torch.rand(45, generator=g) / 50
    x = torch.randn(*lead, 300, generator=g)
    qp = _qp(0.02, 128)
    got = panel_linear(x, qp, ASYM, prepare_panel_linear(codes, scale, None))
    u = act_codes(x, qp, ASYM).double() - 128
    want = (u @ codes.double().T) * scale.double() * 0.02
    assert got.shape == (*lead, 45)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.0])
def test_a_fused_leaky_relu_equals_the_activation_after(slope):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-128, 128, (24, 8, 3, 3), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(24, generator=g) / 50, torch.randn(24, generator=g)
    weight = prepare_panel_conv(codes, scale, bias, (1, 1), (1, 1), (1, 1))
    x = torch.randn(2, 8, 7, 9, generator=g)
    plain = panel_conv(x, _qp(0.02, 128), ASYM, weight)
    assert plain.min() < 0
    fused = panel_conv(x, _qp(0.02, 128), ASYM, weight, slope)
    assert torch.equal(fused, torch.where(plain > 0, plain, plain * slope))


def test_bad_calls_get_clear_errors():
    codes = torch.randint(-128, 128, (8, 4, 3, 3), dtype=torch.int8)
    weight = prepare_panel_conv(codes, torch.ones(8), None, (1, 1), (0, 0), (1, 1))
    u = torch.zeros(1, 5, 6, 6, dtype=torch.uint8)  # 5 channels against a 4-channel kernel
    args = (weight.panels, weight.scale, weight.sums, None)
    geometry = ([3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="do not fit together"):
        torch.ops.lowbit_cpu.int8_conv_panels(u, *geometry, 1, 0, 1.0, *args)
    with pytest.raises(RuntimeError, match="divide into the groups"):
        torch.ops.lowbit_cpu.int8_conv_panels(u, *geometry, 2, 0, 1.0, *args)
    with pytest.raises(RuntimeError, match="slope outside"):
        torch.ops.lowbit_cpu.int8_conv_panels(u[:, :4], *geometry, 1, 0, 1.0, *args, 1.5)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        panel_conv(torch.zeros(1, 4, 2, 2), _qp(1.0, 0), ASYM, weight)
