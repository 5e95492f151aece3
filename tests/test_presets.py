"""The presets in recipes/_base/ compose with a recipe through the real `ecgfm fit` parser (a second --config), and
the Trainer they describe can be built here where the hardware allows (CPU presets) and trains (one combined run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from ecgfm.commands import main
from ecgfm.commands.lightning import run_lightning

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "recipes" / "_base"
RECIPE = REPO / "recipes" / "quickstart" / "net1d-small.yaml"
PRESETS = sorted(path.stem for path in BASE.glob("*.yaml"))
BUILDABLE_HERE = ("cpu", "ddp-cpu", "bf16", "grad-accum", "debug")  # the GPU presets only parse on a CPU machine


def compose(preset: str, tmp_path: Path, shards: Path, monkeypatch, *extra: str, build: bool) -> LightningCLI:
    """`ecgfm fit --config RECIPE --config PRESET ...` up to (build) or before instantiating the classes; no fit."""
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: None)
    if not build:
        monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    argv = ["fit", "--config", str(RECIPE), "--config", str(BASE / f"{preset}.yaml"), f"--data.root={shards}"]
    argv += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    return run_lightning([*argv, *extra])


def test_every_preset_is_listed_and_has_a_usage_header():
    assert set(PRESETS) >= {"cpu", "gpu", "ddp", "ddp-cpu", "multi-node", "fsdp", "bf16", "grad-accum", "debug"}
    for preset in PRESETS:
        text = (BASE / f"{preset}.yaml").read_text()
        header = [line for line in text.splitlines()[:6] if line.startswith("#")]
        assert len(header) >= 2 and f"recipes/_base/{preset}.yaml" in text, f"{preset}.yaml: header with its usage"
        assert yaml.safe_load(text), f"{preset}.yaml is empty"


EXPECTED = {
    "cpu": {"trainer.accelerator": "cpu", "trainer.devices": 1},
    "gpu": {"trainer.accelerator": "gpu", "trainer.devices": 1},
    "ddp": {
        "trainer.accelerator": "gpu",
        "trainer.devices": "auto",
        "trainer.strategy": "ddp",
    },
    "ddp-cpu": {
        "trainer.accelerator": "cpu",
        "trainer.devices": 2,
        "trainer.strategy.class_path": "lightning.pytorch.strategies.DDPStrategy",
        "trainer.strategy.init_args.process_group_backend": "gloo",
        "trainer.strategy.init_args.find_unused_parameters": False,
    },
    "multi-node": {
        "trainer.accelerator": "gpu",
        "trainer.num_nodes": 2,
        "trainer.strategy": "ddp",
    },
    "fsdp": {
        "trainer.accelerator": "gpu",
        "trainer.precision": "bf16-mixed",
        "trainer.strategy.class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "trainer.strategy.init_args.state_dict_type": "full",
    },
    "bf16": {"trainer.precision": "bf16-mixed"},
    "grad-accum": {"trainer.accumulate_grad_batches": 4},
    "debug": {"trainer.limit_train_batches": 4, "trainer.detect_anomaly": True, "data.num_workers": 0},
    "wandb": {"trainer.logger.class_path": "lightning.pytorch.loggers.WandbLogger"},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parses_after_the_quickstart_recipe(preset, tmp_path, ludb_shards, monkeypatch):
    cli = compose(preset, tmp_path, ludb_shards, monkeypatch, build=False)
    config = cli.config.fit
    for key, value in EXPECTED.get(preset, {}).items():
        assert config[key] == value, f"{preset}: {key}"
    # the recipe's own settings survive the merge
    assert config["model.backbone"] == "net1d-small" and len(config["model.heads"]) == 1
    recipe_epochs = yaml.safe_load(RECIPE.read_text())["trainer"]["max_epochs"]
    assert config["trainer.max_epochs"] == (1 if preset == "debug" else recipe_epochs)
    if preset == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from ecgfm.backbones.net1d import BasicStage

        init_args = config["trainer.strategy.init_args"]
        assert set(init_args["auto_wrap_policy"]) == {BasicStage}
        strategy = FSDPStrategy(**{k: v for k, v in vars(init_args).items() if v is not None})
        assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
        assert strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("preset", BUILDABLE_HERE)
def test_cpu_presets_build_their_trainer(preset, tmp_path, ludb_shards, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    trainer = compose(preset, tmp_path, ludb_shards, monkeypatch, build=True).trainer
    if preset == "ddp-cpu":
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
        assert trainer.strategy._process_group_backend == "gloo"
    else:
        assert isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.num_devices == 1
    assert trainer.precision == ("bf16-mixed" if preset == "bf16" else "32-true")
    assert trainer.accumulate_grad_batches == (4 if preset == "grad-accum" else 1)
    if preset == "debug":
        assert trainer.limit_train_batches == 4 and trainer.max_epochs == 1 and trainer.log_every_n_steps == 1


@pytest.mark.slow
def test_presets_compose_into_a_training_run(tmp_path, ludb_shards):
    """cpu + debug + bf16 + grad-accum after the recipe: 4 bf16 batches accumulated into 1 optimizer step."""
    import torch

    argv = ["fit", "--config", str(RECIPE)]
    for preset in ("cpu", "debug", "bf16", "grad-accum"):
        argv += ["--config", str(BASE / f"{preset}.yaml")]
    argv += [
        f"--data.root={ludb_shards}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--model.backbone=net1d-tiny",
    ]
    assert main(argv) == 0
    (checkpoint,) = (tmp_path / "logs").rglob("last.ckpt")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert stored["epoch"] == 0 and stored["global_step"] == 1
    (config_file,) = (tmp_path / "logs").rglob("config.yaml")
    saved = yaml.safe_load(config_file.read_text())["trainer"]
    assert saved["precision"] == "bf16-mixed" and saved["accumulate_grad_batches"] == 4
    assert saved["limit_train_batches"] == 4 and saved["accelerator"] == "cpu"
