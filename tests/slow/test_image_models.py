"""Real image models (downloaded once from PyPI): the ports reproduce the published quality and
8-bit quantization keeps it."""

import copy

import pytest
import torch

pytest.importorskip("torchmetrics", reason="image metrics need the image extra")
pytest.importorskip("skimage", reason="sample images need the image extra")

from helpers import make_recipe
from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.eval.image import evaluate_image
from lowbit.models.images import image_models
from lowbit.recipes import Recipe

pytestmark = pytest.mark.slow


def test_waifu2x_port_matches_the_published_quality_and_w8_keeps_it():
    entry = image_models()["waifu2x-upconv7"]
    model = entry.load()
    inputs, truth = entry.evaluation()
    base = evaluate_image(model, inputs, truth, None, entry.output_range)
    assert 33.2 < base["psnr"] < 33.6  # bicubic is about 30.5 dB on the same protocol
    q = copy.deepcopy(model)
    api.quantize(q, make_recipe({"bits": 8, "group_size": -1}, ignore=()), progress=False)
    assert evaluate_image(q, inputs, truth, None, entry.output_range)["psnr"] > base["psnr"] - 0.3


def test_dcgan_w8a8_static_samples_stay_within_30_db_of_float():
    entry = image_models()["dcgan-faces"]
    model = entry.load()
    q = copy.deepcopy(model)
    calib = image_calibration(entry.calibration(), "latents")
    api.quantize(q, "conv-w8a8-static", calib, progress=False)
    inputs, _ = entry.evaluation()
    assert evaluate_image(q, inputs, None, model, entry.output_range)["psnr_ref"] > 30


def test_waifu2x_upresnet10_port_matches_the_published_quality():
    entry = image_models()["waifu2x-upresnet10"]
    inputs, truth = entry.evaluation()
    result = evaluate_image(entry.load(), inputs, truth, None, entry.output_range)
    assert 33.3 < result["psnr"] < 33.7


def test_gptq_on_waifu2x_keeps_w4_groups_within_0_3_db():
    entry = image_models()["waifu2x-upconv7"]
    model = entry.load()
    inputs, truth = entry.evaluation()
    base = evaluate_image(model, inputs, truth, None, entry.output_range)["psnr"]
    recipe = api.load_recipe("w4-gptq-g64").to_dict()
    recipe |= {
        "weights": {**recipe["weights"], "group_size": 16},
        "ignore": [],
        "overrides": [{"match": "body.0", "weights": {"bits": 8, "group_size": -1}}],
    }
    calib = image_calibration(entry.calibration(), "crops")
    api.quantize(model, Recipe.from_dict(recipe), calib, progress=False)
    assert evaluate_image(model, inputs, truth, None, entry.output_range)["psnr"] > base - 0.3


def test_the_offline_inception_gives_a_distance_that_grows_with_the_damage():
    from lowbit.eval.frechet import frechet_distance
    from lowbit.models.images.inception import inception_extractor, inception_features

    entry = image_models()["dcgan-faces"]
    model, extractor = entry.load(), inception_extractor()
    z = entry.evaluation()[0][:128]
    with torch.inference_mode():
        ref = model(z).add(1).div(2)
        noisy = (ref + 0.05 * torch.randn_like(ref)).clamp(0, 1)
        noisier = (ref + 0.2 * torch.randn_like(ref)).clamp(0, 1)
    feats = inception_features(extractor, ref)
    assert feats.shape == (128, 2048) and bool(torch.isfinite(feats).all())
    near, far = (
        frechet_distance(feats, inception_features(extractor, x)) for x in (noisy, noisier)
    )
    assert 0 < near < far
