import itertools

import pytest

from lowbit.analysis import allocate, allocation_recipe, candidate_specs, parse_size
from lowbit.analysis.sensitivity import Sensitivity
from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.recipes import Recipe

BASE = WeightSpec(bits=4, group_size=64)


def synthetic(n=6):
    specs = candidate_specs(BASE, ["2", "4", "8", "float"])
    sens = Sensitivity({f"l{i}": 1000 for i in range(n)}, specs)
    bpw = {"int2": 2.5, "int4": 4.5, "int8": 8.5, "float": 16}
    for i in range(n):
        w = 1.0 + i  # later layers matter more
        sens.damage[f"l{i}"] = {"int2": 4 * w, "int4": w / 2, "int8": w / 50, "float": 0.0}
        sens.bits[f"l{i}"] = {c: int(1000 * b) for c, b in bpw.items()}
        sens.proxy[f"l{i}"] = dict(sens.damage[f"l{i}"])
    return sens


def brute_force(sens, budget):
    layers, cands = list(sens.layers), list(sens.candidates)
    best = None
    for combo in itertools.product(cands, repeat=len(layers)):
        bits = sum(sens.bits[n][c] for n, c in zip(layers, combo, strict=True))
        if bits <= budget:
            dmg = sum(sens.damage[n][c] for n, c in zip(layers, combo, strict=True))
            best = dmg if best is None else min(best, dmg)
    return best


@pytest.mark.parametrize("above", [0, 1, 7])
def test_a_budget_at_the_cheapest_mix_is_met_whatever_the_rounding(above):
    """Costs that are no multiple of the grid's step: the cheapest mix (the budget's floor)
    is still found, and a few bits more pick nothing that breaks the budget."""
    sens = synthetic(5)
    for i, name in enumerate(sens.layers):
        sens.bits[name] = {c: b + 3 * i + 1 for c, b in sens.bits[name].items()}
    least = sum(sens.bits[n]["int2"] for n in sens.layers)
    choice = allocate(sens, least + above)
    assert sum(sens.bits[n][c] for n, c in choice.items()) <= least + above
    assert set(choice.values()) == {"int2"}


@pytest.mark.parametrize("bpw", [2.5, 3.5, 4.25, 6.0, 12.0])
def test_the_choice_respects_the_budget_and_is_optimal(bpw):
    sens = synthetic(5)
    budget = bpw * 5000
    choice = allocate(sens, budget, resolution=20000)
    assert sum(sens.bits[n][c] for n, c in choice.items()) <= budget
    damage = sum(sens.damage[n][c] for n, c in choice.items())
    assert damage == pytest.approx(brute_force(sens, budget), rel=1e-9, abs=1e-12)


def test_sensitive_layers_get_the_wider_formats():
    choice = allocate(synthetic(), 4.5 * 6000)
    order = ["int2", "int4", "int8", "float"]
    ranks = [order.index(choice[f"l{i}"]) for i in range(6)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_a_budget_below_the_narrowest_mix_names_the_minimum():
    with pytest.raises(LowbitError, match="at least 2.500 bits/weight"):
        allocate(synthetic(), 2.0 * 6000)


def test_the_choice_becomes_a_readable_recipe():
    sens = synthetic(3)
    base = Recipe.from_dict({"version": 1, "name": "w4", "weights": BASE.to_dict(),
                             "ignore": ["lm_head"]})  # fmt: skip
    recipe = allocation_recipe(base, sens, {"l0": "int2", "l1": "int4", "l2": "float"})
    assert recipe.spec_for("l0").bits == 2 and recipe.spec_for("l1") == BASE
    assert recipe.spec_for("l2").format == "fp16" and recipe.spec_for("lm_head") is None
    assert [o.match for o in recipe.overrides] == ["l0", "l1", "l2"]
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_the_base_recipes_overrides_and_lorc_do_not_take_a_choice_back():
    """Priced as chosen: a base override matching a layer left at the default grid (8-bit
    down_proj) and the default's LoRC rank (the candidates have none) must not apply to it."""
    sens = synthetic(2)
    lorc = {**BASE.to_dict(), "lorc_rank": 8}
    eight = [{"match": "re:l.*", "weights": {"bits": 8}}]
    base = Recipe.from_dict({"version": 1, "name": "b", "weights": lorc, "overrides": eight})
    recipe = allocation_recipe(base, sens, {"l0": "int2", "l1": "int4"})
    assert recipe.spec_for("l0") == sens.candidates["int2"]
    assert recipe.spec_for("l1") == BASE and recipe.spec_for("l1").lorc_rank == 0
    assert recipe.spec_for("l9").bits == 8  # layers outside the choice: the base's rules


def test_sizes_and_candidates_parse_with_clear_errors():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("2048") == 2048
    with pytest.raises(LowbitError, match="60MB"):
        parse_size("sixty")
    with pytest.raises(LowbitError, match="a width and group"):
        candidate_specs(BASE, ["4", "fp"])
    specs = candidate_specs(BASE, ["3", "4g192", "4ch", "float"])
    assert specs["int3"].group_size == 64 and specs["int4g192"].group_size == 192
    assert specs["int4ch"].granularity == "channel" and specs["float"].format == "fp16"
    with pytest.raises(LowbitError, match="at least two"):
        candidate_specs(BASE, ["4"])


def test_a_default_grid_that_does_not_fit_an_overridden_layer_is_named_before_measuring():
    """The candidates take the recipe's default grid; where an override gave a layer a grid
    that fits and the default's does not, the error names the override, not only the layer."""
    from torch import nn

    from lowbit.analysis import check_candidates

    q32 = {"match": "q", "weights": {"group_size": 32}}
    recipe = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 128},
                               "overrides": [q32]})  # fmt: skip
    specs = candidate_specs(recipe.weights, ["2", "4", "float"])
    check_candidates({"wide": nn.Linear(256, 8)}, specs, recipe)  # 128 divides 256: fine
    with pytest.raises(LowbitError, match=r"not q's override \(int4-asym-g32\)"):
        check_candidates({"q": nn.Linear(64, 8)}, specs, recipe)
    with pytest.raises(LowbitError, match="does not divide in_features 64 of layer k") as info:
        check_candidates({"k": nn.Linear(64, 8)}, specs, recipe)
    said = str(info.value)
    assert "override" not in said and "candidate int2 (int2-asym-g128)" in said
    # a candidate of its own group size, no override: the candidate is named, not an override
    plain = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 32}})
    wide = candidate_specs(plain.weights, ["4g192", "float"])
    with pytest.raises(LowbitError, match=r"candidate int4g192 \(int4-asym-g192\)") as info:
        check_candidates({"k": nn.Linear(64, 8)}, wide, plain)
    assert "override" not in str(info.value)
