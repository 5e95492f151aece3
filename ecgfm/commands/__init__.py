"""The ``ecgfm`` command: one module per subcommand, each with ``run(argv) -> exit code``; the library never imports
this package, so the command line can change without touching what it drives."""

from __future__ import annotations

import importlib
import os
import signal
import sys

#: Subcommand -> the module under ecgfm/commands/ that runs it (imported only when that command runs).
COMMANDS = {
    "shard": "shard",
    "synth": "synth",
    "bench": "bench",
    "subsets": "subsets",
    "distill-cache": "distill_cache",
    "quickstart": "quickstart",
    "list": "list",
    "recipes": "recipes",
}

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: ecgfm COMMAND [options]

commands:
  fit | validate | test | predict   train or evaluate from a YAML recipe: ecgfm fit --config quickstart/net1d-small
  shard                             convert a folder of records (+ label table) into HDF5 shards
  shard verify DIR                  check every shard of DIR against its manifest
  synth                             write synthetic 12-lead shards with known potassium and lab values
  bench data                        loader, conversion and index benchmarks against same-run baselines
  bench metrics                     multi-label metrics, 1,200 labels x 1,000,000 samples: memory, time, torchmetrics
  bench distillation                lead-I students with and without a 12-lead teacher, synthetic potassium: test MAE
  subsets                           evaluate a checkpoint on lead subsets (12, limb, I+II, I, II): one table
  distill-cache                     store a teacher checkpoint's outputs in the shards, for distillation
  quickstart                        convert the bundled LUDB recordings, fine-tune, and evaluate
  list [KIND]                       registered backbones, heads, adapters, preprocessing chains, sources
  recipes list | show | copy        the shipped recipes: list them, print one, copy one to edit

--config takes a YAML file or the name of a shipped recipe (`ecgfm recipes list`).
`ecgfm COMMAND --help` shows the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad input ends with one line naming what is wrong (ECGFM_DEBUG=1 shows the traceback)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ecgfm.backbones.checkpoint import CheckpointError
    from ecgfm.data.shards import ShardError
    from ecgfm.data.sources import RecordError
    from ecgfm.leads import LeadError

    try:
        # [*...], not list(...): importing ecgfm.commands.list binds the name `list` in this module to it
        return _dispatch([*(sys.argv[1:] if argv is None else argv)])
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
        from ecgfm.commands.lightning import run_lightning

        run_lightning(argv)
        return 0
    if command in COMMANDS:
        return importlib.import_module(f"{__name__}.{COMMANDS[command]}").run(rest)
    print(f"ecgfm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
