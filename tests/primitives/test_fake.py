import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.primitives import fake_quantize_weight, from_blocks, grid_of, quantize_weight, to_blocks
from lowbit.primitives.fake import ste_codes


def test_fake_quant_forward_equals_quantize_dequantize():
    w = torch.randn(8, 64)
    spec = WeightSpec(bits=3, group_size=32)
    ref = quantize_weight(w, spec).dequantize()
    torch.testing.assert_close(fake_quantize_weight(w, spec), ref, rtol=0, atol=1e-6)


def test_gradient_passes_straight_through_rounding():
    """With a plain round() the gradient would be zero everywhere."""
    w = torch.randn(8, 64, requires_grad=True)
    upstream = torch.randn(8, 64)
    (fake_quantize_weight(w, WeightSpec(bits=2, group_size=32)) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


GRIDS = [dict(symmetric=True), dict(symmetric=False), dict(symmetric=False, zero_point="int")]


@pytest.mark.parametrize("grid", GRIDS)
def test_ste_codes_without_a_shift_are_round_to_nearest(grid):
    w = torch.randn(8, 64)
    spec = WeightSpec(bits=3, group_size=32, **grid)
    qw = quantize_weight(w, spec)
    xb = to_blocks(w, qw.block)
    codes = ste_codes(xb, qw.qparams, grid_of(spec))
    assert torch.equal(from_blocks(codes.to(torch.uint8), qw.block), qw.codes)


@pytest.mark.parametrize("grid", GRIDS)
def test_a_half_step_shift_moves_codes_by_one_and_passes_gradients(grid):
    spec = WeightSpec(bits=4, group_size=32, **grid)
    w = torch.randn(4, 64)
    qw = quantize_weight(w, spec)
    xb = to_blocks(w, qw.block)
    base = ste_codes(xb, qw.qparams, grid_of(spec))
    shift = torch.full_like(xb, 0.5, requires_grad=True)
    up = ste_codes(xb, qw.qparams, grid_of(spec), shift)
    inside = (base > 0) & (base < 15)  # not clamped at the grid's ends
    assert ((up - base)[inside] >= 0).all() and ((up - base)[inside] <= 1).all()
    assert (up - base)[inside].mean() > 0.4  # about half the weights cross a midpoint
    up.sum().backward()
    assert (shift.grad[(up > 0) & (up < 15)] == 1).all()  # straight through the rounding
    assert set(shift.grad.unique().tolist()) <= {0.0, 1.0}  # none past the grid's ends


def test_ste_codes_refuse_a_non_integer_grid():
    spec = WeightSpec(format="nf4", group_size=32)
    qw = quantize_weight(torch.randn(2, 32), spec)
    with pytest.raises(LowbitError, match="integer grid"):
        ste_codes(to_blocks(torch.randn(2, 32), qw.block), qw.qparams, grid_of(spec))
