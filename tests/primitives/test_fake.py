import torch

from lowbit.formats import WeightSpec
from lowbit.primitives import fake_quantize_weight, quantize_weight


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
