import math

import torch

from helpers import tiny_llama
from lowbit.calibration import CalibrationSet
from lowbit.pipeline import quantize_weights
from lowbit.recipes import Recipe

TWO_BIT = "model.layers.1.mlp.gate_proj"


def test_output_sqnr_on_calibration_data_singles_out_a_coarse_layer():
    model = tiny_llama(layers=2)
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_dict({
        "version": 1, "weights": {"bits": 8, "symmetric": True, "group_size": -1},
        "ignore": ["lm_head"],
        "overrides": [{"match": TWO_BIT, "weights": {"bits": 2, "group_size": 32,
                                                     "symmetric": False}}],
    })  # fmt: skip
    report = quantize_weights(model, recipe, CalibrationSet("r", 4, 32, 0, windows), False)
    sqnr = {n: layer.output_sqnr_db for n, layer in report.layers.items()}
    assert all(math.isfinite(v) for v in sqnr.values())
    assert min(sqnr, key=sqnr.get) == TWO_BIT and sqnr[TWO_BIT] < 20 < min(
        v for n, v in sqnr.items() if n != TWO_BIT
    )
    assert report.layers[TWO_BIT].to_dict()["output_sqnr_db"] == round(sqnr[TWO_BIT], 3)


def test_no_calibration_no_output_sqnr():
    report = quantize_weights(tiny_llama(layers=1), Recipe.from_dict({"version": 1}), None, False)
    assert all(layer.output_sqnr_db is None for layer in report.layers.values())
