"""The ``ecgfm`` command: one module per subcommand, each with ``run(argv) -> exit code``; the library never imports
this package, so the command line can change without touching what it drives."""

from __future__ import annotations

import argparse
import errno
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
    "embed": "embed",
    "report": "report",
    "quickstart": "quickstart",
    "list": "list",
    "recipes": "recipes",
    "zoo": "zoo",
    "publish": "publish",
    "export": "export",
}

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "ECGFM_DEBUG"
#: OSErrors about the machine rather than the code (a full disk, a read-only or over-quota file system).
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)

USAGE = """usage: ecgfm [--debug] COMMAND [options]

commands:
  fit | validate | test | predict   train or evaluate from a YAML recipe: ecgfm fit --config quickstart/net1d-small
  shard                             convert a folder of records (+ label table) into HDF5 shards
  shard verify DIR                  check every shard of DIR against its manifest
  shard merge DIR...                join the parts of `ecgfm shard --part K/N` (one per node) into one manifest
  synth                             write synthetic 12-lead shards with known potassium and lab values
  bench data                        loader, conversion and index benchmarks against same-run baselines
  bench shard                       conversion records/s per core and the speed-up of N parts over 1 process
  bench readers                     records/s per core of every reader on the same recordings, same signal checked
  bench metrics                     multi-label metrics, 1,200 labels x 1,000,000 samples: memory, time, torchmetrics
  bench distillation                lead-I students with and without a 12-lead teacher, synthetic potassium: test MAE
  bench infer                       one prediction's latency and throughput: eager vs TorchScript vs ONNX Runtime
  bench embed                       seconds per epoch: linear probe through the backbone vs heads on stored features
  bench train                       training samples/s of ecgfm fit vs a plain PyTorch loop, same model and data
  subsets                           evaluate a checkpoint on lead subsets (12, limb, I+II, I, II): one table
  distill-cache                     store a teacher checkpoint's outputs in the shards, for distillation
  embed --model M --data D --out F  store a model's features of every segment, to train heads on them directly
  report --model M --data D         one folder per model: metrics with 95 % CIs per record, thresholds, calibration,
                                    subgroups, saliency (report.html, report.md, metrics.json)
  quickstart                        convert the bundled LUDB recordings, fine-tune, report test AUROCs with 95 % CIs
  list [KIND]                       registered backbones, heads, adapters, preprocessing chains, sources
  recipes list | show | copy        the shipped recipes: list them, print one, copy one to edit
  predict --model NAME_OR_DIR RECORD...   run a published or zoo model on raw records (WFDB, .mat, arrays)
  zoo list | info | verify | download     the model zoo: cards, checksums, downloads (only when allowed)
  publish CKPT DIR                  a checkpoint as a published model folder (config.yaml, safetensors, card)
  export MODEL --format onnx|torchscript  a model with its preprocessing and post-processing inside

--config takes a YAML file or the name of a shipped recipe (`ecgfm recipes list`).
`ecgfm COMMAND --help` shows the options of a command. A mistake in the input ends in one line, `ecgfm: error: ...`;
`ecgfm --debug COMMAND ...` (or ECGFM_DEBUG=1) shows its traceback too.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; a user's mistake ends in one line naming the file, record, column or key (``--debug`` or
    ECGFM_DEBUG=1 shows the traceback); a bug in ecgfm keeps its traceback. Imports no torch or Lightning itself:
    ``ecgfm predict --runtime onnx`` runs without them."""
    # [*...], not list(...): importing ecgfm.commands.list binds the name `list` in this module to it
    args = [*(sys.argv[1:] if argv is None else argv)]
    debug_before = os.environ.get(DEBUG_ENV)
    if args[:1] == ["--debug"]:
        args = args[1:]
        os.environ[DEBUG_ENV] = "1"  # for the DDP processes Lightning starts by running the command again, too
    try:
        return _dispatch(args)
    except SystemExit as stop:  # --help, option errors a parser still reports by exiting, and Lightning's SIGTERM
        if isinstance(stop, _loaded_classes(("lightning.pytorch.utilities.exceptions", "SIGTERMException"))):
            # Lightning stops after the current batch on SIGTERM; ResumableCheckpoint saved last.ckpt on the way out
            print("ecgfm: stopped by SIGTERM; run the same command again to resume", file=sys.stderr)
            return 128 + signal.SIGTERM
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BrokenPipeError:  # `ecgfm recipes list | head`: the reader left; stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 128 + signal.SIGPIPE
    except Exception as err:
        message = user_error(err)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(err, argparse.ArgumentError):
            own_parser = args[:2] in (["shard", "verify"], ["shard", "merge"]) or (
                args[:1] == ["bench"] and args[1:2] != ["--help"]
            )
            command = " ".join(args[:2] if own_parser else args[:1])
            print(f"ecgfm: error: {message} (`ecgfm {command} --help` lists the options)", file=sys.stderr)
            return 2
        print(f"ecgfm: error: {message}", file=sys.stderr)
        return 1
    finally:
        if debug_before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = debug_before


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error in what the user gave (a file, record, option, key); None for a bug.

    User errors are ecgfm's own (CheckpointError, ShardError, RecordError, LeadError and the ValueErrors:
    ContractError, UnknownNameError), ValueError and KeyError with a sentence, option errors, Lightning's
    MisconfigurationException and OSErrors about a path or the machine. A KeyError holding only a key
    (``KeyError('potassium')``) says nothing a user can act on: it is a bug, and keeps its traceback.
    """
    if isinstance(err, KeyError):
        text = str(err.args[0]) if len(err.args) == 1 else ""
        return _one_line(text) if " " in text.strip() else None
    if isinstance(err, OSError):
        named = err.filename is not None or isinstance(
            err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
        )
        return _one_line(str(err)) if named or err.errno in ENVIRONMENT_ERRNOS else None
    user = (ValueError, argparse.ArgumentError, *_loaded_classes(*USER_ERRORS))
    return _one_line(str(err)) if isinstance(err, user) and str(err).strip() else None


#: ``(module, class)`` of the exceptions beyond ValueError that mean a mistake in the input. Looked up only in modules
#: already imported (an exception of a class never imported was never raised), so that reporting an error never
#: imports torch or Lightning.
USER_ERRORS = (
    ("ecgfm.backbones.checkpoint", "CheckpointError"),
    ("ecgfm.data.shards", "ShardError"),
    ("ecgfm.data.sources.base", "RecordError"),
    ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
)


def _loaded_classes(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes named ``(module, class)`` whose modules are already imported."""
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "predict" and _predicts_records(rest):
        from ecgfm.commands.predict import run

        return run(rest)
    if command in LIGHTNING_COMMANDS:
        from ecgfm.commands.lightning import run_lightning

        run_lightning(argv)
        return 0
    if command in COMMANDS:
        return importlib.import_module(f"{__name__}.{COMMANDS[command]}").run(rest)
    print(f"ecgfm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


#: Options that make ``ecgfm predict`` Lightning's over shards (a recipe, a checkpoint, a recipe section).
RECIPE_OPTIONS = ("-c", "--config", "--ckpt_path", "--print_config", "--trainer", "--data", "--return_predictions")
RECIPE_SECTIONS = ("--trainer.", "--data.", "--model.", "--seed_everything", "--optimizer", "--lr_scheduler")


def _predicts_records(args: list[str]) -> bool:
    """``ecgfm predict`` on raw records (``--model NAME_OR_DIR RECORD...``, ``--help``) rather than Lightning's
    ``predict -c RECIPE --ckpt_path CKPT`` over shards, which any recipe option selects."""
    options = [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]
    return not any(option in RECIPE_OPTIONS or option.startswith(RECIPE_SECTIONS) for option in options)
