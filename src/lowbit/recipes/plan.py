"""A recipe applied to one model's layers: the per-layer spec table, validated up front."""

from __future__ import annotations

import logging

from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.nn.quant_conv import layer_dims
from lowbit.recipes.recipe import Override, Recipe

log = logging.getLogger(__name__)


HEAD = "lm_head"  # what recipes call a model's output head, whatever its own name


def plan_layers(
    recipe: Recipe, layers: list[tuple[str, nn.Linear]], warn: bool = True,
    head: str | None = None,
) -> dict[str, WeightSpec]:  # fmt: skip
    """layer name -> spec for every layer the recipe quantizes (in model order).

    Fails before any work is done if a spec does not fit a layer (e.g. a group size that does not
    divide its input size), naming the layer; warns (with ``warn``) about overrides that match
    nothing. ``head``: the name of the model's output head
    (:func:`lowbit.models.modules.output_head`), which the recipe's ``lm_head`` patterns match.
    """
    if not layers:
        raise LowbitError("the model has no nn.Linear or nn.Conv2d layers to quantize")
    plan = {}
    for name, module in layers:
        spec = recipe.spec_for(name, alias=HEAD if name == head and name != HEAD else None)
        if spec is None:
            continue
        dims = layer_dims(module, name)
        weight_block(spec, *dims, name)  # raises if unfit
        if spec.lorc_rank >= min(dims):
            raise LowbitError(f"{name}: lorc_rank {spec.lorc_rank} is not below the layer's "
                              f"smaller side ({min(dims)}): its factors would hold more than "
                              f"the weight; lower the rank")  # fmt: skip
        plan[name] = spec
    names = [n for n, _ in layers]
    names += [HEAD] if head in names else []
    for pattern in (*recipe.ignore, *(o.match for o in recipe.overrides)) if warn else ():
        if not any(Override(pattern).matches(n) for n in names):
            log.warning("recipe pattern %r matches no layer of this model", pattern)
    if not plan and recipe.attention is None and recipe.rotate is None:
        raise LowbitError("the recipe leaves every layer in float; nothing to quantize")
    return plan
