import pytest
import torch

from lowbit.formats.spec import ActivationSpec, ObserverSpec
from lowbit.primitives.activations import (
    fake_quantize_dynamic,
    fake_quantize_static,
    static_qparams,
)


def reference_per_token(x, bits, symmetric):
    """ZeroQuant's per-token rounding written out: one range per row, 0 always on the grid."""
    out = torch.empty_like(x)
    for i, row in enumerate(x.reshape(-1, x.shape[-1])):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = row.abs().max() / qmax
            s = s if s > 0 else torch.tensor(1.0)
            q = torch.clamp(torch.round(row / s), -qmax - 1, qmax)
            out.reshape(-1, x.shape[-1])[i] = q * s
        else:
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            s = (hi - lo) / (2**bits - 1)
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
            q = torch.clamp(torch.round(row / s) + z, 0, 2**bits - 1)
            out.reshape(-1, x.shape[-1])[i] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_dynamic_matches_its_reference_exactly(bits, symmetric):
    x = torch.randn(3, 7, 96) * torch.linspace(0.1, 10, 96)  # outlier-ish channels
    x[0, 0] += 5.0  # a row that is all positive
    spec = ActivationSpec(bits=bits, symmetric=symmetric)
    assert torch.equal(fake_quantize_dynamic(x, spec), reference_per_token(x, bits, symmetric))


def test_every_token_gets_its_own_range():
    x = torch.randn(2, 64)
    x[1] *= 1000.0
    y = fake_quantize_dynamic(x, ActivationSpec(bits=8))
    rel = (y - x).norm(dim=-1) / x.norm(dim=-1)
    assert rel[0] < 0.01 and rel[1] < 0.01  # the large row does not coarsen the small one
    per_tensor = fake_quantize_dynamic(x, ActivationSpec(bits=8, granularity="tensor"))
    assert (per_tensor[0] - x[0]).norm() / x[0].norm() > 10 * rel[0]


@pytest.mark.parametrize("spec", [ActivationSpec(bits=8), ActivationSpec(bits=4, symmetric=False),
                                  ActivationSpec(granularity="tensor")])  # fmt: skip
def test_a_collapsed_range_does_not_divide_by_zero(spec):
    for x in (torch.zeros(4, 16), torch.full((4, 16), 3.0), torch.full((4, 16), -2.0)):
        y = fake_quantize_dynamic(x, spec)
        assert torch.isfinite(y).all() and torch.allclose(y, x, atol=1e-6)


def test_four_bit_tokens_use_at_most_sixteen_levels():
    y = fake_quantize_dynamic(torch.randn(5, 200), ActivationSpec(bits=4, symmetric=False))
    assert all(len(row.unique()) <= 16 for row in y)


def test_static_range_from_a_sample_and_its_observer():
    sample = torch.cat([torch.randn(100_000), torch.tensor([80.0])])  # one huge outlier
    minmax = static_qparams(sample, ActivationSpec(granularity="tensor", dynamic=False))
    pct = static_qparams(sample, ActivationSpec(granularity="tensor", dynamic=False,
                                                observer=ObserverSpec("percentile")))  # fmt: skip
    assert minmax.scale.shape == (1,) and minmax.scale.item() == pytest.approx(80.0 / 127)
    assert pct.scale.item() < minmax.scale.item() / 10  # clipped to the bulk
    x = torch.randn(1000)
    spec = ActivationSpec(granularity="tensor", dynamic=False)
    err_mm = (fake_quantize_static(x, minmax, spec) - x).pow(2).mean()
    err_pct = (fake_quantize_static(x, pct, spec) - x).pow(2).mean()
    assert err_pct < err_mm


def test_static_asymmetric_keeps_an_integer_zero():
    sample = torch.rand(10_000) * 3.0 + 0.5  # all positive: the range is extended down to 0
    spec = ActivationSpec(granularity="tensor", dynamic=False, symmetric=False)
    qp = static_qparams(sample, spec)
    assert qp.zero.dtype == torch.uint8 and qp.zero.item() == 0
    assert fake_quantize_static(torch.zeros(3), qp, spec).abs().max() == 0.0
