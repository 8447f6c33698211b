import pytest
import torch
from torch import nn

from helpers import FAMILIES, tiny_family_model
from lowbit.errors import LowbitError
from lowbit.models.families import family_of, find_blocks, sequential_groups
from lowbit.models.fold import can_fold, fold_scales
from lowbit.models.normalize import conv1d_to_linear

LLAMA_LIKE = {f: "model.layers" for f in ("llama", "qwen2", "mistral", "gemma")}
BLOCKS = {**LLAMA_LIKE, "gpt2": "transformer.h", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_found_for_every_family(family):
    model = tiny_family_model(family)
    conv1d_to_linear(model)
    path, blocks = find_blocks(model)
    assert path == BLOCKS[family] and len(blocks) == 2


def test_blocks_are_found_generically_for_unknown_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.stack = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

    assert find_blocks(Net())[0] == "stack"


def test_a_model_without_blocks_names_what_it_found():
    with pytest.raises(LowbitError, match=r"no repeated decoder blocks.*0: Linear"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_subclassed_linears_are_quantized_like_plain_ones():
    from helpers import make_recipe
    from lowbit import api
    from lowbit.nn import QuantLinear

    model = tiny_family_model("falcon")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    api.quantize(model, make_recipe({"bits": 8, "group_size": -1}), progress=False)
    _, blocks = find_blocks(model)
    linears = [m for m in blocks.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert len(linears) == 8 and all(isinstance(m, QuantLinear) for m in linears)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_llama_true_sequential_groups():
    model = tiny_family_model("llama")
    _, blocks = find_blocks(model)
    groups = sequential_groups(blocks[0], family_of(model), true_sequential=True)
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    mlp = [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert groups == [attn, ["self_attn.o_proj"], *mlp]
    assert len(sequential_groups(blocks[0], family_of(model), true_sequential=False)) == 1


def test_gpt2_conv1d_becomes_linear_with_identical_outputs():
    model = tiny_family_model("gpt2")
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        assert conv1d_to_linear(model) == 8
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear


@pytest.mark.parametrize("family", [*FAMILIES, "olmo2"])
def test_folding_scales_leaves_the_float_model_unchanged(family):
    """What AWQ folds into norms and feeding linears must not change any output (OLMo 2's
    norms follow its sub-blocks: only its linear pairs fold)."""
    model = tiny_family_model(family)
    conv1d_to_linear(model)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    _, blocks = find_blocks(model)
    folded = 0
    g = torch.Generator().manual_seed(0)
    for block in blocks:
        for group in family_of(model).scale_groups:
            prev = block.get_submodule(group.prev)
            linears = [block.get_submodule(n) for n in group.linears]
            if can_fold(prev, group.prev_kind, linears):
                s = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
                fold_scales(prev, group.prev_kind, linears, s)
                folded += 1
    with torch.no_grad():
        after = model(ids).logits
    assert folded >= (2 if family == "olmo2" else 4)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
