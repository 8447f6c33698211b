import pytest
import torch
from torch import nn

from lowbit.algorithms.lkd import LKDOptions, distill, trainable
from lowbit.errors import LowbitError
from lowbit.formats import ActivationSpec, WeightSpec
from lowbit.nn.fake_linear import FakeQuantLinear
from lowbit.primitives import quantize_weight

SPEC = WeightSpec(bits=3, group_size=32)


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
    channel_scale = torch.exp(torch.randn(64, generator=g))  # uneven channels, as in LLMs
    xs = [torch.randn(64, 64, generator=g) * channel_scale for _ in range(4)]
    with torch.no_grad():
        targets = [teacher(x) for x in xs]
    fake = FakeQuantLinear.from_quantized(teacher, quantize_weight(teacher.weight, SPEC), "l",
                                          ActivationSpec(bits=8))  # fmt: skip
    return fake, xs, targets


def test_from_quantized_starts_exactly_at_the_algorithms_weight():
    w = torch.randn(16, 64)
    qw = quantize_weight(w, SPEC)
    fake = FakeQuantLinear.from_quantized(nn.Linear(64, 16), qw)
    assert torch.allclose(fake.fake_weight(), qw.dequantize(), atol=1e-6)
    assert torch.equal(fake.to_quantized().codes, qw.codes)


@pytest.mark.parametrize(("train", "lr"), [("all", 3e-3), ("scales", 1e-2)])
def test_distillation_lowers_the_reconstruction_error(train, lr):
    fake, xs, targets = setup()
    options = LKDOptions(steps=100, lr=lr, train=train)
    groups = trainable([fake], train, options.lr)
    before, after = distill(groups, lambda i: fake(xs[i]), targets, options.steps, progress=False)
    assert after < 0.9 * before


def test_a_diverging_run_is_undone():
    fake, xs, targets = setup()
    start = [p.detach().clone() for p in (fake.weight, fake.scale, fake.offset)]
    options = LKDOptions(steps=5, lr=1e3)
    groups = trainable([fake], "all", options.lr)
    before, after = distill(groups, lambda i: fake(xs[i]), targets, options.steps, progress=False)
    assert after == before
    for p, old in zip((fake.weight, fake.scale, fake.offset), start, strict=True):
        assert torch.equal(p.detach(), old)


def test_trainable_selects_the_asked_parameters():
    fake, _, _ = setup()
    assert trainable([fake], "weights", 1.0)[0]["params"] == [fake.weight]
    (group,) = trainable([fake], "scales", 0.5)
    assert group["params"] == [fake.scale, fake.offset]
    assert group["lr"] == pytest.approx(0.5 * float(fake.scale.detach().abs().mean()))


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="lkd.train"):
        LKDOptions(train="bias")
    with pytest.raises(LowbitError, match="steps"):
        LKDOptions(steps=0)


def test_every_worker_averages_the_same_list_of_gradients():
    """A parameter this worker did not reach (an expert no token was routed to) sends zeros,
    so every worker's list has the same tensors in the same order; one that no worker reached
    takes no step."""
    from lowbit.algorithms.lkd import _sync_all

    reached, here_only, nowhere = (nn.Parameter(torch.ones(3)) for _ in range(3))
    reached.grad = torch.full((3,), 2.0)
    sent = []

    def sync(grads):  # the other worker reached ``here_only`` (its mean gradient: 0.5)
        sent.append([g.clone() for g in grads])
        grads[1].add_(1.0).div_(2.0)

    _sync_all([reached, here_only, nowhere], sync)
    assert [g.tolist() for g in sent[0]] == [[2.0] * 3, [0.0] * 3, [0.0] * 3]
    assert here_only.grad.tolist() == [0.5] * 3
    assert nowhere.grad is None
