"""``ecgfm quickstart``: bundled LUDB recordings -> shards -> fine-tune a small Net1D -> test macro AUROC."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

DATA_DIR = Path(__file__).resolve().parent / "ludb"
RECIPE = "quickstart/net1d-small.yaml"

#: ludb.csv columns whose cells hold the diagnoses (several per cell, one per line).
LUDB_DIAGNOSIS_COLUMNS = [
    "Rhythms",
    "Electric axis of the heart",
    "Conduction abnormalities",
    "Extrasystolies",
    "Hypertrophies",
    "Cardiac pacing",
    "Ischemia",
    "Non-specific repolarization abnormalities",
    "Other states",
]


def convert_bundled(out: Path, progress: bool = True):
    """Convert the bundled LUDB records with their diagnoses (target ``diagnoses``) into shards under ``out``."""
    from ecgfm.data.convert import convert

    return convert(
        source=DATA_DIR / "data",
        out=out,
        reader="wfdb",
        labels=DATA_DIR / "ludb.csv",
        record_column="ID",
        multilabel={"diagnoses": LUDB_DIAGNOSIS_COLUMNS},
        progress=progress,
    )


def run_quickstart_cli(argv: list[str]) -> int:
    """Parse ``ecgfm quickstart`` options and run it."""
    parser = argparse.ArgumentParser(prog="ecgfm quickstart", description=__doc__)
    parser.add_argument("--out", default="ecgfm-quickstart", help="working folder (shards, logs, checkpoints)")
    parser.add_argument("--pretrained", default=None, help="an ECGFounder 12-lead .pth to fine-tune from")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs")
    parser.add_argument("--config", default=None, help="recipe to use (default: recipes/quickstart/net1d-small.yaml)")
    args = parser.parse_args(argv)
    run_quickstart(Path(args.out), args.pretrained, args.epochs, args.config)
    return 0


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


def run_quickstart(out: Path, pretrained: str | None = None, epochs: int | None = None, config: str | None = None):
    """Convert, fine-tune on the training patients, test on the held-out ones; print where everything is."""
    from ecgfm.cli import recipes_dir, run_lightning

    console = Console()
    start = time.perf_counter()
    out = Path(out)
    recipe = Path(config) if config else recipes_dir() / RECIPE
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; pass --config PATH (recipes/ ships with the source)")
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
