"""Recipes: typed quantization plans, YAML, presets, and per-layer resolution."""

from lowbit.recipes.io import as_recipe, load_recipe, recipe_from_yaml, recipe_to_yaml
from lowbit.recipes.plan import plan_layers
from lowbit.recipes.presets import preset_table
from lowbit.recipes.recipe import Override, Recipe

__all__ = [
    "Override",
    "Recipe",
    "as_recipe",
    "load_recipe",
    "plan_layers",
    "preset_table",
    "recipe_from_yaml",
    "recipe_to_yaml",
]
