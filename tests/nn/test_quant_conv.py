"""Quantized convolutions: the matrix view of a conv weight, packed storage, the forward, and a
whole convnet quantized through the same pipeline as linears."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import convnet, make_recipe
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.nn import QuantConv
from lowbit.nn.quant_conv import ConvGeometry, input_gram, input_rows, layer_dims, weight_matrix
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe


@pytest.mark.parametrize("index", [0, 2, 4])
def test_the_matrix_view_round_trips_and_computes_the_conv(index):
    conv = convnet()[index]
    g = ConvGeometry.of(conv)
    m = weight_matrix(conv)
    assert tuple(m.shape) == layer_dims(conv) == g.shape
    assert torch.equal(g.weight(m), conv.weight)
    x = torch.randn(2, conv.in_channels, 7, 9)
    torch.testing.assert_close(g.apply(x, g.weight(m), conv.bias), conv(x))


@pytest.mark.parametrize("weights", [{"bits": 8, "group_size": -1}, {"bits": 4, "group_size": 8},
                                     {"bits": 4, "group_size": -1, "symmetric": True}])  # fmt: skip
def test_a_convnet_quantizes_like_linears_and_computes_with_its_codes(weights):
    model, x = convnet(), torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    grouped = weights.get("group_size", -1) > 0  # the first conv has 27 inputs: left in float
    layers = (2, 4) if grouped else (0, 2, 4)
    report = api.quantize(model, make_recipe(weights, ignore=("0",) if grouped else ()),
                          progress=False)  # fmt: skip
    assert all(isinstance(model[i], QuantConv) for i in layers)
    assert len(report.layers) == len(layers) and isinstance(model[0], QuantConv) != grouped
    assert report.layers["4"].out_features == 3 and report.layers["4"].in_features == 32 * 16
    for i in layers:  # exactly the float conv holding the dequantized weight
        q, y = model[i], torch.randn(1, model[i].geometry.in_channels, 6, 6)
        w = q.geometry.weight(q.dequantized_weight())
        expect = (F.conv_transpose2d(y, w, None, 2, 1) if i == 4 else
                  F.conv2d(y, w, q.bias, 1, 1, 1, q.geometry.groups))  # fmt: skip
        assert torch.equal(q(y), expect)
    with torch.no_grad():
        out = model(x)
    assert sqnr_db(ref, out) > (35 if weights["bits"] == 8 else 15)
    assert model[2].bits_per_weight() <= weights["bits"] + 4  # packed: scale overhead only


def test_activations_of_a_conv_are_per_tensor():
    per_token = {"bits": 8, "granularity": "token", "dynamic": True}
    with pytest.raises(LowbitError, match="rounded per tensor"):
        api.quantize(convnet(), make_recipe({"bits": 8, "group_size": -1}, per_token),
                     progress=False)  # fmt: skip
    model, x = convnet(), torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    per_tensor = {"bits": 8, "granularity": "tensor", "dynamic": True}
    api.quantize(model, make_recipe({"bits": 8, "group_size": -1}, per_tensor), progress=False)
    with torch.no_grad():
        assert sqnr_db(ref, model(x)) > 25


def test_unfit_groups_and_unsupported_convs_are_named():
    with pytest.raises(LowbitError, match="0"):  # 3 * 9 = 27 inputs per channel: no group of 16
        api.quantize(convnet(), make_recipe({"bits": 4, "group_size": 16}, ignore=()),
                     progress=False)  # fmt: skip
    w8 = make_recipe({"bits": 8, "group_size": -1}, ignore=())
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(LowbitError, match="^1: grouped transposed"):  # (the name was empty)
        api.quantize(grouped, w8, progress=False)
    same = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3, padding="same"))
    with pytest.raises(LowbitError, match="^1: padding 'same'"):
        api.quantize(same, w8, progress=False)


def test_static_per_tensor_ranges_calibrate_on_images():
    from lowbit.calibration import image_calibration

    model, x = convnet(), torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    acts = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}
    recipe = make_recipe({"bits": 8, "group_size": -1}, acts, ignore=())
    with pytest.raises(LowbitError, match="calibration"):
        api.quantize(model, recipe, progress=False)
    images = image_calibration(torch.rand(4, 3, 10, 10), "noise")
    report = api.quantize(model, recipe, images, progress=False)
    assert all(bool(torch.isfinite(model[i].act_scale).all()) for i in (0, 2, 4))
    assert report.calibration.describe()["shape"] == [3, 10, 10]
    assert all(layer.output_sqnr_db > 20 for layer in report.layers.values())
    with torch.no_grad():
        assert sqnr_db(ref, model(x)) > 25
    with pytest.raises(LowbitError, match="float"):
        image_calibration(torch.zeros(2, 5, dtype=torch.long), "ids")


def test_geometry_round_trips_through_the_manifest_and_bad_entries_are_named():
    for conv in (convnet()[2], convnet()[4]):
        g = ConvGeometry.of(conv)
        assert ConvGeometry.from_dict(g.to_dict()) == g
    bad = {**ConvGeometry.of(convnet()[0]).to_dict(), "stride": [1, -1]}
    with pytest.raises(LowbitError, match="conv.stride"):
        ConvGeometry.from_dict(bad)
    with pytest.raises(LowbitError, match="groups"):
        ConvGeometry.from_dict({**ConvGeometry.of(convnet()[0]).to_dict(), "groups": 2})


@pytest.mark.parametrize("conv", [
    nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.Conv2d(5, 7, (3, 2), padding=(2, 0), dilation=2),
    nn.ConvTranspose2d(5, 7, 4, stride=2, padding=3, bias=False),
    nn.ConvTranspose2d(5, 7, (5, 3), stride=(3, 2), padding=(1, 2), dilation=(2, 1),
                       output_padding=(1, 0)),
])  # fmt: skip
def test_patches_times_the_matrix_is_the_conv_and_the_gram_skips_spread_zeros(conv):
    x = torch.randn(2, 5, 9, 11)
    g, rows = ConvGeometry.of(conv), input_rows(conv, x)
    with torch.no_grad():
        expect = conv(x) - (0 if conv.bias is None else conv.bias.view(1, -1, 1, 1))
        got = rows @ g.matrix(conv.weight).T
    torch.testing.assert_close(got, expect.permute(0, 2, 3, 1).reshape(-1, 7))
    gram, count = input_gram(conv, x)
    assert count == rows.shape[0]
    torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-5, atol=1e-3)
    with pytest.raises(LowbitError, match="grouped"):
        ConvGeometry.of(nn.Conv2d(4, 4, 3, groups=2)).patches(torch.randn(1, 4, 5, 5))


def test_gptq_quantizes_a_convnet_whole_and_beats_rtn():
    from lowbit.calibration import image_calibration

    images = image_calibration(torch.rand(6, 3, 12, 12), "noise")
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        ref = convnet()(x)
    errors = {}
    for algorithm in ("rtn", "gptq"):
        model = convnet()
        body = {"version": 1, "name": algorithm, "algorithm": algorithm,
                "weights": {"bits": 3, "group_size": -1}}  # fmt: skip
        report = api.quantize(model, Recipe.from_dict(body), images, progress=False)
        assert set(report.layers) == {"0", "2", "4"}  # the grouped conv: RTN inside GPTQ
        with torch.no_grad():
            errors[algorithm] = sqnr_db(ref, model(x))
    assert errors["gptq"] > errors["rtn"] + 1.0
    learned = Recipe.from_dict({"version": 1, "name": "a", "algorithm": "autoround",
                                "weights": {"bits": 4, "group_size": -1}})  # fmt: skip
    with pytest.raises(LowbitError, match="takes GPTQ, AWQ .awq, awq.gptq. or data-free"):
        api.quantize(convnet(), learned, images, progress=False)


def test_gptq_on_too_few_calibration_rows_says_so(caplog):
    from lowbit.calibration import image_calibration

    body = {
        "version": 1,
        "name": "g",
        "algorithm": "gptq",
        "weights": {"bits": 4, "group_size": -1},
    }
    few = image_calibration(torch.rand(1, 3, 4, 4), "one small image")  # 16 rows, 27 inputs
    with caplog.at_level("WARNING", logger="lowbit.pipeline.whole"):
        api.quantize(convnet(), Recipe.from_dict(body), few, progress=False)
    assert "calibration rows for 27 inputs" in caplog.text
