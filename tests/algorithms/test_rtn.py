import torch

from lowbit.algorithms import rtn
from lowbit.formats import WeightSpec
from lowbit.primitives import sqnr_db


def test_rtn_is_nearest_grid_point_per_weight():
    """No other code of the same block is closer to the weight than the one RTN chose."""
    w = torch.randn(8, 64)
    spec = WeightSpec(bits=3, symmetric=True, group_size=32)
    qw = rtn(w, spec)
    scale = qw.qparams.scale.float().repeat_interleave(32, dim=1)  # (8, 64)
    chosen = (w - qw.dequantize()).abs()
    for code in range(8):
        other = (w - (code - 4) * scale).abs()
        assert torch.all(chosen <= other + 1e-6)


def test_mse_observer_improves_rtn_at_3_bits():
    w = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))
    plain = rtn(w, WeightSpec(bits=3, group_size=-1))
    clipped = rtn(w, WeightSpec.from_dict({"bits": 3, "group_size": -1, "observer": "mse"}))
    assert sqnr_db(w, clipped.dequantize()) > sqnr_db(w, plain.dequantize()) + 0.5
