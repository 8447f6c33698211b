import copy

import pytest
import torch

from helpers import convnet, tiny_llama
from lowbit import api
from lowbit.analysis import image_contributions, layer_contributions
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_weights
from lowbit.recipes import Recipe

W8 = {"version": 1, "weights": {"bits": 8, "symmetric": True, "group_size": -1},
      "ignore": ["lm_head"]}  # fmt: skip
BROKEN = "model.layers.1.mlp.up_proj"


def quantized():
    fp = tiny_llama(layers=2)
    q = copy.deepcopy(fp)
    quantize_weights(q, Recipe.from_dict(W8), None, progress=False)
    return fp, q


WINDOWS = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("how", ["zero", "nan"])
def test_diff_names_a_planted_broken_layer_first(how):
    fp, q = quantized()
    layer = q.get_submodule(BROKEN)
    layer.scale.fill_(0.0 if how == "zero" else float("nan"))
    total, ranked = layer_contributions(fp, q, WINDOWS, batch_size=2, progress=False)
    assert ranked[0].layer == BROKEN and ranked[0].reduction > 0
    assert total > 0 and len(ranked) == 14


def test_diff_names_a_layer_quantized_to_two_bits():
    fp = tiny_llama(layers=2)
    q = copy.deepcopy(fp)
    two = {**W8, "overrides": [{"match": BROKEN, "weights": {"bits": 2, "group_size": 32,
                                                             "symmetric": False}}]}  # fmt: skip
    quantize_weights(q, Recipe.from_dict(two), None, progress=False)
    _, ranked = layer_contributions(fp, q, WINDOWS, batch_size=2, progress=False)
    assert ranked[0].layer == BROKEN and "int2" in ranked[0].format


@pytest.mark.parametrize("family", ["gpt2", "falcon", "qwen2_moe"])
def test_diff_takes_the_float_model_as_it_was_loaded(family):
    """GPT-2's Conv1D, Falcon's nn.Linear subclass and a mixture's fused experts are the
    layers Q was quantized from once FP is turned as quantization turned it."""
    from helpers import tiny_family_model, tiny_moe

    fp = tiny_moe(family) if family.endswith("moe") else tiny_family_model(family)
    q = copy.deepcopy(fp)
    api.quantize(q, Recipe.from_dict(W8), progress=False)
    total, ranked = layer_contributions(fp, q, WINDOWS, batch_size=2, progress=False)
    assert total > 0 and ranked and all(c.without <= total * 1.5 for c in ranked)


def test_nan_weights_stop_quantization_naming_the_layer():
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.get_submodule(BROKEN).weight[3, 5] = float("nan")
    with pytest.raises(LowbitError, match=BROKEN):
        quantize_weights(model, Recipe.from_dict(W8), None, progress=False)


def test_diff_of_an_image_model_ranks_layers_by_output_error():
    fp = convnet()
    q = copy.deepcopy(fp)
    two = {**W8, "ignore": [], "overrides": [{"match": "2", "weights": {"bits": 2}}]}
    api.quantize(q, Recipe.from_dict(two), progress=False)
    inputs = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    total, ranked = image_contributions(fp, q, inputs, (-1.0, 1.0), progress=False)
    assert ranked[0].layer == "2" and "int2" in ranked[0].format
    assert total > ranked[0].without >= 0 and len(ranked) == 3
    assert set(ranked[0].to_dict()) == {"layer", "format", "mse_without", "mse_reduction"}
    with pytest.raises(LowbitError, match="not a linear or convolution"):
        image_contributions(torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(),
                                                torch.nn.Identity()), q, inputs, (-1.0, 1.0),
                            progress=False)  # fmt: skip
