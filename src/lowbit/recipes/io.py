"""Recipes from presets and YAML files, and back to YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

from lowbit.errors import LowbitError
from lowbit.recipes.presets import preset_table
from lowbit.recipes.recipe import Recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset by name, or a recipe YAML file by path."""
    presets = preset_table()
    if str(name_or_path) in presets:
        return Recipe.from_dict(presets[str(name_or_path)][1], f"preset {name_or_path}")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise LowbitError(
            f"unknown recipe {str(name_or_path)!r}: not a preset ({', '.join(presets)}) "
            "and not a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{path}: not a text file; a recipe is YAML") from None
    return recipe_from_yaml(text, str(path))


def recipe_from_yaml(text: str, where: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise LowbitError(f"{where}: not valid YAML{at}") from None
    return Recipe.from_dict(data, where)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
