"""AutoRound through the pipeline: learned rounding per block, packed, saved and loaded."""

import pytest
import torch

from helpers import tiny_family_model
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
from lowbit.recipes import Recipe


def calib(vocab=64):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet("random", 8, 32, 0, torch.randint(0, vocab, (8, 32), generator=g))


def recipe(algorithm="autoround", bits=3, **options):
    return Recipe.from_dict({
        "version": 1, "algorithm": algorithm, "ignore": ["lm_head"],
        "weights": {"bits": bits, "group_size": 32},
        "autoround": {"iters": 12, "batch_size": 2, **options},
        "awq": {"search_samples": 4, "grid": 5},
    })  # fmt: skip


def output_error(model, reference, ids):
    with torch.no_grad():
        y = model(ids).logits
    return float((y - reference).pow(2).mean() / reference.pow(2).mean())


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_every_block_ends_closer_to_its_float_outputs_than_rounding_to_nearest(family):
    model = tiny_family_model(family)
    report = quantize_weights(model, recipe(), calib(), progress=False)
    assert len(report.autoround) == 2  # one record per block
    for losses in report.autoround.values():  # a run that learned nothing is undone: equal
        assert losses["loss_after"] < losses["loss_before"]
    assert report.layers and all(
        isinstance(model.get_submodule(n), QuantLinear) for n in report.layers
    )


def test_the_model_is_closer_to_float_than_rtn():
    """(Two runs giving the same codes: tests/algorithms/test_autoround.py.)"""
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny_family_model("llama")(ids).logits
    errors = {}
    for algorithm in ("rtn", "autoround"):
        model = tiny_family_model("llama")
        data = recipe(algorithm, iters=50)
        if algorithm == "rtn":  # round to nearest, calibrated only for the block diagnostics
            data = Recipe.from_dict({**data.to_dict(), "algorithm": "rtn"})
        quantize_weights(model, data, calib(), progress=False)
        errors[algorithm] = output_error(model, reference, ids)
    assert errors["autoround"] < 0.8 * errors["rtn"]


def test_awq_then_autoround_runs_and_records_both(tmp_path, tiny_folder):
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, recipe("awq+autoround", bits=4), calib(vocab=50))
    assert report.awq_alpha and len(report.autoround) == 2
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded = api.load(out, kernels=False)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, src.model(ids).logits)
    assert loaded.manifest["autoround"].keys() == report.autoround.keys()
    assert loaded.manifest["recipe"]["autoround"]["iters"] == 12


def test_recipes_keep_the_options_and_refuse_what_cannot_learn():
    again = Recipe.from_dict(recipe(minmax=False).to_dict())
    assert again.autoround.iters == 12 and not again.autoround.minmax and again.needs_calibration
    assert "autoround" not in Recipe.from_dict({"version": 1, "algorithm": "gptq"}).to_dict()
    with pytest.raises(LowbitError, match="integer grids"):
        Recipe.from_dict({"version": 1, "algorithm": "autoround", "weights": {"format": "nf4"}})
    nf4 = {"match": "re:.*down_proj", "weights": {"format": "nf4"}}
    with pytest.raises(LowbitError, match=r"overrides\[0\].*integer grids"):
        Recipe.from_dict({"version": 1, "algorithm": "autoround", "overrides": [nf4]})
    with pytest.raises(LowbitError, match="LoRC"):
        Recipe.from_dict({"version": 1, "algorithm": "autoround", "lorc": {"rank": 4}})
    with pytest.raises(LowbitError, match="autoround.iters"):
        Recipe.from_dict({"version": 1, "algorithm": "autoround", "autoround": {"iters": "x"}})
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_weights(tiny_family_model("llama"), recipe(), None, progress=False)
    assert api.load_recipe("w4-autoround-g64").algorithm == "autoround"
