"""W8A8 convolutions: the one-pass activation codes, the transposed convolution as phases (on
every CPU, through a float convolution), and oneDNN's integer convolution against the
reference (only where it runs: VNNI, AVX-512's or AVX-VNNI)."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats.spec import ActivationSpec
from lowbit.kernels import int8_conv as int8_conv_module
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8_conv import (
    extra_inputs,
    input_codes,
    int8_conv,
    interleave,
    onednn_int8_available,
    prepare_int8_conv,
    rounded_input,
    transposed_as_phases,
)
from lowbit.primitives import QParams
from lowbit.primitives.activations import act_codes, fake_quantize_static, tensor_qparams

needs_onednn = pytest.mark.skipif(
    not onednn_int8_available(), reason="oneDNN's int8 convolution is exact with VNNI only"
)
ASYM = ActivationSpec(bits=8, granularity="tensor", dynamic=False, symmetric=False)
SYM = ActivationSpec(bits=8, granularity="tensor", dynamic=True, symmetric=True)

# (in, out, kernel, stride, padding, output_padding): waifu2x's and the DCGAN's transposed
# layers, a kernel the stride does not divide, an output padding larger than the padding
TRANSPOSED = [(8, 3, 4, 2, 3, 0), (6, 5, 4, 2, 1, 0), (4, 6, 4, 1, 0, 0), (5, 4, 3, 2, 1, 1),
              (3, 2, 5, 3, 0, 2), (4, 4, 3, 2, 0, 1)]  # fmt: skip


@pytest.mark.skipif(not native_ops(), reason="lowbit's C++ kernels are not built on this machine")
@pytest.mark.parametrize("spec", [ASYM, SYM])
def test_one_pass_codes_equal_the_reference(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 7) * 3
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -0.5, 2.5])  # ties round to even, as torch.round
    static = QParams(torch.tensor([1.0]), torch.tensor([100], dtype=torch.uint8))
    qp = tensor_qparams(x, spec, None if spec.dynamic else static)
    for layout in (torch.contiguous_format, torch.channels_last):  # clamped at both ends too
        xl = x.contiguous(memory_format=layout)
        got = input_codes(xl, qp, spec)
        assert got.dtype == torch.uint8 and got.stride() == xl.stride()
        assert torch.equal(got, act_codes(xl, qp, spec))
    assert {0, 255} <= set(input_codes(x * 100, qp, spec).unique().tolist())


@pytest.mark.skipif(not native_ops(), reason="lowbit's C++ kernels are not built on this machine")
@pytest.mark.parametrize("spec", [ASYM, SYM])
def test_one_pass_rounded_inputs_equal_the_reference_to_the_bit(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 7) * 3
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -0.5, 2.5])  # ties round to even
    x[1, 1, 1, :3] = torch.tensor([1e6, -1e6, 0.0])  # clamped at both ends
    static = QParams(torch.tensor([0.37]), torch.tensor([100], dtype=torch.uint8))
    qp = tensor_qparams(x, spec, None if spec.dynamic else static)
    want = fake_quantize_static(x, qp, spec)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        got = rounded_input(xl, qp, spec)
        assert got.dtype == torch.float32 and got.stride() == xl.stride()
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", TRANSPOSED)
@pytest.mark.parametrize("size", [(5, 7), (3, 4)])
def test_a_transposed_convolution_is_its_phases(case, size):
    """The rearranged kernels, run as one stride-1 convolution, then interleaved and cropped,
    compute the transposed convolution (float arithmetic: no oneDNN needed)."""
    cin, cout, k, s, p, op = case
    torch.manual_seed(1)
    w, b = torch.randn(cin, cout, k, k), torch.randn(cout)
    x = torch.randn(2, cin, *size)
    want = F.conv_transpose2d(x, w, b, s, p, op)
    phased, scale, bias, phases = transposed_as_phases(w, torch.ones(cout), b, (s, s), (p, p),
                                                       (op, op))  # fmt: skip
    assert torch.equal(scale, torch.ones(cout * s * s))
    more = extra_inputs(phases, x.shape)
    xp = F.pad(x, (0, more[1], 0, more[0]))
    j = phased.shape[-1]
    got = interleave(F.conv2d(xp, phased, bias, padding=j - 1), x.shape, phases)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _reference(x, codes, scale, bias, qp, transposed, **geometry):
    """The arithmetic QuantConv's reference path computes: dequantized codes, float conv."""
    xq = (act_codes(x, qp, ASYM).float() - qp.zero.float()) * qp.scale
    shape = (-1, 1, 1, 1) if not transposed else (1, -1, 1, 1)
    w = codes.float() * scale.reshape(shape)
    if transposed:
        return F.conv_transpose2d(xq, w, bias, **geometry)
    return F.conv2d(xq, w, bias, **geometry)


