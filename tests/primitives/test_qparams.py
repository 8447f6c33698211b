import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.primitives import quantize_weight, sqnr_db


def gaussian(rows=64, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [-1, 64])
def test_int_sqnr_grows_about_6db_per_bit(bits, symmetric, group):
    w = gaussian()
    spec = WeightSpec(bits=bits, symmetric=symmetric, group_size=group)
    got = sqnr_db(w, quantize_weight(w, spec).dequantize())
    # uniform quantization of a Gaussian with min-max ranges: ~6.02 dB/bit minus a crest-factor
    # loss of ~8-11 dB; a lower bound 6·bits - 12 catches broken grids without being brittle
    assert got > 6.0 * bits - 12.0


@pytest.mark.parametrize(
    ("fmt", "bits", "floor_db"), [("nf4", 4, 18.0), ("fp8_e4m3", 8, 28.0), ("fp8_e5m2", 8, 22.0)]
)
def test_float_like_formats_sqnr(fmt, bits, floor_db):
    w = gaussian()
    spec = WeightSpec(format=fmt, bits=bits, group_size=64)
    assert sqnr_db(w, quantize_weight(w, spec).dequantize()) > floor_db


def test_more_bits_never_worse():
    w = gaussian()
    errs = [
        sqnr_db(w, quantize_weight(w, WeightSpec(bits=b, group_size=32)).dequantize())
        for b in range(2, 9)
    ]
    assert errs == sorted(errs)


def test_requantizing_a_dequantized_weight_is_exact():
    """Min-max grids are idempotent: the dequantized extremes land on codes 0 and max again."""
    w = gaussian()
    for spec in (
        WeightSpec(bits=4, group_size=32),
        WeightSpec(bits=3, symmetric=True, group_size=-1),
        WeightSpec(format="nf4", group_size=64),
    ):
        once = quantize_weight(w, spec).dequantize()
        twice = quantize_weight(once, spec).dequantize()
        assert torch.equal(once, twice), spec.short()


def test_rtn_w4_g32_asymmetric_is_lossless_on_a_q4_1_grid():
    """Weights stored as GGUF Q4_1 (x = d*q + m, fp16 d and m, groups of 32) come back exactly."""
    g = torch.Generator().manual_seed(1)
    rows, groups = 16, 8
    d = (torch.rand(rows, groups, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(rows, groups, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (rows, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # the Q4_1 encoder maps each group's min to 0 and max to 15
    w = (d * q + m).reshape(rows, groups * 32)
    out = quantize_weight(w, WeightSpec(bits=4, group_size=32)).dequantize()
    assert torch.equal(out, w)


def test_int_zero_point_represents_zero_exactly():
    w = gaussian().abs() + 0.5  # all positive: the range is widened to include 0
    w[:, 0] = 0.0
    out = quantize_weight(w, WeightSpec(bits=4, group_size=64, zero_point="int")).dequantize()
    assert torch.all(out[:, 0] == 0)


def test_constant_and_zero_blocks_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 3.25
    for spec in (
        WeightSpec(bits=4, group_size=32),
        WeightSpec(bits=4, symmetric=True, group_size=32),
    ):
        assert torch.equal(quantize_weight(w, spec).dequantize()[0], w[0])
    assert torch.equal(quantize_weight(w, WeightSpec(bits=4, group_size=32)).dequantize(), w)


def test_tiny_scales_do_not_underflow_fp16():
    w = gaussian() * 1e-9
    qw = quantize_weight(w, WeightSpec(bits=4, symmetric=True, group_size=64))
    scale = qw.qparams.scale
    assert scale.dtype == torch.float16  # 1e-9 / 7 underflows it: held at its smallest normal
    assert (scale == torch.finfo(torch.float16).smallest_normal).all()
    assert torch.isfinite(qw.dequantize()).all()


def test_non_finite_weights_are_an_error_naming_the_layer():
    w = gaussian()
    w[3, 5] = float("nan")
    with pytest.raises(LowbitError, match="fc1.*NaN"):
        quantize_weight(w, WeightSpec(bits=4, group_size=64), layer="fc1")


def test_codes_fit_their_bits():
    w = gaussian()
    for bits in (2, 3, 4):
        qw = quantize_weight(w, WeightSpec(bits=bits, group_size=32))
        assert qw.codes.dtype == torch.uint8
        assert int(qw.codes.max()) <= 2**bits - 1
