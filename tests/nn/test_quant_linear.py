import pytest
import torch
import torch.nn.functional as F

from lowbit.formats import WeightSpec
from lowbit.nn import QuantLinear
from lowbit.primitives import quantize_weight

SPECS = [
    WeightSpec(bits=4, group_size=64),
    WeightSpec(bits=3, group_size=32),
    WeightSpec(bits=2, symmetric=True, group_size=-1),
    WeightSpec(bits=8, symmetric=True, group_size=-1),
    WeightSpec(bits=4, group_size=32, zero_point="int"),
    WeightSpec(bits=4, granularity="tensor"),
    WeightSpec(format="nf4", group_size=64),
    WeightSpec(format="fp8_e4m3", bits=8, group_size=-1),
    WeightSpec(format="bf16", bits=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_forward_equals_float_linear_with_dequantized_weight(spec):
    w, b = torch.randn(48, 128), torch.randn(48)
    qw = quantize_weight(w, spec)
    layer = QuantLinear.from_quantized(qw, b)
    x = torch.randn(3, 5, 128)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), b))
    assert torch.equal(layer.codes(), qw.codes)


def test_stored_bytes_are_the_packed_bytes():
    """W4 group 64 with fp16 scale and zero is 4.5 bits per weight, and the buffers hold that."""
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(96, 576), SPECS[0]))
    b = layer.storage_bytes()
    assert b["codes"] == 96 * 576 // 2
    assert b["params"] == 96 * (576 // 64) * 2 * 2
    assert layer.bits_per_weight() == 4.5
    assert layer.qweight.dtype == torch.uint8
    held = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert held == b["codes"] + b["params"]


@pytest.mark.parametrize(
    ("spec", "bpw"),
    [
        (WeightSpec(bits=3, group_size=64), 3.5),
        (WeightSpec(bits=8, symmetric=True, group_size=-1), 8 + 16 / 576),
        (WeightSpec(bits=4, group_size=64, zero_point="int"), 4 + 16 / 64 + 8 * 5 / 576),
    ],
)
def test_bits_per_weight_includes_overhead(spec, bpw):
    # int zero points: 9 groups of 4-bit codes per row pack into 5 bytes (one nibble of padding)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(32, 576), spec))
    assert layer.bits_per_weight() == pytest.approx(bpw)


def test_state_dict_round_trip_into_a_fresh_module():
    spec = WeightSpec(bits=3, group_size=32, zero_point="int")
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(16, 64), spec), torch.randn(16))
    fresh = QuantLinear(64, 16, spec, bias=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))


def _act_layer(spec, act, bias=True):
    w, b = torch.randn(24, 64), torch.randn(24)
    qw = quantize_weight(w, spec)
    return QuantLinear.from_quantized(qw, b if bias else None, "l", act), qw, b


def test_w4a8_forward_rounds_inputs_per_token_then_uses_the_dequantized_weight():
    from lowbit.formats import ActivationSpec
    from lowbit.primitives.activations import fake_quantize_dynamic

    act = ActivationSpec(bits=8)
    layer, qw, b = _act_layer(WeightSpec(bits=4, group_size=32), act)
    x = torch.randn(2, 3, 64)
    expected = F.linear(fake_quantize_dynamic(x, act), qw.dequantize(), b)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), F.linear(x, qw.dequantize(), b))


def test_static_layer_needs_calibration_and_then_uses_its_stored_range():
    from lowbit.errors import LowbitError
    from lowbit.formats import ActivationSpec
    from lowbit.primitives import QParams

    act = ActivationSpec(granularity="tensor", dynamic=False, symmetric=False)
    layer, qw, b = _act_layer(WeightSpec(bits=8, symmetric=True, group_size=-1), act)
    x = torch.randn(4, 64)
    with pytest.raises(LowbitError, match="not calibrated"):
        layer(x)
    layer.set_static_range(QParams(torch.tensor([0.01]), torch.tensor([128], dtype=torch.uint8)))
    y = layer(x)
    xq = (torch.clamp(torch.round(x / 0.01) + 128, 0, 255) - 128) * 0.01  # clipped at ±1.28
    assert torch.allclose(y, F.linear(xq, qw.dequantize(), b), atol=1e-5)
    names = dict(layer.named_buffers())
    assert names["act_scale"].item() == pytest.approx(0.01) and names["act_zero"].item() == 128
