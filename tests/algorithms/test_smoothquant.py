import copy

import pytest
import torch

from helpers import tiny_llama
from lowbit.algorithms.smoothquant import (
    SmoothQuantOptions,
    output_error,
    search_alpha,
    smoothing_factors,
)
from lowbit.errors import LowbitError
from lowbit.formats import ActivationSpec, WeightSpec
from lowbit.models.fold import fold_scales

W8 = WeightSpec(bits=8, symmetric=True, group_size=-1)
A8 = ActivationSpec(bits=8)


def outlier_inputs(rows=512, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, :3] *= 60.0  # a few outlier channels, as in LLM activations
    return x


def test_factors_follow_the_formula_and_guard_dead_channels():
    a = torch.tensor([4.0, 0.0, 1.0])
    w = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.25, 1.0, 0.0]])]
    s = smoothing_factors(a, w, 0.5)
    assert s[0] == pytest.approx((4.0**0.5) / (1.0**0.5)) and s[1] == 1.0 and s[2] == 1.0


def test_folding_leaves_float_outputs_unchanged():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        smoothed = copy.deepcopy(model)
        for block in smoothed.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            s = smoothing_factors(torch.rand(64) * 10 + 0.1, [lin.weight for lin in qkv], 0.7)
            fold_scales(block.input_layernorm, "norm", qkv, s)
            s2 = smoothing_factors(torch.rand(mlp.down_proj.in_features) + 0.1,
                                   [mlp.down_proj.weight], 0.5)  # fmt: skip
            fold_scales(mlp.up_proj, "linear", [mlp.down_proj], s2)
        after = smoothed(ids).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                           smoothed.model.layers[0].self_attn.q_proj.weight)  # fmt: skip


def test_smoothing_lowers_w8a8_output_error_on_outlier_channels():
    x = outlier_inputs()
    w = [torch.randn(48, 64) * 0.05]
    absmax = x.abs().amax(0)
    plain = output_error(x, w, [W8], A8, None)
    smoothed = output_error(x, w, [W8], A8, smoothing_factors(absmax, w, 0.5))
    assert smoothed < plain / 2


def test_the_search_never_does_worse_than_no_smoothing():
    for seed in range(3):
        x = outlier_inputs(seed=seed) if seed else torch.randn(256, 64)  # seed 0: no outliers
        w = [torch.randn(32, 64)]
        error = lambda s, x=x, w=w: output_error(x, w, [W8], A8, s)  # noqa: E731
        s, alpha = search_alpha(x.abs().amax(0), w, SmoothQuantOptions(), error)
        chosen = output_error(x, w, [W8], A8, s)
        assert chosen <= output_error(x, w, [W8], A8, None)
        assert (s is None) == (alpha is None)


def test_fixed_alpha_is_used_as_given():
    x = outlier_inputs()
    w = [torch.randn(8, 64)]
    s, alpha = search_alpha(x.abs().amax(0), w, SmoothQuantOptions(alpha=0.8), pytest.fail)
    assert alpha == 0.8 and torch.equal(s, smoothing_factors(x.abs().amax(0), w, 0.8))


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="in \\[0, 1\\]"):
        SmoothQuantOptions(alpha=1.5)
