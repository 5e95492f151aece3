"""The recipes and zoo manifest are found by name in a source checkout (the wheel is tested in test_packaging.py)."""

from __future__ import annotations

from pathlib import Path

from ecgfm.resources import find_recipe, recipe_files, recipes_dir, zoo_manifest
from ecgfm.zoo import ZOO_MANIFEST

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_uses_its_top_level_folders():
    assert recipes_dir() == REPO / "recipes"
    assert zoo_manifest() == ZOO_MANIFEST == REPO / "checkpoints" / "zoo.json"
    assert ZOO_MANIFEST.is_file()


def test_find_recipe_by_name():
    recipe = REPO / "recipes" / "quickstart" / "net1d-small.yaml"
    for name in ("quickstart/net1d-small", "quickstart/net1d-small.yaml", "recipes/quickstart/net1d-small"):
        assert find_recipe(name) == recipe
    assert find_recipe("labs/reference_ranges.csv") == REPO / "recipes" / "labs" / "reference_ranges.csv"
    for name in ("quickstart/missing", "quickstart", "../pyproject.toml", "/etc/hostname", ""):
        assert find_recipe(name) is None
    assert "quickstart/net1d-small.yaml" in recipe_files() and "_base/cpu.yaml" in recipe_files()
