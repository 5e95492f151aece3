"""The ``ecgfm`` subcommands that have no library of their own: list, recipes, shard verify's help, recipe names."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ecgfm.commands import main
from ecgfm.commands.recipes import expand_config_names
from ecgfm.commands.shard import shard_parser
from ecgfm.registry import REGISTRIES

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "net1d-small.yaml"
POTASSIUM_RECIPE = REPO / "recipes" / "potassium" / "net1d-small.yaml"


def one_error_line(err: str) -> str:
    """The ``ecgfm: error:`` line a user error ends with: exactly one, the last line, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("ecgfm: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    # a logging handler made while an earlier test captured stderr reports "--- Logging error ---" with a traceback
    assert "Traceback" not in err.replace("--- Logging error ---\nTraceback", "") and "weights_only=False" not in err
    return errors[0]


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


def test_list_backbones_shows_each_input_contract_and_parameter_count(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "reads 500 Hz x 5000 samples (10 s), leads I in mV, preprocessing ecgfounder; 30,807,750 parameters" in out
    assert "preprocessing ecgfounder; 30,819,014 parameters" in out  # ECGFounder's released 12-lead size
    assert out.count(" parameters\n") == len(REGISTRIES["backbones"])


def test_list_rejects_an_unknown_kind(capsys):
    assert main(["list", "backbone"]) == 2
    assert one_error_line(capsys.readouterr().err).count("backbones") >= 1  # the kinds it takes


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
    with pytest.raises(FileNotFoundError, match="--config ../pyproject.toml: no such file here and no shipped recipe"):
        expand_config_names(["--config", "../pyproject.toml"])  # nor a way out of the recipes folder


def test_fit_and_shard_read_a_recipe_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", "quickstart/net1d-small", f"--data.root={tmp_path}", "--trainer.fast_dev_run=true"])
    assert code == 1  # the recipe was read: the run got as far as looking for the shards
    assert f"no manifest.json at {tmp_path}" in capsys.readouterr().err
    cfg = shard_parser().parse_args(expand_config_names(["-c", "quickstart/shard", "--out", "elsewhere"]))
    assert cfg.reader == "wfdb" and cfg.record_column == "ID" and cfg.out == "elsewhere"


def test_shard_verify_help_is_help(capsys):
    assert main(["shard", "verify", "--help"]) == 0
    assert "usage: ecgfm shard verify" in capsys.readouterr().out


def test_usage_names_every_command(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    for command in ("fit", "shard verify", "synth", "bench data", "subsets", "distill-cache", "quickstart", "list"):
        assert command in usage
    assert "recipes list | show | copy" in usage
    assert main(["list-backbones"]) == 2  # replaced by `ecgfm list backbones`


# ----------------------------------------------------------------------------------------------- errors, not tracebacks
class _RunsCode:
    def __reduce__(self):
        return (print, ("this file ran code on unpickling",))


def _bad_checkpoint(folder: Path, kind: str) -> Path:
    """A file given as a checkpoint that is not one ecgfm may load: each as a user would come by it."""
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {}, "payload": _RunsCode()}, f)
    elif kind == "unsafe":
        torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    elif kind == "weights":  # a backbone's own weights, not a Lightning checkpoint
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    "command, kind, reason",
    [
        ("test", "truncated", "it is truncated or corrupt"),
        ("predict", "truncated", "it is truncated or corrupt"),
        ("validate", "empty", "it is empty"),
        ("test", "text", "it is not a torch checkpoint"),
        ("test", "pickle", "not a checkpoint written by torch.save"),
        ("test", "unsafe", "it pickles print, which is not on ecgfm's allow-list"),
        ("predict", "weights", "is not a Lightning checkpoint (no pytorch-lightning_version)"),
        ("test", "folder", "it is a folder"),
        ("test", "missing", "does not exist"),
        ("fit", "weights", "is not a Lightning checkpoint"),
    ],
)
def test_a_bad_ckpt_path_is_one_line_naming_the_file(command, kind, reason, synthetic_shards, tmp_path, capsys):
    path = _bad_checkpoint(tmp_path, kind)
    args = [command, "--config", str(POTASSIUM_RECIPE), f"--data.root={synthetic_shards}", f"--ckpt_path={path}"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    assert main(args) == 1
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert str(path) in line and reason in line, line
    assert "ran code" not in captured.out + captured.err


def test_a_garbage_safetensors_as_pretrained_is_one_line_naming_it(synthetic_shards, tmp_path, capsys):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(os.urandom(256))
    args = ["fit", "--config", str(POTASSIUM_RECIPE), f"--data.root={synthetic_shards}", "--model.backbone=net1d-tiny"]
    args += [f"--model.pretrained={garbage}", "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    assert main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot read checkpoint {garbage}: not a readable .safetensors file" in line


def test_option_errors_are_one_line_naming_the_option(capsys):
    assert main(["fit", "--config", str(QUICKSTART_RECIPE), "--trainer.max_epochs=abc"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert 'Parser key "trainer.max_epochs"' in line and "Given value: abc" in line and "ecgfm fit --help" in line
    assert main(["test", "--config", str(QUICKSTART_RECIPE), "--trainer.nonsense=1"]) == 2
    assert "unrecognized arguments: --trainer.nonsense=1" in one_error_line(capsys.readouterr().err)
    assert main(["synth", "--n_segments", "many"]) == 2
    assert 'Parser key "n_segments"' in one_error_line(capsys.readouterr().err)
    assert main(["recipes", "show"]) == 2
    assert "required: show.name" in one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch, capsys):
    path = _bad_checkpoint(tmp_path, "truncated")
    args = ["test", "--config", str(QUICKSTART_RECIPE), f"--ckpt_path={path}"]
    from ecgfm.backbones.checkpoint import CheckpointError

    monkeypatch.delenv("ECGFM_DEBUG", raising=False)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):  # the traceback Python prints for it
        main(["--debug", *args])
    assert "ECGFM_DEBUG" not in os.environ  # --debug lasts one command (and the processes it starts)
    assert main(args) == 1 and str(path) in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("ECGFM_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(args)
    monkeypatch.setenv("ECGFM_DEBUG", "0")
    assert main(args) == 1
    assert main([]) == 0 and "ecgfm [--debug] COMMAND" in capsys.readouterr().out


def test_a_bug_keeps_its_traceback_and_a_bare_key_is_a_bug(monkeypatch, capsys):
    import ecgfm.commands.list as list_command

    def fails(error: Exception):
        def format_registry(registry):
            raise error

        monkeypatch.setattr(list_command, "format_registry", format_registry)

    fails(AttributeError("'NoneType' object has no attribute 'names'"))
    with pytest.raises(AttributeError):
        main(["list", "heads"])
    fails(RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError):
        main(["list", "heads"])
    fails(KeyError("potassium"))  # a key alone tells a user nothing: where it came from is in the traceback
    with pytest.raises(KeyError):
        main(["list", "heads"])
    fails(KeyError("head 'k' learns target 'potassium', which the data does not have (its targets: age)"))
    assert main(["list", "heads"]) == 1
    assert one_error_line(capsys.readouterr().err).endswith("which the data does not have (its targets: age)")
    fails(PermissionError(13, "Permission denied", "/data/shards/manifest.json"))
    assert main(["list", "heads"]) == 1
    assert "Permission denied: '/data/shards/manifest.json'" in one_error_line(capsys.readouterr().err)
