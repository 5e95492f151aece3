"""The ``ecgfm`` command: LightningCLI for fit/validate/test/predict, plus shard, subsets, quickstart and
list-backbones."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ecgfm.checkpointing import AtomicCheckpointIO
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
from ecgfm.tasks import FineTuneTask

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: ecgfm COMMAND [options]

commands:
  fit | validate | test | predict   train or evaluate from a YAML recipe: ecgfm fit --config recipes/...yaml
  shard                             convert a folder of records (+ label table) into HDF5 shards
  shard verify DIR                  check every shard of DIR against its manifest
  synth                             write synthetic 12-lead shards with known potassium and lab values
  bench data                        loader, conversion and index benchmarks against same-run baselines
  bench metrics                     multi-label metrics, 1,200 labels x 1,000,000 samples: memory, time, torchmetrics
  subsets                           evaluate a checkpoint on lead subsets (12, limb, I+II, I, II): one table
  distill-cache                     store a teacher checkpoint's outputs in the shards, for distillation
  quickstart                        convert the bundled LUDB recordings, fine-tune, and evaluate
  list-backbones                    the registered backbone names

`ecgfm COMMAND --help` shows the options of a command.
"""


class EcgfmCLI(LightningCLI):
    """LightningCLI for FineTuneTask and ShardDataModule; ``fit`` also resumes and writes checkpoints atomically."""

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

    def before_instantiate_classes(self) -> None:
        self.run_plan: RunPlan | None = None
        if self.subcommand != "fit" or self.config.fit.trainer.get("fast_dev_run"):
            return  # a fast_dev_run writes no logs or checkpoints: there is no run to resume
        config = self.config.fit
        spell_out_default_logger(config.trainer)
        mode = "never" if config.get("ckpt_path") else config.get("resume", "auto")
        self.run_plan = plan_run(config, mode)
        apply_plan(config, self.run_plan)
        if _launch_rank() == 0 and self.run_plan.note:
            print(f"ecgfm fit: {self.run_plan.note}{_plan_details(self.run_plan)}", file=sys.stderr)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a recipe's own CheckpointIO is kept
            strategy.checkpoint_io = AtomicCheckpointIO()
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


