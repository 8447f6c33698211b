import pytest

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
