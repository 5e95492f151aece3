"""``ecgfm fit | validate | test | predict``: Lightning's CLI over FineTuneTask and ShardDataModule; ``fit`` resumes."""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from ecgfm.backbones.checkpoint import CheckpointError, allowed_globals
from ecgfm.checkpointing import AtomicCheckpointIO, read_lightning_checkpoint
from ecgfm.commands.recipes import CONFIG_FLAGS, expand_config_names
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.resume import (
    HANDOFF_ENV,
    RunPlan,
    RunRecord,
    apply_plan,
    hand_off,
    keep_csv_metrics,
    plan_run,
    spell_out_default_logger,
)
from ecgfm.tasks import FineTuneTask, check_recipe_heads

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CKPT_PATH_WORDS = ("best", "last", "hpc", "registry")  # Lightning's special values of ckpt_path, not files


class EcgfmCLI(LightningCLI):
    """LightningCLI for FineTuneTask and ShardDataModule; ``fit`` also resumes, and every subcommand writes checkpoints
    atomically and reads them only safely (weights_only=True), a bad file being one line that names it."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--resume",
                type=Literal["auto", "never"],
                default="auto",
                help="auto: when this command's earlier run did not finish, continue it from its newest checkpoint "
                "(last.ckpt, or SLURM's hpc_ckpt_N.ckpt); never: always start a new run. --ckpt_path overrides both.",
            )
        return parser

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters of ``--ckpt_path`` right after parsing: check the file first (safely,
        tensors memory-mapped), so that a bad one is one line naming it rather than a traceback from torch."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if isinstance(ckpt_path, str) and ckpt_path.partition(":")[0] not in CKPT_PATH_WORDS and "://" not in ckpt_path:
            checkpoint = read_lightning_checkpoint(ckpt_path, resuming=subcommand == "fit")
            # Lightning replaces the recipe's model options with the checkpoint's next: its heads must be the same
            recipe_heads = self.config[subcommand].model.get("heads")
            stored = (checkpoint.get("ecgfm") or {}).get("heads")
            if recipe_heads and stored and all("kind" in config for config in stored.values()):
                check_recipe_heads([_plain(head) for head in recipe_heads], stored)
        try:
            with torch.serialization.safe_globals(allowed_globals()):  # Lightning's own torch.load(weights_only=True)
                super()._parse_ckpt_path()
        except ArgumentError as err:
            raise CheckpointError(f"the model options stored in {ckpt_path} do not fit this command: {err}") from err

    def before_instantiate_classes(self) -> None:
        self.run_plan: RunPlan | None = None
        if self.subcommand != "fit" or self.config.fit.trainer.get("fast_dev_run"):
            return  # a fast_dev_run writes no logs or checkpoints: there is no run to resume
        config = self.config.fit
        spell_out_default_logger(config.trainer)
        mode = "never" if config.get("ckpt_path") else config.get("resume", "auto")
        self.run_plan = plan_run(config, mode)
        apply_plan(config, self.run_plan)
        if _launch_rank() == 0:
            for warning in self.run_plan.warnings:
                print(f"ecgfm fit: warning: {warning}", file=sys.stderr)
            if self.run_plan.note:
                print(f"ecgfm fit: {self.run_plan.note}{_plan_details(self.run_plan)}", file=sys.stderr)

    def _read_checkpoints_safely(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a recipe's own CheckpointIO is kept
            strategy.checkpoint_io = AtomicCheckpointIO()

    def before_validate(self) -> None:
        self._read_checkpoints_safely()

    def before_test(self) -> None:
        self._read_checkpoints_safely()

    def before_predict(self) -> None:
        self._read_checkpoints_safely()

    def before_fit(self) -> None:
        self._read_checkpoints_safely()
        strategy = self.trainer.strategy
        plan = self.run_plan
        if plan is not None and plan.ckpt_path is not None:  # a resumed run's folders are meant to be non-empty
            warnings.filterwarnings("ignore", message="(Checkpoint|Experiment logs) directory .* is not empty")
            if plan.step is not None and _launch_rank() == 0:
                keep_csv_metrics(self.trainer, plan.step)
        if plan is not None and plan.run_dir is not None:
            self.trainer.callbacks.append(RunRecord(plan.run_dir, plan.fingerprint, plan.ckpt_path))
            if isinstance(strategy.launcher, _SubprocessScriptLauncher):
                hand_off(plan)


def _launch_rank() -> int:
    """This process's rank as its launcher (torchrun, SLURM, Lightning's DDP launcher) set it; 0 when alone."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _plan_details(plan: RunPlan) -> str:
    if plan.run_dir is None:
        return ""
    if plan.ckpt_path is None:
        return f" in {plan.run_dir}"
    return f" {plan.run_dir} from {plan.ckpt_path} (global step {plan.step})"


def data_class_named(argv: list[str]) -> bool:
    """Whether the recipe names its data module (``data: {class_path: ...}``, e.g. image files); recipes without one
    read shards with ShardDataModule and keep their short form (``data: {root: ...}``)."""
    configs, after_flag = [], False
    for arg in argv:
        if arg.startswith("--data.class_path") or arg.startswith("--data=") and "class_path" in arg:
            return True
        if after_flag:
            configs.append(arg)
        after_flag = arg in CONFIG_FLAGS
        if arg.startswith("--config="):
            configs.append(arg.removeprefix("--config="))
    for config in configs:
        path = Path(config)
        try:
            loaded = yaml.safe_load(path.read_text()) if path.is_file() else yaml.safe_load(config)
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports an unreadable config itself, naming it
        data = loaded.get("data") if isinstance(loaded, dict) else None
        if isinstance(data, dict) and "class_path" in data:
            return True
    return False


def run_lightning(argv: list[str]) -> LightningCLI:
    """Run a LightningCLI subcommand (``fit --config recipe.yaml ...``) and return the CLI object.

    ``--config`` also takes a shipped recipe by name (``quickstart/net1d-small``) where no such file exists here.
    """
    saved = sys.argv
    # LightningCLI reads sys.argv, and Lightning's DDP launcher starts the other processes by running
    # `python sys.argv[0] sys.argv[1:]` (or `python -m ecgfm`): argv[0] stays the real program, the rest is argv.
    program = saved[0] if saved and os.path.isfile(saved[0]) else "ecgfm"
    argv = expand_config_names(argv)
    sys.argv = [program, *argv]
    by_class = data_class_named(argv)
    try:
        return EcgfmCLI(
            FineTuneTask,
            L.LightningDataModule if by_class else ShardDataModule,
            subclass_mode_data=by_class,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml", "prog": "ecgfm", "exit_on_error": False},  # main() prints one line
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved
        os.environ.pop(HANDOFF_ENV, None)


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (a head as parsed from the recipe) as plain dicts."""
    return value.as_dict() if hasattr(value, "as_dict") else value