def run_lightning(argv: list[str]) -> LightningCLI:
    """Run a LightningCLI subcommand (``fit --config recipe.yaml ...``) and return the CLI object."""
    saved = sys.argv
    # LightningCLI reads sys.argv, and Lightning's DDP launcher starts the other processes by running
    # `python sys.argv[0] sys.argv[1:]` (or `python -m ecgfm`): argv[0] stays the real program, the rest is argv.
    program = saved[0] if saved and os.path.isfile(saved[0]) else "ecgfm"
    sys.argv = [program, *argv]
    try:
        return EcgfmCLI(
            FineTuneTask,
            ShardDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml", "prog": "ecgfm"},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved
        os.environ.pop(HANDOFF_ENV, None)


def shard_parser() -> ArgumentParser:
    from ecgfm.data.convert import convert

    parser = ArgumentParser(prog="ecgfm shard", description="Convert a folder of ECG records into HDF5 shards.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_function_arguments(convert)
    return parser


def run_shard(argv: list[str]) -> int:
    from ecgfm.data.convert import convert
    from ecgfm.data.shards import verify_shards

    if argv[:1] == ["verify"]:
        if len(argv) != 2:
            print("usage: ecgfm shard verify SHARD_DIR", file=sys.stderr)
            return 2
        problems = verify_shards(argv[1])
        for line in problems:
            print(f"FAILED {line}")
        print(f"{len(problems)} problem(s) in {argv[1]}")
        return 1 if problems else 0
    parser = shard_parser()
    cfg = parser.parse_args(argv)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    summary = convert(**kwargs)
    summary.print()
    return 0


def run_bench(argv: list[str]) -> int:
    from ecgfm.bench.data import run_data_benchmark

    if argv[:1] == ["metrics"]:
        return run_bench_metrics(argv[1:])
    if argv[:1] != ["data"]:
        print("usage: ecgfm bench data [--segments N] [--wfdb_records N] [--index_segments N] ...", file=sys.stderr)
        print("       ecgfm bench metrics [--labels N] [--samples N] [--batch N] [--bins N] ...", file=sys.stderr)
        return 2
    parser = ArgumentParser(prog="ecgfm bench data", description=run_data_benchmark.__doc__)
    parser.add_function_arguments(run_data_benchmark, skip={"console"})
    cfg = parser.parse_args(argv[1:]).as_dict()
    cfg["workers"] = tuple(cfg["workers"])
    run_data_benchmark(**{k: v for k, v in cfg.items() if k != "__path__"})
    return 0


def run_bench_metrics(argv: list[str]) -> int:
    from ecgfm.bench.metrics import run_metrics_benchmark

    parser = ArgumentParser(prog="ecgfm bench metrics", description=run_metrics_benchmark.__doc__.split("\n\n")[0])
    parser.add_function_arguments(run_metrics_benchmark, skip={"console"})
    cfg = parser.parse_args(argv).as_dict()
    run_metrics_benchmark(**{k: v for k, v in cfg.items() if k != "__path__"})
    return 0


def run_synth(argv: list[str]) -> int:
    from ecgfm.data.synthetic import write_synthetic_shards

    parser = ArgumentParser(prog="ecgfm synth", description=write_synthetic_shards.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(write_synthetic_shards)
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k not in ("config", "__path__")}
    manifest = write_synthetic_shards(**cfg)
    print(f"wrote {manifest.n_segments} synthetic segments in {len(manifest.shards)} shards to {cfg['out']}")
    return 0


def _data_options() -> dict[str, object]:
    """The ShardDataModule arguments ``ecgfm subsets`` takes as ``--data.NAME``, with their types."""
    from typing import get_type_hints

    skip = {"return", "predict_split", "shuffle_buffer", "shuffle_seed"}  # --split chooses; scoring does not shuffle
    return {name: hint for name, hint in get_type_hints(ShardDataModule.__init__).items() if name not in skip}


def subsets_parser() -> ArgumentParser:
    from typing import Literal

    from ecgfm.evaluation.subsets import DEFAULT_SUBSETS

    parser = ArgumentParser(
        prog="ecgfm subsets",
        description="Evaluate one FineTuneTask checkpoint on each lead subset and write one table (subset, n_leads, "
        "leads_used, head, metric, value). The data settings default to those the checkpoint was trained with; "
        "--data.* overrides them (e.g. --data.root for another shard folder).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument("--ckpt_path", type=str, required=True, help="a Lightning checkpoint of a FineTuneTask")
    parser.add_argument(
        "--subsets",
        type=list[str | int],
        default=list(DEFAULT_SUBSETS),
        help="lead subsets: 12, limb, precordial, I, II, I+II, or leads joined by + (V1+V2)",
    )
    parser.add_argument(
        "--split",
        type=Literal["val", "test", "all"],
        default="test",
        help="the segments scored: val, test (held-out patients) or all (every segment, e.g. an external set)",
    )
    parser.add_argument(
        "--metrics", type=list[str] | None, default=None, help="keep metrics matching these patterns (auroc*)"
    )
    parser.add_argument("--out", type=str | None, default=None, help="write the table to this CSV file")
    parser.add_argument("--accelerator", type=str, default="auto", help="auto, cpu or gpu")
    parser.add_argument("--limit_batches", type=int | float | None, default=None, help="score only this many batches")
    for name, hint in _data_options().items():  # None: as the checkpoint's training run had it
        parser.add_argument(f"--data.{name}", type=hint | None, default=None, help="default: the checkpoint's")
    return parser


def run_subsets(argv: list[str]) -> int:
    import torch

    from ecgfm.evaluation.subsets import evaluate_subsets, format_table, write_table

    cfg = subsets_parser().parse_args(argv).as_dict()
    checkpoint = Path(cfg["ckpt_path"])
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    data_args = dict(stored.get("datamodule_hyper_parameters") or {})
    del stored
    data_args.update({k: v for k, v in (cfg.get("data") or {}).items() if v is not None})
    if not data_args.get("root"):
        print(
            f"ecgfm subsets: {checkpoint} does not record its training data; give the shards with --data.root",
            file=sys.stderr,
        )
        return 2
    known = _data_options()
    datamodule = ShardDataModule(**{k: v for k, v in data_args.items() if k in known})
    rows = evaluate_subsets(
        checkpoint,
        datamodule,
        cfg["subsets"],
        cfg["split"],
        metrics=cfg["metrics"],
        accelerator=cfg["accelerator"],
        limit_batches=cfg["limit_batches"],
    )
    print(format_table(rows))
    if cfg["out"]:
        print(f"wrote {len(rows)} rows to {write_table(rows, cfg['out'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad input ends with one line naming what is wrong (ECGFM_DEBUG=1 shows the traceback)."""
    from ecgfm.backbones.checkpoint import CheckpointError
    from ecgfm.data.shards import ShardError
    from ecgfm.data.sources import RecordError
    from ecgfm.leads import LeadError

    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except SIGTERMException:
        # Lightning stops after the current batch on SIGTERM; ResumableCheckpoint saved last.ckpt on the way out
        print("ecgfm: stopped by SIGTERM; run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (CheckpointError, ShardError, RecordError, LeadError, FileNotFoundError, KeyError, ValueError) as err:
        if os.environ.get("ECGFM_DEBUG"):
            raise
        # KeyError's str() quotes its message; the project's KeyErrors name the missing key, target or label
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ecgfm: error: {message}", file=sys.stderr)
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        run_lightning(argv)
        return 0
    if command == "shard":
        return run_shard(rest)
    if command == "bench":
        return run_bench(rest)
    if command == "synth":
        return run_synth(rest)
    if command == "subsets":
        return run_subsets(rest)
    if command == "distill-cache":
        from ecgfm.distillation import run_distill_cache

        return run_distill_cache(rest)
    if command == "quickstart":
        from ecgfm.quickstart import run_quickstart_cli

        return run_quickstart_cli(rest)
    if command == "list-backbones":
        from ecgfm.backbones import list_backbones

        print("\n".join(list_backbones()))
        return 0
    print(f"ecgfm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def recipes_dir() -> Path:
    """The project's recipes/ folder (beside the package in a source checkout or editable install)."""
    return Path(__file__).resolve().parents[1] / "recipes"


if __name__ == "__main__":
    sys.exit(main())
