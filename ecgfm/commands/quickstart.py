"""``ecgfm quickstart``: bundled LUDB recordings -> shards -> fine-tune a small Net1D -> a report on the held-out
patients: each label's test AUROC per record with its 95 % interval and number of positives."""

from __future__ import annotations

import time
from pathlib import Path

from jsonargparse import ArgumentParser
from rich.console import Console

from ecgfm.commands.lightning import run_lightning
from ecgfm.quickstart import convert_bundled
from ecgfm.resources import find_recipe

RECIPE = "quickstart/net1d-small"
#: A label is scored on the test patients only with at least this many positive and negative test records: the
#: quickstart's 24 test records hold 1 with atrial fibrillation, whose AUROC would be a coin toss over 23 pairs.
MIN_POSITIVES = 5


def quickstart_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm quickstart",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="Convert the 120 LUDB recordings bundled with ecgfm into shards, fine-tune a small Net1D on their "
        "diagnoses, and report on the held-out test patients: each label's AUROC per record with its 95 % interval "
        "and number of positive records (labels with fewer than 5 positive or negative test records are listed, not "
        "scored), and a report folder (report.html, metrics.json).",
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
    """Convert, fine-tune on the training patients, report on the held-out ones; print where everything is."""
    from ecgfm.evaluation.report import ReportSettings, build_report
    from ecgfm.evaluation.report_pages import write_report

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

    console.rule("3/3 reporting on the held-out test patients (ecgfm report)")
    # the checkpoint records its data settings, so the report uses the training run's patient split
    report = build_report(checkpoint, shards, ReportSettings(min_positives=MIN_POSITIVES))
    folder = write_report(report, out / "report")
    console.rule("done")
    # plain print: rich would wrap long paths on a narrow terminal, and scripts read these lines
    lines = quickstart_lines(report.results)
    print("\n".join(lines))
    print(f"report:     {folder / 'report.html'}")
    print(f"checkpoint: {checkpoint}")
    print(f"metrics:    {Path(cli.trainer.logger.log_dir) / 'metrics.csv'}")
    print(f"took {time.perf_counter() - start:.0f} s")
    head = report.results["heads"]["diagnoses"]
    macro = (head.get("macro_auroc") or {}).get("estimate")
    return {"auroc": macro, "checkpoint": checkpoint, "report": folder, "results": report.results}


def quickstart_lines(results: dict) -> list[str]:
    """Each scored label's test AUROC per record with its interval and positives, the macro AUROC, and the labels
    left out with their count of positives."""
    from ecgfm.evaluation.report_pages import format_interval

    counts, level = results["counts"], f"{results['settings']['level']:.0%}"
    lines = []
    for name, head in results["heads"].items():
        if "skipped" in head:
            lines.append(f"{name}: not scored ({head['skipped']})")
            continue
        lines.append(
            f"test AUROC per record, {level} CI (patient bootstrap), {counts['units']} records of "
            f"{counts['patients']} held-out patients:"
        )
        width = max((len(entry["label"]) for entry in head.get("labels", [])), default=0)
        for entry in head.get("labels", []):
            lines.append(
                f"  {entry['label']:<{width}}  {format_interval(entry['auroc'])}  "
                f"{entry['positives']} positive of {entry['n']} test records"
            )
        if head.get("macro_auroc"):
            lines.append(
                f"test macro AUROC over {head['n_labels_scored']} labels: {format_interval(head['macro_auroc'])}"
            )
        if head.get("not_scored"):
            least = results["settings"]["min_positives"]
            left_out = ", ".join(f"{e['label']} ({e['positives']} positive)" for e in head["not_scored"])
            lines.append(f"not scored (fewer than {least} positive or negative test records): {left_out}")
    return lines
