import pytest
import torch
from torch import nn

from helpers import tiny_family_model
from lowbit.calibration import BlockContext, capture_block_inputs
from lowbit.calibration.stats import collect_input_stats
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks


def test_hessian_and_absmean_match_a_direct_computation():
    lin = nn.Linear(8, 4)
    xs = [torch.randn(3, 5, 8) for _ in range(3)]
    with collect_input_stats({"fc": lin}, hessian=True, absmean=True) as stats, torch.no_grad():
        for x in xs:
            lin(x)
    x = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert stats["fc"].rows == 45
    assert torch.allclose(stats["fc"].hessian().double(), 2 * x.T @ x / 45, atol=1e-5)
    assert torch.allclose(stats["fc"].absmean().double(), x.abs().mean(0), atol=1e-6)


def block_context(model, windows):
    _, blocks = find_blocks(model)
    return BlockContext(
        blocks[0], "model.layers.0", capture_block_inputs(model, blocks[0], windows, 2)
    )


def test_collecting_the_first_linears_stops_the_pass_early():
    model = tiny_family_model("llama")
    ctx = block_context(model, torch.randint(0, 64, (4, 16)))
    calls = []
    ctx.block.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    stats = ctx.collect(["self_attn.q_proj", "self_attn.k_proj"], hessian=True)
    assert not calls  # the MLP never ran
    assert stats["self_attn.q_proj"].rows == 64
    assert torch.equal(stats["self_attn.q_proj"].hessian(), stats["self_attn.k_proj"].hessian())


def test_non_finite_calibration_activations_stop_naming_the_layer():
    model = tiny_family_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    ctx = block_context(model, torch.randint(0, 64, (2, 8)))
    with pytest.raises(
        LowbitError, match=r"non-finite calibration activations entering mlp\.gate_proj"
    ):
        ctx.collect(["mlp.gate_proj"], hessian=True)
