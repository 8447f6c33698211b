import dataclasses

import pytest

from helpers import TRACED
from lowbit.errors import LowbitError
from lowbit.recipes import load_recipe, preset_table, recipe_from_yaml, recipe_to_yaml


@pytest.mark.parametrize("name", list(preset_table()))
def test_every_preset_loads_and_round_trips(name):
    r = load_recipe(name)
    assert r.name == name
    assert recipe_from_yaml(recipe_to_yaml(r)) == r
    head = r.spec_for("lm_head")
    if name.endswith("-head8"):  # the presets that store the output head otherwise
        assert head.bits == 8 and head.symmetric
    elif name.endswith("-head16"):
        assert head.format == "fp16"
    elif name.startswith("conv-"):  # image models: no language-model head to keep
        assert r.ignore == ()
    else:
        assert head is None


def test_unknown_recipe_names_the_presets():
    with pytest.raises(LowbitError, match="w4-rtn-g64"):
        load_recipe("w5-magic")


def test_recipe_from_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nweights: {bits: 3, group_size: 32}\n")
    assert load_recipe(path).weights.bits == 3


@pytest.mark.parametrize("family", TRACED)
def test_the_best_preset_runs_on_every_family(family, tmp_path):
    """`w4-g64-best` (rotation with an online part, GPTQ, tuned scales) as a user runs it on
    each family CI builds: quantize, save, load, generate. Families it cannot rotate fully
    (Gemma 2/3, OPT, GPT-2) go without what they cannot take (rotate.if_possible)."""
    import torch

    from helpers import tiny_family_model
    from lowbit import api
    from lowbit.calibration import CalibrationSet
    from lowbit.runtime import Runtime

    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet("random", 8, 32, 0, torch.randint(0, 64, (8, 32), generator=g))
    model = tiny_family_model(family)
    ids = torch.randint(0, 64, (1, 12), generator=g)
    recipe = load_recipe("w4-g64-best")
    recipe = dataclasses.replace(recipe, tune=dataclasses.replace(recipe.tune, steps=4))
    report = api.quantize(model, recipe, calib, progress=False)
    with torch.no_grad():
        mem = model(ids).logits
        loaded = api.load(api.save(model, tmp_path / "q", report), kernels=False).model
        assert torch.allclose(loaded(ids).logits, mem, atol=1e-5)
    out = Runtime(loaded).generate([ids[0].tolist()], 4)
    assert len(out.tokens[0]) == 4
