import pytest
import torch
from torch import nn

from lowbit.formats import ActivationSpec, WeightSpec
from lowbit.nn.learned_round import LearnedRoundLinear
from lowbit.primitives import quantize_weight

SPECS = [WeightSpec(bits=4, group_size=32), WeightSpec(bits=3, group_size=-1, symmetric=True),
         WeightSpec(bits=4, group_size=32, zero_point="int")]  # fmt: skip


def layer(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 16)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_it_starts_as_round_to_nearest(spec):
    linear = layer()
    twin = LearnedRoundLinear(linear, spec)
    qw = quantize_weight(linear.weight, spec)
    assert torch.equal(twin.to_quantized().codes, qw.codes)
    assert torch.equal(twin.fake_weight().detach(), qw.dequantize())
    x = torch.randn(3, 64)
    torch.testing.assert_close(twin(x), x @ qw.dequantize().T + linear.bias)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_the_packed_weight_is_exactly_the_trained_one(spec):
    twin = LearnedRoundLinear(layer(), spec)
    with torch.no_grad():
        twin.shift.uniform_(-0.5, 0.5)
        twin.low.uniform_(0.5, 1.0)
        twin.high.uniform_(0.5, 1.0)
    qw = twin.to_quantized()
    assert torch.equal(qw.dequantize(), twin.fake_weight().detach())
    assert not torch.equal(qw.codes, quantize_weight(layer().weight, spec).codes)


def test_gradients_reach_offsets_and_range_factors_and_project_clamps():
    twin = LearnedRoundLinear(layer(), SPECS[0])
    twin(torch.randn(5, 64)).pow(2).sum().backward()
    assert twin.shift.grad.abs().sum() > 0
    assert twin.low.grad.abs().sum() > 0 and twin.high.grad.abs().sum() > 0
    with torch.no_grad():
        twin.shift.fill_(3.0)
        twin.low.fill_(0.1)
        twin.high.fill_(2.0)
    twin.project()
    assert twin.shift.max() == 0.5 and twin.low.min() == 0.5 and twin.high.max() == 1.0


def test_inputs_are_rounded_as_the_packed_layer_rounds_them():
    from lowbit.nn import QuantLinear

    act = ActivationSpec(bits=4)
    linear = layer()
    twin = LearnedRoundLinear(linear, SPECS[0], act=act)
    x = torch.randn(3, 64)
    plain = LearnedRoundLinear(layer(), SPECS[0])
    packed = QuantLinear.from_quantized(twin.to_quantized(), linear.bias, "l", act)
    with torch.no_grad():
        assert not torch.allclose(twin(x), plain(x))
        assert torch.allclose(twin(x), packed(x), rtol=0, atol=1e-6)
