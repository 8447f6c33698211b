"""Rounding of keys, values and queries per token, head and group of channels."""

import torch

from lowbit.primitives.kv import (
    cache_values,
    dequantize_heads,
    fake_quantize_heads,
    quantize_heads,
)


def test_round_trip_within_half_a_step_per_group():
    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0))
    for bits, group in ((8, 64), (4, 64), (4, 16), (3, 32)):
        codes, scale, minimum = quantize_heads(x, bits, group)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        assert scale.shape == (2, 3, 17, 64 // group) and scale.dtype == torch.float16
        back = dequantize_heads(codes, scale, minimum, bits)
        step = scale.float().repeat_interleave(group, -1)
        assert ((back - x).abs() <= step * 0.5 + 1e-3 * x.abs().amax()).all()


def test_rounding_twice_changes_nothing():
    """The attention function rounds the whole cache at every step: a key must read the same."""
    x = torch.randn(1, 2, 9, 32, generator=torch.Generator().manual_seed(1)) * 3
    once = fake_quantize_heads(x, 4, 32)
    assert torch.allclose(fake_quantize_heads(once, 4, 32), once, atol=1e-5)


def test_more_bits_less_error():
    x = torch.randn(1, 2, 50, 64, generator=torch.Generator().manual_seed(2))
    errors = [(fake_quantize_heads(x, b, 64) - x).pow(2).mean() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_a_float16_cache_rounds_to_nearest_and_clamps_to_its_range():
    """kv_bits 16: the nearest float16 (ties to even), ±65504 beyond its range, NaN kept;
    rounding twice changes nothing; a float32 cache stores the values as they are."""
    x = torch.tensor([1 / 3, 2049.0, 2051.0, 1e6, -1e6, 65519.0, float("nan"), -0.0, 1e-9])
    got = cache_values(x, torch.float16)
    want = torch.tensor([1 / 3, 2048.0, 2052.0, 65504, -65504, 65504, float("nan"), -0.0, 1e-9])
    assert got.dtype == torch.float16
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.half().nan_to_num())
    assert torch.equal(cache_values(got.float(), torch.float16).nan_to_num(), got.nan_to_num())
    assert torch.equal(cache_values(x, torch.float32).nan_to_num(), x.nan_to_num())
