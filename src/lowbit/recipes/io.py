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


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently: a recipe with two ``weights:`` blocks would quantize with one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable key: PyYAML's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def as_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    """A Recipe, a preset name, a YAML path or a recipe mapping (as its YAML would read), as a
    Recipe; anything else is a one-line error."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    raise LowbitError(f"recipe: expected a preset name, a YAML path, a mapping or a Recipe, got "
                      f"{type(recipe).__name__}")  # fmt: skip


def recipe_from_yaml(text: str, where: str = "recipe") -> Recipe:
    try:
        data = yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader: no python tags
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or ""
        said = f": {problem}" if "twice" in problem else ""
        raise LowbitError(f"{where}: not valid YAML{at}{said}") from None
    return Recipe.from_dict(data, where)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
