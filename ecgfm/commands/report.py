"""``ecgfm report --model CKPT_OR_DIR --data SHARDS``: one folder with every head of a model scored on a split, with
intervals, validation thresholds, calibration, subgroups and saliency (HTML, Markdown, metrics.json, figures)."""

from __future__ import annotations

import argparse

from ecgfm.evaluation.subgroups import DEFAULT_AGE_BANDS


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgfm report",
        exit_on_error=False,
        description="Score every head of a model on one split of a shard folder and write one report folder: "
        "report.html (self-contained), report.md, metrics.json and figures/. Metrics are per record by default (a "
        "record's windows averaged), with 95 %% intervals from a patient-level bootstrap; decision thresholds are "
        "chosen on the validation split and applied unchanged; subgroups come from the metadata the shards store "
        "(ecgfm shard --metadata). See docs/report.md.",
    )
    parser.add_argument("--model", required=True, help="zoo name, published model folder, hf:// address or .ckpt")
    parser.add_argument("--data", help="the shard folder (default: the one a .ckpt was trained on)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"), help="default: test")
    parser.add_argument("--out", default="ecgfm-report", help="the report folder to write (default: ecgfm-report)")
    parser.add_argument("--unit", default="record", choices=("segment", "record", "patient"), help="default: record")
    parser.add_argument(
        "--aggregate", default="mean", choices=("mean", "max"), help="how windows (records) combine; default: mean"
    )
    parser.add_argument(
        "--threshold-method",
        default="youden",
        choices=("youden", "balanced_accuracy", "sensitivity", "specificity", "npv", "ppv", "fixed"),
        help="how each label's threshold is chosen on validation (default: youden)",
    )
    parser.add_argument(
        "--threshold-value", type=float, help="the sensitivity/specificity/NPV/PPV to reach, or the fixed threshold"
    )
    parser.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument(
        "--min-positives",
        type=int,
        default=10,
        help="score a label only with at least this many positive and negative units (default: 10)",
    )
    parser.add_argument(
        "--min-group-positives", type=int, default=5, help="the same for a subgroup's intervals (default: 5)"
    )
    parser.add_argument(
        "--age-bands",
        default=",".join(f"{edge:g}" for edge in DEFAULT_AGE_BANDS),
        help="edges of the age bands in years (default: 40,60,80 -> <40, 40-59, 60-79, >=80)",
    )
    parser.add_argument("--subgroups", help="metadata columns to show subgroups of (default: all the shards store)")
    parser.add_argument(
        "--cutoff",
        action="append",
        default=[],
        metavar="COLUMN>VALUE",
        help="a clinical cut-off of a regression column (potassium>5.5, labs/sodium<135); repeatable; default: "
        "potassium > 5.5 and >= 6.0, a lab's reference range",
    )
    parser.add_argument("--saliency", type=int, default=3, help="saliency examples per head (default: 3; 0: none)")
    parser.add_argument(
        "--saliency-method",
        default="integrated_gradients",
        choices=("integrated_gradients", "gradient", "gradient_x_input"),
        help="default: integrated_gradients",
    )
    parser.add_argument("--val-fraction", type=float, help="the patient split (default: the checkpoint's, or 0.15)")
    parser.add_argument("--test-fraction", type=float, help="the patient split (default: the checkpoint's, or 0.15)")
    parser.add_argument("--split-seed", type=int, help="the patient split's seed (default: the checkpoint's, or 0)")
    parser.add_argument("--split-file", help="a JSON file listing the patients of train, val and test")
    parser.add_argument(
        "--fit-temperature",
        action="store_true",
        help="fit each classification head's temperature on the validation split's logits and show ECE and Brier "
        "score at T = 1 and at the fitted T (the other numbers stay the model's own)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="segments per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1")
    parser.add_argument("--wandb-project", help="also log the metrics and figures to this wandb project")
    parser.add_argument("--wandb-name", help="the wandb run's name (default: report-<model>-<split>-<unit>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option} takes numbers separated by commas (40,60,80), got {text!r}") from None


def run(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    from ecgfm.evaluation.report import ReportSettings, build_report, parse_cutoff
    from ecgfm.evaluation.report_pages import write_report

    cutoffs: dict[str, list[tuple[str, float]]] = {}
    for text in args.cutoff:
        column, cut = parse_cutoff(text)
        cutoffs.setdefault(column, []).append(cut)
    settings = ReportSettings(
        split=args.split,
        unit=args.unit,
        aggregation=args.aggregate,
        threshold_method=args.threshold_method,
        threshold_value=args.threshold_value,
        n_resamples=args.n_resamples,
        level=args.level,
        seed=args.seed,
        min_positives=args.min_positives,
        min_group_positives=args.min_group_positives,
        age_bands=_numbers(args.age_bands, "--age-bands"),
        subgroups=[c.strip() for c in args.subgroups.split(",") if c.strip()] if args.subgroups else None,
        saliency_examples=args.saliency,
        saliency_method=args.saliency_method,
        cutoffs=cutoffs,
        batch_size=args.batch_size,
        device=args.device,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        split_file=args.split_file,
        fit_temperature=args.fit_temperature,
    )
    report = build_report(args.model, args.data, settings, progress=not args.no_progress)
    out = write_report(report, args.out, args.wandb_project, args.wandb_name)
    results = report.results
    print(
        f"{results['model']['name']} on {results['data']['root']} ({results['data']['split']}): "
        f"{results['counts']['units']} {results['unit']}s of {results['counts']['patients']} patients"
    )
    for line in summary_lines(results):
        print(f"  {line}")
    print(f"report: {out / 'report.html'}")
    print(f"        {out / 'report.md'}, {out / 'metrics.json'}")
    return 0


def summary_lines(results: dict) -> list[str]:
    """One line per scored label or column: its main metric with the interval and its number of positives."""
    from ecgfm.evaluation.report_pages import format_interval

    lines = []
    for name, head in results["heads"].items():
        if "skipped" in head:
            lines.append(f"{name}: not scored ({head['skipped']})")
            continue
        if head.get("macro_auroc"):
            lines.append(
                f"{name}: macro AUROC {format_interval(head['macro_auroc'])} over {head['n_labels_scored']} labels"
            )
        if head.get("temperature"):
            lines.append(f"{name}: {temperature_line(head['temperature'])}")
        for entry in head.get("labels", []):
            lines.append(
                f"{name} / {entry['label']}: AUROC {format_interval(entry.get('auroc'))}, "
                f"{entry['positives']} positive of {entry['n']} {results['unit']}s"
            )
        for entry in head.get("columns", []):
            unit = f" {entry['unit']}" if entry["unit"] else ""
            lines.append(f"{name} / {entry['label']}: MAE {format_interval(entry.get('mae'))}{unit}, n = {entry['n']}")
        for entry in head.get("not_scored", []):
            lines.append(f"{name} / {entry['label']}: not scored, {entry['reason']}")
    return lines


def temperature_line(info: dict) -> str:
    """The head's temperature, where it came from, and the mean ECE and Brier score at T = 1 and at that T."""
    if info.get("compared") is None:
        return f"temperature {info.get('note', 'not fitted')}"
    text = f"temperature {info['compared']:.4g} {info['source']}"
    means = [
        f"{metric} {info[f'mean_{key}_uncalibrated']:.3f} at T = 1 -> {info[f'mean_{key}_temperature_scaled']:.3f}"
        for key, metric in (("ece", "ECE"), ("brier", "Brier"))
        if f"mean_{key}_uncalibrated" in info
    ]
    return f"{text}; mean over labels {', '.join(means)}" if means else text
