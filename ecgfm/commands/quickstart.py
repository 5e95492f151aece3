"""``ecgfm quickstart``: bundled LUDB recordings -> shards -> fine-tune a small Net1D -> test macro AUROC."""

from __future__ import annotations

import time
from pathlib import Path

from jsonargparse import ArgumentParser
from rich.console import Console

from ecgfm.commands.lightning import run_lightning
from ecgfm.quickstart import convert_bundled
from ecgfm.resources import find_recipe

RECIPE = "quickstart/net1d-small"


def quickstart_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm quickstart",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="Convert the 120 LUDB recordings bundled with ecgfm into shards, fine-tune a small Net1D on their "
        "diagnoses, test it on held-out patients and print the macro AUROC.",
    )
    parser.add_argument("--out", type=str, default="ecgfm-quickstart", help="folder for shards, logs, checkpoints")
    parser.add_argument("--pretrained", type=str | None, default=None, help="an ECGFounder 12-lead .pth to start from")
    parser.add_argument("--epochs", type=int | None, default=None, help="override the recipe's max_epochs")
    parser.add_argument("--config", type=str, default=RECIPE, help="the recipe: a YAML file or a shipped recipe name")
    parser.add_argument(
        "--convert_only",
        type=bool,
        default=False,
        help="only write the shards to OUT/shards (where the quickstart recipe looks for them with the default OUT)",
    )
    return parser


def run(argv: list[str]) -> int:
    cfg = quickstart_parser().parse_args(argv)
    if cfg.convert_only:
        shards = Path(cfg.out) / "shards"
        convert_bundled(shards).print()
        print(f"shards: {shards}")
        return 0
    run_quickstart(Path(cfg.out), cfg.pretrained, cfg.epochs, cfg.config)
    return 0


def recipe_path(config: str) -> Path:
    """The recipe file ``config`` names: a file here, else a shipped recipe."""
    path = Path(config)
    found = path if path.is_file() else find_recipe(config)
    if found is None:
        raise FileNotFoundError(f"recipe {config} not found (`ecgfm recipes list` shows the shipped ones)")
    return found


def recipe_overrides(
    recipe: Path, shards: Path, out: Path, pretrained: str | None = None, epochs: int | None = None
) -> list[str]:
    """The LightningCLI arguments of the quickstart: the recipe, pointed at ``shards`` and ``out``."""
    overrides = ["--config", str(recipe), f"--data.root={shards}", f"--trainer.default_root_dir={out}"]
    overrides.append(f"--trainer.logger.init_args.save_dir={out / 'logs'}")
    if pretrained:
        overrides += ["--model.backbone=ecgfounder-12lead", f"--model.pretrained={pretrained}"]
    if epochs is not None:
        overrides.append(f"--trainer.max_epochs={epochs}")
    return overrides


def run_quickstart(out: Path, pretrained: str | None = None, epochs: int | None = None, config: str = RECIPE):
    """Convert, fine-tune on the training patients, test on the held-out ones; print where everything is."""
    console = Console()
    start = time.perf_counter()
    out = Path(out)
    recipe = recipe_path(config)
    console.rule("1/3 converting the bundled LUDB recordings to HDF5 shards")
    shards = out / "shards"
    summary = convert_bundled(shards)
    summary.print(console)

    overrides = recipe_overrides(recipe, shards, out, pretrained, epochs)

    console.rule("2/3 fine-tuning (train patients; validation patients pick the best epoch)")
    cli = run_lightning(["fit", *overrides])
    checkpoint = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path

    console.rule("3/3 testing the best checkpoint on held-out patients")
    test_cli = run_lightning(["test", *overrides, f"--ckpt_path={checkpoint}"])
    results = test_cli.trainer.callback_metrics
    auroc = float(results["test/diagnoses/auroc"])
    console.rule("done")
    # plain print: rich would wrap long paths on a narrow terminal, and scripts read these lines
    print(f"test macro AUROC over {int(results['test/diagnoses/n_labels_scored'])} labels: {auroc:.3f}")
    for key in sorted(k for k in results if k.startswith("test/diagnoses/auroc/")):
        print(f"  {key.removeprefix('test/diagnoses/auroc/')}: {float(results[key]):.3f}")
    print(f"checkpoint: {checkpoint}")
    print(f"metrics:    {Path(cli.trainer.logger.log_dir) / 'metrics.csv'}")
    print(f"test log:   {Path(test_cli.trainer.logger.log_dir) / 'metrics.csv'}")
    print(f"took {time.perf_counter() - start:.0f} s")
    return {"auroc": auroc, "checkpoint": checkpoint, "results": {k: float(v) for k, v in results.items()}}
