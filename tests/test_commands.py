"""The ``ecgfm`` subcommands that have no library of their own: list, recipes, shard verify's help, recipe names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgfm.commands import main
from ecgfm.commands.recipes import expand_config_names
from ecgfm.commands.shard import shard_parser
from ecgfm.registry import REGISTRIES

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "net1d-small.yaml"


def test_list_prints_each_name_with_its_description_and_options(capsys):
    assert main(["list", "heads"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("heads:\n")
    heads = REGISTRIES["heads"]
    for name in heads:
        assert f"  {name} " in out and heads.describe(name) in out
    assert "options: name, target, labels" in out  # every head's own options, as a recipe spells them
    assert main(["list"]) == 0
    everything = capsys.readouterr().out
    assert all(f"{kind}:\n" in everything for kind in REGISTRIES)
    assert "net1d-small" in everything and "fold_first_conv" in everything and "wfdb" in everything


def test_list_rejects_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["list", "backbone"])
    assert stop.value.code == 2
    assert "backbones" in capsys.readouterr().err  # the kinds it takes


def test_recipes_list_show_and_copy(tmp_path, monkeypatch, capsys):
    assert main(["recipes", "list"]) == 0
    listing = capsys.readouterr().out
    assert "quickstart/\n  quickstart/net1d-small\n" in listing and "  _base/cpu\n" in listing
    assert "labs/reference_ranges.csv" in listing  # side files ship with their recipes

    assert main(["recipes", "show", "quickstart/net1d-small"]) == 0
    assert capsys.readouterr().out == QUICKSTART_RECIPE.read_text()

    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "quickstart/net1d-small.yaml"]) == 0
    copied = tmp_path / "net1d-small.yaml"
    assert copied.read_text() == QUICKSTART_RECIPE.read_text()
    copied.write_text("mine")
    assert main(["recipes", "copy", "quickstart/net1d-small"]) == 1  # never overwrites an edited copy silently
    assert "--force" in capsys.readouterr().err and copied.read_text() == "mine"
    assert main(["recipes", "copy", "quickstart/net1d-small", "--force"]) == 0
    assert copied.read_text() == QUICKSTART_RECIPE.read_text()
    assert main(["recipes", "copy", "_base/cpu", "presets/my-cpu.yaml"]) == 0
    assert (tmp_path / "presets" / "my-cpu.yaml").read_text() == (REPO / "recipes/_base/cpu.yaml").read_text()

    assert main(["recipes", "show", "quickstart/nonsense"]) == 1
    assert "no shipped recipe 'quickstart/nonsense'" in capsys.readouterr().err


def test_config_takes_a_shipped_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(QUICKSTART_RECIPE)
    assert expand_config_names(["fit", "--config", "quickstart/net1d-small"]) == ["fit", "--config", shipped]
    assert expand_config_names(["-c", "quickstart/net1d-small.yaml"]) == ["-c", shipped]
    assert expand_config_names(["--config=recipes/quickstart/net1d-small.yaml"]) == [f"--config={shipped}"]
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "net1d-small.yaml").write_text("seed_everything: 1\n")
    untouched = ["--config", "quickstart/net1d-small.yaml", "--config", "{trainer: {max_epochs: 1}}"]
    assert expand_config_names(untouched) == untouched  # a file here wins; inline YAML stays YAML
    assert expand_config_names(["--config", "../pyproject.toml"]) == ["--config", "../pyproject.toml"]


def test_fit_and_shard_read_a_recipe_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", "quickstart/net1d-small", f"--data.root={tmp_path}", "--trainer.fast_dev_run=true"])
    assert code == 1  # the recipe was read: the run got as far as looking for the shards
    assert f"no manifest.json at {tmp_path}" in capsys.readouterr().err
    cfg = shard_parser().parse_args(expand_config_names(["-c", "quickstart/shard", "--out", "elsewhere"]))
    assert cfg.reader == "wfdb" and cfg.record_column == "ID" and cfg.out == "elsewhere"


def test_shard_verify_help_is_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["shard", "verify", "--help"])
    assert stop.value.code == 0
    assert "usage: ecgfm shard verify" in capsys.readouterr().out


def test_usage_names_every_command(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    for command in ("fit", "shard verify", "synth", "bench data", "subsets", "distill-cache", "quickstart", "list"):
        assert command in usage
    assert "recipes list | show | copy" in usage
    assert main(["list-backbones"]) == 2  # replaced by `ecgfm list backbones`
