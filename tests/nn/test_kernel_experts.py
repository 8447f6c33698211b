"""A token's 4-bit kernel experts in two native calls: the same sum as calling them one by
one, and None (the caller's loop) wherever the call does not apply."""

import pytest
import torch
from torch import nn

from helpers import random_affine
from lowbit.kernels.build import native_ops
from lowbit.nn.kernel_experts import one_token_experts
from lowbit.nn.kernel_linear import AffineKernelLinear
from lowbit.nn.online import install_online

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


class Expert(nn.Module):  # the layout of lowbit.models.experts.ExpertMLP
    def __init__(self, seed: int, act: nn.Module, hidden: int = 128, width: int = 64) -> None:
        super().__init__()
        layer = lambda n, k, s: AffineKernelLinear(random_affine(n, k, 32, 4, s, "f16"), n, None)  # noqa: E731
        self.gate_proj = layer(width, hidden, 3 * seed)
        self.up_proj = layer(width, hidden, 3 * seed + 1)
        self.down_proj = layer(hidden, width, 3 * seed + 2)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _loop(experts, x, route):
    out = torch.zeros_like(x)
    for expert, r in zip(experts, route, strict=True):
        out += expert(x) * r
    return out


@needs_native
@pytest.mark.parametrize("isa", ["", "avx2"])
def test_the_same_sum_as_the_experts_one_by_one(monkeypatch, isa):
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", isa)
    act = nn.SiLU()
    experts = [Expert(s, act) for s in (4, 0, 2)]
    x, route = torch.randn(1, 128), torch.rand(3)
    got = one_token_experts(experts, x, route)
    assert got is not None and torch.equal(got, _loop(experts, x, route))


@needs_native
def test_an_online_rotation_before_down_proj_turns_each_experts_row():
    """Rotated mixtures: each expert's down_proj turns its input at run time (a hook), as
    calling the layer does; other hooks leave the experts to the loop."""
    act = nn.SiLU()
    experts = [Expert(s, act) for s in (1, 3)]
    for e in experts:
        install_online(e.down_proj, 64)
    x, route = torch.randn(1, 128), torch.rand(2)
    got = one_token_experts(experts, x, route)
    assert got is not None and torch.equal(got, _loop(experts, x, route))
    experts[0].up_proj.register_forward_pre_hook(lambda m, a: None)  # input hooks elsewhere
    assert one_token_experts(experts, x, route) is None
    hooked = [Expert(s, act) for s in (1, 3)]
    hooked[1].down_proj.register_forward_hook(lambda m, a, y: y * 2)  # an output hook
    assert one_token_experts(hooked, x, route) is None


@needs_native
def test_experts_it_cannot_take_are_left_to_the_loop():
    act = nn.SiLU()
    x, route = torch.randn(1, 128), torch.rand(2)
    assert one_token_experts([Expert(0, act), Expert(1, nn.SiLU())], x, route) is None  # two acts
    biased = [Expert(0, act), Expert(1, act)]
    biased[1].up_proj.bias = nn.Parameter(torch.zeros(64))
    assert one_token_experts(biased, x, route) is None
    eight = [Expert(0, act), Expert(1, act)]
    eight[0].down_proj = AffineKernelLinear(random_affine(128, 64, 32, 8), 128, None)
    assert one_token_experts(eight, x, route) is None
    plain = [Expert(0, act), Expert(1, act)]
    plain[1].gate_proj = nn.Linear(128, 64, bias=False)
    assert one_token_experts(plain, x, route) is None
    experts = [Expert(0, act), Expert(1, act)]
    assert one_token_experts(experts, torch.randn(2, 128), route) is None  # two tokens
    assert one_token_experts(experts, x.double(), route.double()) is None
    assert one_token_experts(experts, x, route) is not None
