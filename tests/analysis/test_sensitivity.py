import json

import pytest
import torch

from helpers import tiny_llama
from lowbit.analysis import candidate_specs, measure_sensitivity
from lowbit.analysis.sensitivity import Sensitivity, layer_bits, spearman
from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.models.modules import quantizable_layers


def measured(layers=2):
    model = tiny_llama(layers=layers, tie=False)
    with torch.no_grad():  # peaked output distributions, as in a trained model
        model.lm_head.weight.mul_(50.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = {n: m for n, m in quantizable_layers(model) if n != "lm_head"}
    specs = candidate_specs(WeightSpec(bits=4, group_size=32), ["2", "4", "8", "float"])
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(model, chosen, specs, windows, batch_size=2, progress=False)
    return model, before, sens


def test_every_layer_and_format_is_measured_and_the_model_is_left_as_it_was():
    model, before, sens = measured()
    assert set(sens.candidates) == {"int2", "int4", "int8", "float"} and sens.tokens == 128
    for name in sens.layers:
        kl = sens.damage[name]
        assert kl["int2"] > kl["int4"] > kl["int8"] >= 0.0
        assert sens.proxy[name]["int2"] > sens.proxy[name]["int8"]
        assert sens.bits[name]["int2"] < sens.bits[name]["int4"] < sens.bits[name]["float"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    rho = sens.rank_correlation()
    assert 0.3 < rho <= 1.0  # the proxy ranks (layer, format) pairs roughly as the KL does
    again = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert again.damage == sens.damage and again.bits == sens.bits
    assert again.candidates == sens.candidates and again.metric == "kl"


def test_bits_count_codes_and_scales():
    lin = torch.nn.Linear(64, 16)
    assert layer_bits(lin, WeightSpec(bits=4, group_size=32), "l") == 16 * 64 * 4 + 16 * 2 * 32
    assert layer_bits(lin, WeightSpec(format="fp16", bits=16), "l") == 16 * 64 * 16


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # NaN: too few pairs


def test_an_image_model_is_measured_by_its_output_error_convolutions_included():
    from helpers import convnet
    from lowbit.nn.quant_conv import layer_dims

    model = convnet()
    model.quantized_whole = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = {n: m for n, m in quantizable_layers(model, convs=True)}
    specs = candidate_specs(WeightSpec(bits=4, group_size=-1), ["2", "4", "8", "float"])
    images = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(model, layers, specs, images, progress=False,
                               output_range=(0.0, 1.0))  # fmt: skip
    assert sens.metric == "mse" and sens.tokens == 4 and set(sens.layers) == {"0", "2", "4"}
    for name, module in layers.items():
        mse = sens.damage[name]
        assert mse["int2"] > mse["int4"] > mse["int8"] > mse["float"] >= 0.0
        proxy = sens.proxy[name]
        if module.groups > 1:  # one input matrix per group: no Hessian proxy
            assert all(p != p for p in proxy.values())
        else:
            assert proxy["int2"] > proxy["int8"]
        rows, cols = layer_dims(module)
        assert sens.bits[name]["int8"] == 8 * rows * cols + 32 * rows  # codes, fp16 scale + zero
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sens.rank_correlation() > 0.5
    again = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert again.metric == "mse" and again.damage == sens.damage
    nan = again.proxy["2"]["int4"]
    assert again.proxy["0"] == sens.proxy["0"] and nan != nan  # NaN kept (null in JSON)
    with pytest.raises(LowbitError, match="output_range"):
        measure_sensitivity(model, layers, specs, images, progress=False)


def test_an_expert_no_analysis_token_reaches_takes_its_siblings_mean_damage():
    """Unreached experts would measure no damage and get the fewest bits; they take the mean
    of the same linear in the block's reached experts instead."""
    from helpers import tiny_moe
    from lowbit.models.experts import experts_to_linears

    model = tiny_moe("mixtral", num_local_experts=8, num_experts_per_tok=1)
    experts_to_linears(model)
    chosen = {n: m for n, m in quantizable_layers(model) if ".layers.1.mlp.experts." in n}
    specs = candidate_specs(WeightSpec(bits=4, group_size=32), ["2", "8"])
    windows = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(model, chosen, specs, windows, progress=False)
    downs = [f"model.layers.1.mlp.experts.{i}.down_proj" for i in range(8)]
    reached = set()
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: reached.add(n)) for n in downs]  # fmt: skip
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    assert 0 < len(reached) < 8  # 3 tokens, one expert each: some experts see none
    mean = {c: sum(sens.damage[n][c] for n in reached) / len(reached) for c in specs}
    assert mean["int2"] > 0
    for n in set(downs) - reached:
        assert sens.damage[n] == pytest.approx(mean)
