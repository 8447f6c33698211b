import pytest
import torch
from torch import nn

from lowbit.algorithms.autoround import AutoRoundOptions, SignSGD, linear_decay, parameter_groups
from lowbit.algorithms.lkd import distill
from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.nn.learned_round import LearnedRoundLinear


def test_defaults_are_the_papers():
    o = AutoRoundOptions()
    assert (o.iters, o.batch_size, o.offset_lr, o.range_lr) == (200, 8, 1 / 200, 1 / 200)
    assert AutoRoundOptions(iters=50, lr=0.01).range_lr == 0.01


@pytest.mark.parametrize("bad", [{"iters": 0}, {"batch_size": 0}, {"lr": 0.0}, {"minmax_lr": -1}])
def test_bad_options_are_refused(bad):
    with pytest.raises(LowbitError, match="autoround"):
        AutoRoundOptions(**bad)


def test_sign_sgd_moves_each_parameter_by_the_learning_rate():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([1e-9, -5.0, 0.0])
    SignSGD([p], lr=0.25).step()
    assert torch.equal(p.detach(), torch.tensor([0.75, -1.75, 3.0]))


def regression(seed=0):
    """A layer whose inputs are correlated (mixed from a few sources, as activations are), so
    that the best rounding of a weight depends on its neighbours' and nearest is not best."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(32, generator=g))
    mix = torch.randn(8, 64, generator=g)
    xs = [torch.randn(64, 8, generator=g) @ mix + 0.1 * torch.randn(64, 64, generator=g)
          for _ in range(4)]  # fmt: skip
    with torch.no_grad():
        targets = [linear(x) for x in xs]
    return linear, xs, targets


def learn(options, seed=0, minmax=True):
    linear, xs, targets = regression(seed)
    twin = LearnedRoundLinear(linear, WeightSpec(bits=3, group_size=32))
    groups = parameter_groups([twin], options)
    result = distill(groups, lambda i: twin(xs[i]), targets, options.iters, progress=False,
                     optimizer=lambda g: SignSGD(g, options.offset_lr),
                     schedule=linear_decay(options.iters), project=twin.project,
                     keep_best=True)  # fmt: skip
    return twin, result


def test_learned_rounding_lowers_the_output_error_and_is_deterministic():
    twin, (before, after) = learn(AutoRoundOptions(iters=100))
    assert after < 0.7 * before
    again, (_, after2) = learn(AutoRoundOptions(iters=100))
    assert after2 == after and torch.equal(again.to_quantized().codes, twin.to_quantized().codes)
    assert twin.shift.abs().max() <= 0.5 and twin.low.min() >= 0.5 and twin.high.max() <= 1.0


def test_without_minmax_only_the_offsets_learn():
    twin, (before, after) = learn(AutoRoundOptions(iters=40, minmax=False))
    assert after < before
    assert torch.equal(twin.low.detach(), torch.ones_like(twin.low))
    assert torch.equal(twin.high.detach(), torch.ones_like(twin.high))
