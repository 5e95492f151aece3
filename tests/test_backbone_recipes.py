"""The backbone comparison recipes (recipes/backbones/): each fine-tunes one batch through the real command line on
the bundled LUDB shards, so every registered family trains from the same YAML with only the backbone changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ecgfm.commands import main
from ecgfm.registry import BACKBONES

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "backbones").glob("*.yaml"))


def test_every_recipe_names_a_registered_backbone_and_shares_the_task():
    assert len(RECIPES) >= 2
    tasks = []
    for recipe in RECIPES:
        config = yaml.safe_load(recipe.read_text())
        assert config["model"]["backbone"] in BACKBONES.names(), recipe.name
        assert recipe.stem == config["model"]["backbone"], "one recipe per backbone, named after it"
        tasks.append((config["model"]["heads"], config["data"]))
    assert all(task == tasks[0] for task in tasks), "the recipes differ in more than the backbone"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_each_backbone_recipe_fine_tunes_one_batch(recipe: Path, ludb_shards: Path, tmp_path: Path):
    argv = ["fit", "--config", str(recipe), f"--data.root={ludb_shards}", f"--trainer.default_root_dir={tmp_path}"]
    argv += [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false"]
    argv += ["--trainer.fast_dev_run=true", "--data.batch_size=2"]
    assert main(argv) == 0
