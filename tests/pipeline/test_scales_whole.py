"""SmoothQuant and AWQ on a model quantized whole: the convolution pairs found by tracing,
folding that leaves the float model unchanged, factors that lower the W8A8 (SmoothQuant) and
W4 (AWQ) error where channels differ in range, and the recipes a model without decoder blocks
refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.errors import LowbitError
from lowbit.models.fold import fold_scales
from lowbit.models.wiring import derive_family
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe

STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}


def upscaler(seed: int = 0) -> nn.Sequential:
    """Convolutions through LeakyReLUs and a ReLU, a grouped one, a transposed one in the middle
    and one at the end (every pair but the grouped one's can take factors: convolution to
    convolution, to transposed, transposed to transposed)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1, bias=False),
    ).eval()  # fmt: skip


def recipe(algorithm: str = "rtn", smooth: dict | None = None, bits: int = 8) -> Recipe:
    weights = {"bits": bits, "symmetric": bits == 8, "group_size": -1}
    body = {"version": 1, "name": "t", "algorithm": algorithm, "ignore": [], "weights": weights}
    if bits == 8:
        body["activations"] = STATIC
    if smooth is not None:
        body["smoothquant"] = smooth
    return Recipe.from_dict(body)


def test_tracing_a_whole_model_finds_the_convolution_pairs_that_fold_exactly():
    model, x = upscaler(), torch.rand(2, 3, 10, 10)
    wiring = derive_family(model, lambda: model(x))
    pairs = {(g.prev, g.linears) for g in wiring.scale_groups}
    # "0" feeds a grouped convolution and "2" is one: neither takes factors
    assert pairs == {("4", ("6",)), ("6", ("8",)), ("8", ("10",))}
    # in reading order; a grouped convolution is not traced (its channels meet other weights)
    assert [g for group in wiring.sequential for g in group] == ["0", "4", "6", "8", "10"]
    with torch.no_grad():
        before = model(x)
        for g in wiring.scale_groups:
            layers = [model.get_submodule(n) for n in g.linears]
            s = torch.rand(layers[0].in_channels) * 4 + 0.25
            fold_scales(model.get_submodule(g.prev), g.prev_kind, layers, s)
        after = model(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_a_convolution_feeding_a_linear_through_a_pool_is_not_folded_blindly():
    """Average pooling is linear, so the pair folds; a sigmoid between would not."""
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(6, 4)).eval()  # fmt: skip
    gated = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Sigmoid(), nn.Conv2d(6, 4, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    assert [(g.prev, g.linears) for g in derive_family(pooled, lambda: pooled(x)).scale_groups] == [
        ("0", ("4",))
    ]
    assert derive_family(gated, lambda: gated(x)).scale_groups == ()


def outlier_model() -> nn.Sequential:
    """A model whose middle activations have one channel 40x wider than the rest (the next
    convolution reads it with 40x smaller weights: the float function is ordinary)."""
    model = upscaler(seed=1)
    with torch.no_grad():
        model[4].weight[3].mul_(40.0)
        model[4].bias[3].mul_(40.0)
        model[6].weight[:, 3].div_(40.0)
    return model


def quantized_error(r: Recipe) -> tuple[float, object]:
    """Output SQNR (dB) of the outlier model quantized by ``r`` on held-out inputs; the report."""
    model, x = outlier_model(), torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    calib = image_calibration(torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(4)),
                              "random")  # fmt: skip
    with torch.no_grad():
        ref = model(x)
    report = api.quantize(model, r, calib, progress=False)
    with torch.no_grad():
        return sqnr_db(ref, model(x)), report


def w8a8_error(smooth: dict | None, algorithm: str = "rtn") -> tuple[float, dict]:
    db, report = quantized_error(recipe(algorithm, smooth))
    return db, report.smooth_alpha


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_smoothing_lowers_the_w8a8_error_of_a_convnet_with_an_outlier_channel(algorithm):
    plain, none = w8a8_error(None, algorithm)
    smoothed, alphas = w8a8_error({}, algorithm)
    assert none == {}
    assert set(alphas) == {"4", "6", "8"} and alphas["4"] is not None  # the outlier's pair
    assert smoothed > plain + 3  # dB


def test_a_fixed_alpha_is_folded_as_given_and_reported():
    _, alphas = w8a8_error({"alpha": 0.5})
    assert alphas == {"4": 0.5, "6": 0.5, "8": 0.5}


@pytest.mark.parametrize("algorithm", ["awq", "awq+gptq"])
def test_awq_lowers_the_w4_error_of_a_convnet_with_an_outlier_channel(algorithm):
    """The wide channel's small weights lose most to 4-bit per-channel rounding; AWQ's scales
    give them finer steps."""
    plain, report = quantized_error(recipe(algorithm.replace("awq+", "").replace("awq", "rtn"),
                                           bits=4))  # fmt: skip
    assert report.awq_alpha == {}
    scaled, report = quantized_error(recipe(algorithm, bits=4))
    assert set(report.awq_alpha) == {"4", "6", "8"} and report.awq_alpha["4"] is not None
    assert scaled > plain + 3  # dB


@pytest.mark.parametrize("body", [{"algorithm": "autoround"}, {"algorithm": "gptq", "lkd": {}}])
def test_a_model_without_blocks_refuses_block_steps_but_not_scales(body):
    calib = image_calibration(torch.rand(4, 3, 8, 8), "random")
    full = {"version": 1, "name": "t", "ignore": [], "weights": {"bits": 8, "group_size": -1},
            **body}  # fmt: skip
    with pytest.raises(LowbitError, match="AutoRound and LKD run block by block"):
        api.quantize(upscaler(), Recipe.from_dict(full), calib, progress=False)
    api.quantize(upscaler(), recipe("rtn", {}), calib, progress=False)
    api.quantize(upscaler(), recipe("awq", bits=4), calib, progress=False)


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_the_search_never_raises_the_rounded_models_output_error_on_its_batch(method):
    from lowbit.pipeline.scales_whole import _OutputError, awq_whole, smooth_whole

    for seed in range(3):
        if method == "smoothquant":
            model, r = upscaler(seed), recipe("rtn", {})
        else:
            model, r = upscaler(seed), recipe("awq", bits=4)
        images = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
        calib = image_calibration(images, "random")
        plan = {
            n: r.weights
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        }
        before = _OutputError(model, plan, r.activations, calib.windows)()
        if method == "smoothquant":
            smooth_whole(model, plan, r.activations, r.smoothquant, calib, batch_size=8)
        else:
            awq_whole(model, plan, r.activations, r.awq, calib, batch_size=8)
        assert _OutputError(model, plan, r.activations, calib.windows)() <= before