@needs_onednn
@pytest.mark.parametrize("case", TRANSPOSED)
def test_onednn_transposed_convolution_matches_the_reference(case):
    cin, cout, k, s, p, op = case
    torch.manual_seed(2)
    codes = torch.randint(-127, 128, (cin, cout, k, k), dtype=torch.int8)
    scale, bias = torch.rand(cout) / 100 + 1e-3, torch.randn(cout)
    x = torch.randn(3, cin, 6, 5)
    qp = tensor_qparams(x, ASYM, None)
    weight = prepare_int8_conv(codes, scale, bias, (s, s), (p, p), (1, 1), 1, True, (op, op))
    want = _reference(x, codes, scale, bias, qp, True, stride=s, padding=p, output_padding=op)
    torch.testing.assert_close(int8_conv(x, qp, ASYM, weight), want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1, dilation=1, groups=1),
                                      dict(stride=2, padding=0, dilation=2, groups=2)])  # fmt: skip
def test_onednn_convolution_matches_the_reference(geometry):
    torch.manual_seed(3)
    codes = torch.randint(-127, 128, (8, 6 // geometry["groups"], 3, 3), dtype=torch.int8)
    scale, bias = torch.rand(8) / 100 + 1e-3, torch.randn(8)
    x = torch.randn(2, 6, 11, 9).contiguous(memory_format=torch.channels_last)
    qp = tensor_qparams(x, ASYM, None)
    g = geometry
    weight = prepare_int8_conv(codes, scale, bias, (g["stride"],) * 2, (g["padding"],) * 2,
                               (g["dilation"],) * 2, g["groups"])  # fmt: skip
    want = _reference(x, codes, scale, bias, qp, False, **geometry)
    torch.testing.assert_close(int8_conv(x, qp, ASYM, weight), want, rtol=1e-5, atol=1e-5)


# geometries oneDNN (torch 2.13) got wrong or crashed on, found by fuzzing: (in, out, kernel,
# stride, padding, dilation, groups, input size, zero point) — an output of one pixel along a
# stride-2 axis, padding as wide as the kernel (with groups, channels-last), and a dilated
# axis of one tap (a segfault)
ODD = [(1, 4, 3, (1, 2), (2, 0), (1, 1), 1, (8, 4), 128),
       (8, 16, 3, (1, 2), (1, 0), (1, 1), 8, (13, 4), 210),
       (8, 16, 3, (2, 2), (3, 2), (1, 1), 8, (13, 11), 255),
       (16, 16, 1, (1, 1), (1, 0), (1, 1), 16, (3, 2), 255),
       (2, 1, 1, (2, 2), (1, 1), (2, 2), 1, (8, 1), 128)]  # fmt: skip


@needs_onednn
@pytest.mark.parametrize("case", ODD)
def test_geometries_onednn_gets_wrong_take_another_path(case):
    cin, cout, k, stride, padding, dilation, groups, (h, w), zero = case
    torch.manual_seed(4)
    codes = torch.randint(-127, 128, (cout, cin // groups, k, k), dtype=torch.int8)
    scale, bias = torch.rand(cout) / 100 + 1e-3, torch.randn(cout)
    x = torch.randn(2, cin, h, w).contiguous(memory_format=torch.channels_last)
    qp = QParams(torch.tensor([0.03]), torch.tensor([zero], dtype=torch.uint8))
    weight = prepare_int8_conv(codes, scale, bias, stride, padding, dilation, groups)
    # the exact sums in float64 (torch's float32 convolution also crashed on the last case)
    u = act_codes(x, qp, ASYM).double() - zero
    sums = F.conv2d(u, codes.double(), None, stride, padding, dilation, groups)
    want = sums * scale.double().reshape(1, -1, 1, 1) * 0.03 + bias.double().reshape(1, -1, 1, 1)
    torch.testing.assert_close(int8_conv(x, qp, ASYM, weight), want.float(), rtol=1e-5, atol=1e-5)


def test_no_vnni_no_integer_convolution(monkeypatch):
    monkeypatch.setattr(int8_conv_module, "has_vnni", lambda: False)
    assert not onednn_int8_available.__wrapped__()
