"""A recipe's plan for one model: its quantizable layers, with the output head named."""

from __future__ import annotations

from torch import nn

from lowbit.formats.spec import WeightSpec
from lowbit.models.modules import output_head, quantizable_layers
from lowbit.recipes import Recipe, plan_layers

Layers = list[tuple[str, nn.Module]]


def plan_model(recipe: Recipe, model: nn.Module, convs: bool = False,
               warn: bool = True) -> tuple[Layers, dict[str, WeightSpec]]:  # fmt: skip
    """(the model's quantizable layers, the recipe's spec for each it quantizes): what every
    run plans on, the recipe's ``lm_head`` matching the model's head under any name."""
    layers = quantizable_layers(model, convs=convs)
    return layers, plan_layers(recipe, layers, warn=warn, head=output_head(model))
