"""Automatic bit allocation: the per-layer formats that minimise the summed measured damage
under a budget of stored bits, written as an ordinary recipe with per-layer overrides.

The choice is a multiple-choice knapsack. It is solved exactly by dynamic programming over the
budget cut into ``resolution`` units (20,000 by default), each layer's cost rounded *up* to
whole units, so the chosen mixture never exceeds the budget (it may leave up to one unit per
layer unused: 1% of the budget for 200 layers). The damages are summed: quantizing layers
together is assumed to cost roughly the sum of quantizing each alone, the usual first-order
assumption (HAWQ, llama.cpp's importance-weighted mixes).
"""

from __future__ import annotations

import math
import re

import numpy as np
from torch import nn

from lowbit.analysis.sensitivity import Sensitivity
from lowbit.errors import LowbitError
from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.nn.quant_conv import weight_matrix
from lowbit.recipes import Recipe

FLOAT = "float"  # the "leave in float" candidate, stored as fp16 so that it counts in the budget


def candidate_specs(base: WeightSpec, choices: list[str]) -> dict[str, WeightSpec]:
    """Candidate name -> spec. A choice is a bit width at the base spec's grid and group size
    (``3``), a width and group size (``4g192``), a width per channel (``4ch``), or ``float``
    (fp16 storage)."""
    out = {}
    for choice in choices:
        if choice == FLOAT:
            out[FLOAT] = WeightSpec(format="fp16", bits=16)
            continue
        m = re.fullmatch(r"([1-8])(?:g([0-9]+)|(ch))?", choice)
        if not m:
            raise LowbitError(f"--candidates: expected a bit width (3), a width and group (4g64), "
                              f"a width per channel (4ch) or 'float', got {choice!r}")  # fmt: skip
        changes = {"bits": int(m.group(1)), "lorc_rank": 0}
        if m.group(2) or m.group(3):
            changes |= {"granularity": None, "group_size": int(m.group(2) or -1)}
        spec = WeightSpec.from_dict({**base.to_dict(), **changes}, f"candidate {choice}")
        out[f"int{choice}"] = spec
    if len(out) < 2:
        raise LowbitError("--candidates: give at least two formats to choose between")
    return out


def check_candidates(layers: dict[str, nn.Module], specs: dict[str, WeightSpec],
                     recipe: Recipe) -> None:  # fmt: skip
    """Every candidate's grid fits every layer, checked before any measuring. The candidates
    are the recipe's default grid at each width, so where a layer's own override gives it a grid
    the default's groups do not fit, the error says so (not only "exclude the layer")."""
    for name, module in layers.items():
        out_features, in_features = weight_matrix(module).shape[:2]
        for cname, spec in specs.items():
            try:
                weight_block(spec, out_features, in_features, name)
            except LowbitError as exc:
                own = recipe.spec_for(name)
                if own is not None and own != recipe.weights:  # the layer has an override
                    raise LowbitError(f"{exc}; the candidates take the recipe's default grid "
                                      f"({recipe.weights.short()}), not {name}'s override "
                                      f"({own.short()}): give a default that fits every "
                                      f"layer") from None  # fmt: skip
                raise LowbitError(f"candidate {cname} ({spec.short()}): {exc}; choose "
                                  "candidates that fit every layer") from None  # fmt: skip


def parse_size(text: str, option: str = "--target-size") -> int:
    """Bytes from '60MB', '1.5GiB', '500kB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKMGT]?i?[bB]?)\s*", text)
    if not m:
        raise LowbitError(f"{option}: expected a size like 60MB or 1.5GiB, got {text!r}")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def allocate(sens: Sensitivity, budget_bits: float, resolution: int = 20000) -> dict[str, str]:
    """layer -> candidate minimising the summed damage (KL or MSE) with total stored bits
    <= ``budget_bits`` (found on a grid of ``resolution`` steps of the bits the budget leaves
    above the cheapest mix)."""
    layers, cands = list(sens.layers), list(sens.candidates)
    cost = np.array([[sens.bits[n][c] for c in cands] for n in layers], dtype=np.float64)
    damage = np.array([[sens.damage[n][c] for c in cands] for n in layers], dtype=np.float64)
    least = cost.min(1).sum()
    if budget_bits < least:
        n = sum(sens.layers.values())
        raise LowbitError(
            f"the budget is below the smallest candidate mix: at least {least / n:.3f} "
            f"bits/weight ({least / 8 / 1e6:.2f} MB for these layers); raise it or add a "
            f"narrower candidate"
        )
    # the knapsack runs on each layer's bits above its cheapest candidate, rounded up to
    # units of the budget left above the cheapest mix: that mix (excess 0) always fits, and a
    # mix it picks fits the budget whatever the rounding
    excess = cost - cost.min(1, keepdims=True)
    unit = max(budget_bits - least, 1e-9 * budget_bits) / resolution
    units = np.ceil(excess / unit - 1e-9).astype(np.int64)
    best = np.zeros(resolution + 1)  # best[b]: least damage of the layers so far within b units
    picks = np.zeros((len(layers), resolution + 1), dtype=np.int16)
    for i in range(len(layers)):
        new = np.full(resolution + 1, math.inf)
        for j in range(len(cands)):
            u = units[i, j]
            if u > resolution:
                continue
            shifted = np.full(resolution + 1, math.inf)
            shifted[u:] = best[: resolution + 1 - u] + damage[i, j]
            better = shifted < new
            new[better], picks[i, better] = shifted[better], j
        best = new
    if not np.isfinite(best[resolution]):
        raise LowbitError("no candidate mix fits the budget at this resolution; raise the budget")
    choice, b = {}, resolution
    for i in range(len(layers) - 1, -1, -1):
        j = int(picks[i, b])
        choice[layers[i]] = cands[j]
        b -= int(units[i, j])
    return dict(reversed(list(choice.items())))


def allocation_recipe(base: Recipe, sens: Sensitivity, choice: dict[str, str]) -> Recipe:
    """``base`` with one exact-name override per allocated layer, first: every key given (the
    chosen spec, not merged over the default's LoRC rank), even where it is the default (a
    base override matching the layer, e.g. ``re:.*down_proj`` -> 8 bits, would take it back
    and break the budget the choice was priced at)."""
    chosen = [{"match": layer, "weights": {**sens.candidates[c].to_dict(),
                                           "lorc_rank": sens.candidates[c].lorc_rank}}
              for layer, c in choice.items()]  # fmt: skip
    overrides = [*chosen, *base.to_dict()["overrides"]]
    data = base.to_dict() | {"overrides": overrides}
    data["name"] = f"{base.name or 'recipe'}-mixed"
    return Recipe.from_dict(data)
