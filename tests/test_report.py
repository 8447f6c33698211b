"""`lowbit report`'s variants: named by a recipe's name or its file's stem, fp32 first."""

import json

import pytest

from lowbit.errors import LowbitError
from lowbit.report import FLOAT, recipe_variants


def _recipe(path, bits: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "weights": {"bits": bits, "group_size": 32}}))
    return str(path)


def test_variants_are_named_by_stem_with_fp32_first(tmp_path):
    four = _recipe(tmp_path / "mine.yaml", 4)
    recipes = recipe_variants(["w8-rtn", four])
    assert list(recipes) == [FLOAT, "w8-rtn", "mine"] and recipes["mine"].weights.bits == 4


def test_two_files_of_one_stem_are_refused(tmp_path):
    """Both would be one row, folder and grid (the second silently replaced the first)."""
    a, b = _recipe(tmp_path / "a" / "r.yaml", 4), _recipe(tmp_path / "b" / "r.yml", 8)
    with pytest.raises(LowbitError, match="would both be named 'r'"):
        recipe_variants([FLOAT, a, b])
    with pytest.raises(LowbitError, match="named twice"):
        recipe_variants([a, a])


def test_a_recipe_file_named_fp32_is_refused(tmp_path):
    """Its row would pass for the float model every ratio is taken against."""
    with pytest.raises(LowbitError, match="may not be named 'fp32'"):
        recipe_variants([_recipe(tmp_path / "fp32.yaml", 4), "w8-rtn"])
