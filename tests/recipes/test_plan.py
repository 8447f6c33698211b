import logging

import pytest
from torch import nn

from lowbit.errors import LowbitError
from lowbit.recipes import Recipe, plan_layers


def layers():
    return [
        ("a.q", nn.Linear(576, 576)),
        ("a.down", nn.Linear(1536, 576)),
        ("lm_head", nn.Linear(576, 100)),
    ]


def test_plan_resolves_every_layer():
    r = Recipe.from_dict(
        {"version": 1, "weights": {"bits": 4, "group_size": 64}, "ignore": ["lm_head"]}
    )
    plan = plan_layers(r, layers())
    assert list(plan) == ["a.q", "a.down"]


def test_lm_head_patterns_match_a_head_under_another_name(caplog):
    """BioGPT's head is ``output_projection``: presets that keep ``lm_head`` float keep it
    float, and an override of ``lm_head`` reaches it."""
    named = [*layers()[:2], ("output_projection", nn.Linear(576, 100))]
    keep = Recipe.from_dict(
        {"version": 1, "weights": {"bits": 4, "group_size": 64}, "ignore": ["lm_head"]}
    )
    with caplog.at_level(logging.WARNING):
        assert list(plan_layers(keep, named, head="output_projection")) == ["a.q", "a.down"]
    assert "matches no layer" not in caplog.text
    assert "output_projection" in plan_layers(keep, named)  # (not known as the head)
    with caplog.at_level(logging.WARNING):  # a head kept out of the layers (Mamba's): warned
        plan_layers(keep, named[:2], head="output_projection")
    assert "'lm_head' matches no layer" in caplog.text
    head8 = Recipe.from_dict(
        {"version": 1, "weights": {"bits": 4, "group_size": 64},
         "overrides": [{"match": "lm_head", "weights": {"bits": 8}}]}
    )  # fmt: skip
    assert plan_layers(head8, named, head="output_projection")["output_projection"].bits == 8


def test_group_size_that_does_not_divide_fails_before_work_naming_the_layer():
    r = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 128}})
    with pytest.raises(LowbitError, match="layer a.q"):
        plan_layers(r, layers())


def test_override_matching_nothing_warns(caplog):
    r = Recipe.from_dict({"version": 1, "overrides": [{"match": "re:.*nothing", "weights": None}]})
    with caplog.at_level(logging.WARNING):
        plan_layers(r, layers())
    assert "matches no layer" in caplog.text


def test_all_float_is_an_error():
    with pytest.raises(LowbitError, match="nothing to quantize"):
        plan_layers(Recipe.from_dict({"version": 1, "weights": None}), layers())


def test_a_lorc_rank_as_large_as_the_layer_is_refused():
    big = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 64},
                            "lorc": {"rank": 100}, "ignore": ["lm_head"]})  # fmt: skip
    assert list(plan_layers(big, layers())) == ["a.q", "a.down"]  # 100 < 576
    huge = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 64},
                             "lorc": {"rank": 576}})  # fmt: skip
    with pytest.raises(LowbitError, match="a.q: lorc_rank 576 is not below the layer's smaller"):
        plan_layers(huge, layers())
