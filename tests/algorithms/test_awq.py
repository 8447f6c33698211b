import torch

from lowbit.algorithms.awq import AWQOptions, awq_scales, search_scales
from lowbit.algorithms.clip import output_error_range
from lowbit.formats import WeightSpec
from lowbit.primitives import fake_quantize_range, grid_of, observe, quantize_weight, to_blocks


def test_scales_are_normalised_and_alpha_zero_is_identity():
    x = torch.rand(64) * 10 + 0.1
    w = [torch.randn(16, 64)]
    s = awq_scales(x, w, 0.5, duo=True)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.allclose(awq_scales(x, w, 0.0, duo=False), torch.ones(64))


def test_search_keeps_the_alpha_with_the_least_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 20  # salient channels
    w = torch.randn(32, 64, generator=g)
    spec = WeightSpec(bits=3, group_size=32)

    def loss(effective):
        return float(((effective[0] - w) @ x.T).pow(2).mean())

    s, alpha, losses = search_scales(x.abs().mean(0), [w], [spec], loss, AWQOptions(grid=10))
    assert losses[0] == loss([quantize_weight(w, spec).dequantize()])  # first: no scaling
    assert alpha is not None and min(losses) == losses[1 + int(alpha * 10)] < losses[0]


def test_output_error_clipping_beats_minmax_on_the_layer_output():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 64, generator=g) * torch.linspace(0.1, 3, 64)
    w = torch.distributions.Laplace(0.0, 1.0).sample((32, 64))
    h = x.T @ x
    spec = WeightSpec(bits=3, group_size=32)
    lo, hi = output_error_range(w, h, spec, steps=20, max_shrink=0.5)
    clipped = quantize_weight(w, spec, lo=lo, hi=hi).dequantize()
    plain = quantize_weight(w, spec).dequantize()
    assert ((clipped - w) @ x.T).norm() < ((plain - w) @ x.T).norm()


def test_output_error_clipping_with_identity_hessian_is_an_mse_search():
    w = torch.randn(8, 64)
    spec = WeightSpec(bits=4, group_size=32)
    lo, hi = output_error_range(w, torch.eye(64), spec, steps=10, max_shrink=0.5)
    grid, xb = grid_of(spec), to_blocks(w, (1, 32))
    lo0, hi0 = observe(xb, spec.observer, grid)
    err = (fake_quantize_range(xb, lo, hi, grid) - xb).pow(2).sum(-1)
    err0 = (fake_quantize_range(xb, lo0, hi0, grid) - xb).pow(2).sum(-1)
    assert torch.all(err <= err0 + 1e-6)
