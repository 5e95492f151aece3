"""The ``ecgfm`` command: LightningCLI for fit/validate/test/predict, plus shard, quickstart and list-backbones."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from ecgfm.data.datamodule import ShardDataModule
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
  quickstart                        convert the bundled LUDB recordings, fine-tune, and evaluate
  list-backbones                    the registered backbone names

`ecgfm COMMAND --help` shows the options of a command.
"""


def run_lightning(argv: list[str]) -> LightningCLI:
    """Run a LightningCLI subcommand (``fit --config recipe.yaml ...``) and return the CLI object."""
    saved = sys.argv
    sys.argv = ["ecgfm", *argv]  # LightningCLI reads sys.argv; setting it keeps --help and error messages right
    try:
        return LightningCLI(
            FineTuneTask,
            ShardDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved


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


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad input ends with one line naming what is wrong (ECGFM_DEBUG=1 shows the traceback)."""
    from ecgfm.backbones.checkpoint import CheckpointError
    from ecgfm.data.shards import ShardError
    from ecgfm.data.sources import RecordError
    from ecgfm.leads import LeadError

    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except (CheckpointError, ShardError, RecordError, LeadError, FileNotFoundError) as err:
        if os.environ.get("ECGFM_DEBUG"):
            raise
        print(f"ecgfm: error: {err}", file=sys.stderr)
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
