import logging

import pytest
import torch

from lowbit.algorithms import rtn
from lowbit.algorithms.gptq import GPTQOptions, gptq
from lowbit.formats import WeightSpec


def correlated_inputs(n=2048, dim=128, seed=0):
    """Inputs with strongly correlated channels and a few loud ones, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g) @ torch.randn(16, dim, generator=g)
    x = base + 0.3 * torch.randn(n, dim, generator=g)
    x[:, :4] *= 8.0
    return x


def output_error(w, w_hat, x):
    return ((w - w_hat) @ x.T).norm() / (w @ x.T).norm()


SPECS = [
    WeightSpec(bits=4, group_size=32),
    WeightSpec(bits=3, group_size=32),
    WeightSpec(bits=4, group_size=-1),
    WeightSpec(bits=4, symmetric=True, group_size=64),
    WeightSpec(bits=4, group_size=32, zero_point="int"),
    WeightSpec(format="nf4", group_size=64),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_the_layer_output_better_than_rtn(spec, act_order):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    q = gptq(w, h, spec, GPTQOptions(act_order=act_order))
    assert output_error(w, q.dequantize(), x) < 0.8 * output_error(w, rtn(w, spec).dequantize(), x)


def test_act_order_uses_static_groups_from_the_original_weights():
    """Ranges fixed before any update equal RTN's: the stored layout needs no permutation."""
    x = correlated_inputs()
    w = torch.randn(32, 128)
    spec = WeightSpec(bits=4, group_size=32)
    q = gptq(w, 2 * x.T @ x / len(x), spec, GPTQOptions(act_order=True))
    r = rtn(w, spec)
    assert torch.equal(q.qparams.scale, r.qparams.scale)
    assert torch.equal(q.qparams.zero, r.qparams.zero)


def test_dead_inputs_and_a_singular_hessian_are_handled():
    x = correlated_inputs(n=64)  # 64 samples for 128 channels: rank-deficient
    x[:, 10] = 0.0  # a channel that never fires
    w = torch.randn(32, 128)
    q = gptq(w, 2 * x.T @ x / len(x), WeightSpec(bits=4, group_size=32), GPTQOptions())
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # the dead channel keeps (a quantized version of) its weights instead of being zeroed
    assert (deq[:, 10] - w[:, 10]).abs().max() < 0.5 * w[:, 10].abs().max()


def test_indefinite_hessian_raises_dampening_and_logs(caplog):
    h = torch.eye(64)
    h[0, 0] = -1.0  # not positive definite even after the default dampening
    w = torch.randn(8, 64)
    with caplog.at_level(logging.WARNING):
        q = gptq(w, h, WeightSpec(bits=4, group_size=32), GPTQOptions(act_order=False), "fc")
    assert torch.isfinite(q.dequantize()).all()
    assert "fc: Hessian not positive definite" in caplog.text


def test_a_float_storage_format_is_stored_as_is():
    """A mixed recipe's ``float`` layers (fp16 storage) have no grid to fit."""
    w, h = torch.randn(8, 16), torch.eye(16)
    got = gptq(w, h, WeightSpec(format="fp16", bits=16), GPTQOptions(), "l")
    want = rtn(w, WeightSpec(format="fp16", bits=16), "l")
    assert torch.equal(got.codes, want.codes)
