"""FakeQuantLinear: straight-through gradients, learnable scales, and an exact packed twin."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.nn import QuantLinear
from lowbit.nn.fake_linear import FakeQuantLinear


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_reach_weights_and_scales_through_rounding(symmetric):
    fake = FakeQuantLinear(torch.nn.Linear(64, 16), WeightSpec(bits=3, group_size=32,
                                                               symmetric=symmetric))  # fmt: skip
    x = torch.randn(4, 64)
    fake(x).pow(2).sum().backward()
    # a plain round() has zero gradient almost everywhere: these would all be zero
    assert fake.weight.grad.abs().sum() > 0
    assert fake.scale.grad.abs().sum() > 0
    assert (fake.offset.grad is None) == symmetric


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_twin_computes_exactly_the_fake_weight(symmetric):
    spec = WeightSpec(bits=4, group_size=32, symmetric=symmetric)
    fake = FakeQuantLinear(torch.nn.Linear(96, 24), spec)
    with torch.no_grad():  # move weights and scales off their initial values, as training does
        fake.weight.add_(0.01 * torch.randn_like(fake.weight))
        fake.scale.mul_(1.0 + 0.05 * torch.rand_like(fake.scale))
    packed = QuantLinear.from_quantized(fake.to_quantized(), fake.bias)
    assert torch.equal(packed.dequantized_weight(), fake.fake_weight().detach())
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(packed(x), fake(x))


def test_only_integer_grids_with_float_offsets_or_symmetric():
    with pytest.raises(LowbitError, match="QAT trains integer grids"):
        FakeQuantLinear(torch.nn.Linear(64, 8), WeightSpec(format="nf4", group_size=32))
    with pytest.raises(LowbitError, match="zero_point: float"):
        FakeQuantLinear(torch.nn.Linear(64, 8), WeightSpec(bits=4, group_size=32, zero_point="int"))


@pytest.mark.parametrize("symmetric", [False, True])
def test_fixed_codes_stay_whatever_the_scales_do(symmetric):
    spec = WeightSpec(bits=3, group_size=32, symmetric=symmetric)
    start = FakeQuantLinear(torch.nn.Linear(64, 8), spec).to_quantized()
    fake = FakeQuantLinear.with_fixed_codes(torch.nn.Linear(64, 8), start)
    x = torch.randn(4, 64)
    fake(x).pow(2).sum().backward()
    assert fake.weight.grad is None and fake.scale.grad.abs().sum() > 0
    assert (fake.offset.grad is None) == symmetric
    with torch.no_grad():  # far enough that re-rounding the float weight would change codes
        fake.scale.mul_(1.5)
        fake.offset.add_(0.0 if symmetric else 0.05)
    moved = fake.to_quantized()
    assert torch.equal(moved.codes, start.codes)
    assert not torch.equal(moved.qparams.scale, start.qparams.scale)
    packed = QuantLinear.from_quantized(moved, fake.bias)
    with torch.no_grad():
        assert torch.equal(packed(x), fake(x))
