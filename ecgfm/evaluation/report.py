"""One report per model: every head of a model scored on a shard split at the chosen unit (record by default), with
intervals, thresholds chosen on validation, calibration, subgroups and saliency examples, written as one folder
(``report.html``, ``report.md``, ``metrics.json``, ``figures/``) by ``report_pages.write_report``.

What is computed, per head:

- classification heads (multilabel, binary, multiclass and ordinal one-vs-rest): per label with at least
  ``min_positives`` positive and negative units, AUROC and AUPRC with a stratified patient-level bootstrap interval;
  the decision threshold chosen on the validation split (``threshold_method``) and applied unchanged to the report
  split, with sensitivity, specificity, PPV, NPV, F1 and MCC and their intervals; the confusion matrix; the
  reliability curve, ECE and Brier score; labels left out are listed with the reason;
- regression heads (regression, potassium, labs): MAE, RMSE and Pearson r with intervals, Bland-Altman bias and
  limits of agreement, and classification at clinical cut-offs of the value (potassium: K+ > 5.5 and >= 6.0 mmol/L;
  labs: outside their reference range);
- per subgroup of the metadata the shards store (age bands, sex, site, ...): the same metrics with intervals;
- a few saliency examples: the true positives with the highest scores, drawn on a paper ECG.

The page rendering lives in ``ecgfm.evaluation.report_pages``; this module computes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.evaluation import figures as fig
from ecgfm.evaluation.bootstrap import Interval, bootstrap_ci, strata_by_any_positive
from ecgfm.evaluation.calibration import regression_threshold_report
from ecgfm.evaluation.metrics_np import auprc, auroc, mae, pearson_r, rmse, weight_matrix
from ecgfm.evaluation.subgroups import DEFAULT_AGE_BANDS, group_order, subgroups
from ecgfm.evaluation.thresholds import METHODS as THRESHOLD_METHODS
from ecgfm.evaluation.thresholds import binary_report, choose_threshold, confusion_matrix
from ecgfm.evaluation.units import UNITS, Segments, Units, aggregate, predict_segments

__all__ = [
    "CLASSIFICATION_KINDS",
    "POTASSIUM_CUTOFFS",
    "REGRESSION_KINDS",
    "ReportSettings",
    "build_report",
    "macro_auroc",
    "parse_cutoff",
]

#: Head kinds scored label by label as yes/no (one-vs-rest for the classes of multiclass and ordinal heads).
CLASSIFICATION_KINDS = ("multilabel", "binary", "multiclass", "ordinal")
#: Head kinds scored as values in their unit.
REGRESSION_KINDS = ("regression", "potassium", "labs")
#: Clinical cut-offs of serum potassium (mmol/L) the report classifies at: hyperkalemia and its treatment threshold.
POTASSIUM_CUTOFFS: tuple[tuple[str, float], ...] = ((">", 5.5), (">=", 6.0))
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass
class ReportSettings:
    """What a report computes; the defaults are the command's (``ecgfm report --help``)."""

    split: str = "test"
    unit: str = "record"
    aggregation: str = "mean"
    threshold_method: str = "youden"
    threshold_value: float | None = None
    n_resamples: int = 2000
    level: float = 0.95
    seed: int = 0
    min_positives: int = 10
    min_group_positives: int = 5
    age_bands: tuple[float, ...] = DEFAULT_AGE_BANDS
    subgroups: list[str] | None = None
    saliency_examples: int = 3
    saliency_method: str = "integrated_gradients"
    cutoffs: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # "head/column" or "column" -> cuts
    batch_size: int = 64
    device: str = "auto"
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    split_file: str | None = None
    fit_temperature: bool = False

    def check(self) -> None:
        """One line naming the setting that cannot work."""
        if self.split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be train, val, test or all, got {self.split!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.aggregation not in ("mean", "max"):
            raise ValueError(f"aggregation must be mean or max, got {self.aggregation!r}")
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold method must be one of {', '.join(THRESHOLD_METHODS)}")
        if self.threshold_method not in ("youden", "balanced_accuracy") and self.threshold_value is None:
            raise ValueError(f"threshold method {self.threshold_method!r} needs a threshold value")
        if self.n_resamples < 100:
            raise ValueError(f"n_resamples must be at least 100 for a 95 % interval, got {self.n_resamples}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.min_positives < 1 or self.min_group_positives < 1:
            raise ValueError("min_positives and min_group_positives must be at least 1")
        if self.fit_temperature and self.split == "all":
            raise ValueError("fitting a temperature needs the validation split: report on train, val or test")


def parse_cutoff(text: str) -> tuple[str, tuple[str, float]]:
    """``"potassium>5.5"`` or ``"labs/sodium<135"`` -> ``("potassium", (">", 5.5))``: a clinical cut-off of a
    regression column (``head/column`` or ``column``) for ``--cutoff``."""
    for op in (">=", "<=", ">", "<"):
        name, sep, value = text.partition(op)
        if sep and name.strip():
            try:
                return name.strip(), (op, float(value))
            except ValueError:
                break
    raise ValueError(f"cut-off {text!r} must read COLUMN>VALUE, COLUMN>=VALUE, COLUMN<VALUE or COLUMN<=VALUE")


# ----------------------------------------------------------------------------------------------------- metrics


@weight_matrix
def macro_auroc(y: Any, score: Any, known: Any, w: Any = None) -> Any:
    """Mean AUROC over the columns of ``y`` / ``score`` ``[N, K]``, each over its ``known`` rows, with resample
    weights ``w`` (``[N]`` or ``[R, N]``) for the bootstrap; NaN where no column has both classes."""
    y, score, known = np.asarray(y, np.float64), np.asarray(score, np.float64), np.asarray(known, bool)
    single = w is None or np.ndim(w) == 1
    weights = np.ones((1, len(y))) if w is None else np.atleast_2d(np.asarray(w, np.float64))
    values = np.stack(
        [
            np.atleast_1d(auroc(y[known[:, k], k], score[known[:, k], k], weights[:, known[:, k]]))
            for k in range(y.shape[1])
        ]
    )  # [K, R]
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        mean = np.where(finite, values, 0.0).sum(0) / finite.sum(0)
    return float(mean[0]) if single else mean


def _interval(
    metric: Callable[..., Any], *arrays: Any, groups: Any, strata: Any, settings: ReportSettings
) -> Interval | None:
    """The bootstrap interval of ``metric``, or None where the metric is undefined on the data."""
    try:
        return bootstrap_ci(
            metric, *arrays, groups=groups, strata=strata, n_resamples=settings.n_resamples, level=settings.level,
            seed=settings.seed,
        )  # fmt: skip
    except ValueError:
        return None


def _counts(y: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """Units, patients, positive units and patients with a positive unit of one label."""
    positive = y > 0.5
    return {
        "n": int(len(y)),
        "n_patients": int(len(np.unique(groups.astype(str)))),
        "positives": int(positive.sum()),
        "negatives": int((~positive).sum()),
        "positive_patients": int(len(np.unique(groups[positive].astype(str)))),
    }


# ----------------------------------------------------------------------------------------------------- thresholds


def _binary_report(
    y: np.ndarray, score: np.ndarray, threshold: float, groups: np.ndarray, settings: ReportSettings, op: str = ">="
) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV, F1 and MCC at ``score op threshold`` with intervals, and the counts:
    proportions by Wilson's interval when every patient gives one unit, else all by the patient bootstrap."""
    return binary_report(
        y, score, threshold, groups=groups, strata=strata_by_any_positive(y, groups), op=op, level=settings.level,
        n_resamples=settings.n_resamples, seed=settings.seed, proportion_interval=_proportions(groups),
    )  # fmt: skip


def _proportions(groups: np.ndarray) -> str:
    """Wilson's interval for rates when every patient gives one unit (independent cases), else the patient bootstrap."""
    return "wilson" if len(np.unique(groups.astype(str))) == len(groups) else "bootstrap"


# ----------------------------------------------------------------------------------------------------- the model side


@dataclass
class HeadPlan:
    """One head as the report scores it: its kind, target and, per label (or column), the output it reads, the
    target column and the model's stored decision threshold."""

    name: str
    kind: str
    target: str
    labels: list[str]
    outputs: list[str]  # the public output scored per label (a probability or a value)
    columns: list[int]  # the label's column in the shard target
    stored_thresholds: list[float | None]
    units: list[str] = field(default_factory=list)  # regression: the unit of each column
    cutoffs: list[list[tuple[str, float]]] = field(default_factory=list)  # regression: clinical cut-offs per column
    decision: str | None = None  # multiclass, ordinal: the output holding the predicted class (argmax, median level)
    skip: str | None = None  # why the head is not scored


def plan_heads(model: Any, manifest: Any, settings: ReportSettings) -> list[HeadPlan]:
    """Each head of ``model`` matched to its target in the data (``manifest``), or with the reason it is skipped."""
    from ecgfm.heads.regression import unit_suffix

    public = {(head, key): name for name, head, key in model.output_keys()}
    rules = {rule["score"]: rule for rule in model.decision_rules() if rule.get("kind") == "compare"}
    plans = []
    for name, head in model.heads.items():
        plan = HeadPlan(name, head.kind, head.target, list(head.labels), [], [], [])
        spec = manifest.targets.get(head.target)
        if head.kind not in CLASSIFICATION_KINDS + REGRESSION_KINDS:
            plan.skip = f"the report does not score {head.kind} heads yet"
        elif spec is None:
            plan.skip = (
                f"its target {head.target!r} is not in the data (targets: {', '.join(manifest.targets) or 'none'})"
            )
        elif missing := [label for label in head.labels if label not in spec.names]:
            plan.skip = f"labels {missing} are not in the data's target {head.target!r}"
        if plan.skip:
            plans.append(plan)
            continue
        plan.columns = [spec.names.index(label) for label in head.labels]
        if head.kind in CLASSIFICATION_KINDS:
            plan.outputs = [public[(name, f"p_{label}")] for label in head.labels]
            plan.stored_thresholds = [
                float(rules[output]["value"]) if output in rules and rules[output]["op"] == ">=" else None
                for output in plan.outputs
            ]
            plan.decision = next(
                (
                    rule["output"]
                    for rule in model.decision_rules()
                    if rule.get("kind") in ("argmax", "median_level") and list(rule.get("scores", [])) == plan.outputs
                ),
                None,
            )
        else:
            plan.units = list(head.column_units())
            plan.outputs = [
                public[(name, f"{label}{unit_suffix(unit)}")]
                for label, unit in zip(head.labels, plan.units, strict=True)
            ]
            plan.stored_thresholds = [None] * len(head.labels)
            plan.cutoffs = [_cutoffs_of(head, label, settings) for label in head.labels]
        plans.append(plan)
    return plans


def _cutoffs_of(head: Any, label: str, settings: ReportSettings) -> list[tuple[str, float]]:
    """Clinical cut-offs of one regression column: given ones (``--cutoff``), else potassium's, else a lab's range."""
    given = settings.cutoffs.get(f"{head.name}/{label}") or settings.cutoffs.get(label)
    if given:
        return list(given)
    if head.kind == "potassium":
        return list(POTASSIUM_CUTOFFS)
    low, high, *_ = list(getattr(head, "ranges", {}).get(label) or [None, None])
    return [*([("<", float(low))] if low is not None else []), *([(">", float(high))] if high is not None else [])]


# ----------------------------------------------------------------------------------------------------- the report


@dataclass
class Evaluation:
    """The scored units of the report split and of validation (for thresholds), with where they came from."""

    units: Units
    segments: Segments
    val_units: Units | None
    val_source: str
    positions: np.ndarray
    val_segments: Segments | None = None
    #: per classification head whose probabilities a temperature changes: what :func:`temperature_scaling` found
    temperature: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    """What :func:`build_report` computed: ``results`` is ``metrics.json``'s content; ``figures`` maps a file name
    under ``figures/`` to its matplotlib figure and ``captions`` to the sentence the pages print under it."""

    results: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)


def split_settings(model_path: str | Path, settings: ReportSettings) -> tuple[dict[str, Any], str]:
    """The patient split (fractions, seed, split file) the report uses, and where it came from: the options given,
    else the checkpoint's training run (a ``.ckpt`` records its data settings), else ShardDataModule's defaults."""
    defaults = {"val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0, "split_file": None}
    source = "ShardDataModule's defaults (val 0.15, test 0.15, seed 0)"
    stored = _checkpoint_data(model_path)
    if stored:
        defaults.update({key: stored[key] for key in defaults if key in stored})
        source = f"the checkpoint's training run ({Path(model_path).name})"
    given = {key: getattr(settings, key) for key in defaults if getattr(settings, key) is not None}
    if given:
        source = "the options given" if len(given) == len(defaults) or not stored else f"{source}, with options given"
    return {**defaults, **given}, source


def _checkpoint_data(model_path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's ``datamodule_hyper_parameters`` (its data root and split), else ``{}``."""
    path = Path(str(model_path))
    if path.suffix != ".ckpt" or not path.is_file():
        return {}
    from ecgfm.backbones.checkpoint import safe_torch_load

    stored = safe_torch_load(path, mmap=True)
    return dict(stored.get("datamodule_hyper_parameters") or {})


def data_root(model_path: str | Path, data: str | Path | None) -> Path:
    """The shard folder: ``data``, else the one the checkpoint was trained on."""
    if data is not None:
        return Path(data)
    root = _checkpoint_data(model_path).get("root")
    if not root:
        raise ValueError(f"{model_path} records no training data: give the shard folder with --data")
    return Path(root)


def evaluate_units(
    model: Any, root: Path, plans: list[HeadPlan], split: dict[str, Any], settings: ReportSettings, progress: bool
) -> Evaluation:
    """Run the model over the report split and, unless the report is on every segment, over validation; aggregate
    both to the report's unit."""
    from ecgfm.data.dataset import ShardDataset
    from ecgfm.data.index import SegmentIndex
    from ecgfm.embeddings import resolve_device

    index = SegmentIndex(root)
    if settings.split == "all":
        positions = {"all": np.arange(index.n_segments, dtype=np.int64)}
    else:
        positions = index.split_positions(
            split["val_fraction"], split["test_fraction"], split["split_seed"], split["split_file"]
        )
    chosen = positions[settings.split]
    if not len(chosen):
        raise ValueError(f"split {settings.split!r} of {root} is empty ({index.n_segments} segments in the folder)")
    targets = sorted({plan.target for plan in plans if plan.skip is None})
    kinds = {name: spec.kind for name, spec in index.manifest.targets.items()}
    device = resolve_device(settings.device)
    metadata = settings.subgroups if settings.subgroups is not None else None

    def scored(split_name: str, where: np.ndarray) -> tuple[Units, Segments]:
        dataset = ShardDataset(root, where, targets=targets)
        segments = predict_segments(
            model, dataset, settings.batch_size, device, targets, metadata, progress,
            description=f"scoring {split_name} segments", keep_logits=True,
        )  # fmt: skip
        units = aggregate(
            segments, settings.unit, settings.aggregation, model.score_names(), model.decision_rules(), kinds
        )
        return units, segments

    units, segments = scored(settings.split, chosen)
    val_units, val_segments = None, None
    val_source = "no validation split (--split all): the model's stored thresholds"
    if settings.split != "all" and len(positions["val"]):
        if settings.split == "val":
            val_units, val_segments = units, segments
        else:
            val_units, val_segments = scored("validation", positions["val"])
        same = " (the report split itself: optimistic)" if settings.split == "val" else ""
        val_source = f"validation split, {len(val_units)} {settings.unit}s{same}"
    return Evaluation(units, segments, val_units, val_source, chosen, val_segments)


def build_report(
    model_path: str | Path,
    data: str | Path | None = None,
    settings: ReportSettings | None = None,
    progress: bool = True,
    model: Any = None,
) -> Report:
    """Score every head of the model (zoo name, published folder or ``.ckpt``) on ``data``; see the module doc."""
    from ecgfm.data.shards import Manifest
    from ecgfm.pretrained import load

    settings = settings or ReportSettings()
    settings.check()
    root = data_root(model_path, data)
    manifest = Manifest.load(root)
    unknown = [name for name in settings.subgroups or [] if name not in manifest.metadata]
    if unknown:  # before the model runs: a typo costs a second, not a pass over the data
        raise KeyError(
            f"subgroup columns {unknown} are not in {root / 'manifest.json'} (its metadata: "
            f"{', '.join(manifest.metadata) or 'none'}; `ecgfm shard --metadata COL[,COL]` stores some)"
        )
    split, split_source = split_settings(model_path, settings)
    model = model if model is not None else load(model_path)
    plans = plan_heads(model, manifest, settings)
    evaluation = evaluate_units(model, root, plans, split, settings, progress)
    evaluation.temperature = temperature_scaling(model, plans, evaluation, settings)
    units = evaluation.units
    groups = subgroups(units.metadata, settings.age_bands, settings.subgroups) if units.metadata else {}
    report = Report(
        {
            "format": "ecgfm-report",
            "version": 1,
            "model": {"given": str(model_path), "name": _model_name(model, model_path)},
            "data": {"root": str(root), "split": settings.split, "split_settings": split, "split_from": split_source},
            "unit": settings.unit,
            "aggregation": settings.aggregation,
            "settings": {key: value for key, value in asdict(settings).items() if key not in ("device",)},
            "counts": {
                "segments": int(len(evaluation.segments)),
                "records": int(len(np.unique(evaluation.segments.record_id.astype(str)))),
                "patients": int(len(np.unique(evaluation.segments.patient_id.astype(str)))),
                "units": int(len(units)),
            },
            "thresholds_from": evaluation.val_source,
            "subgroup_columns": list(groups),
            "heads": {},
            "metrics": {},
        }
    )
    for plan in plans:
        if plan.skip is not None:
            report.results["heads"][plan.name] = {"kind": plan.kind, "target": plan.target, "skipped": plan.skip}
            continue
        scorer = _score_classification if plan.kind in CLASSIFICATION_KINDS else _score_regression
        scorer(report, plan, evaluation, groups, settings)
        _saliency(report, plan, model, root, evaluation, settings)
    return report


def _model_name(model: Any, given: str | Path) -> str:
    """The card's name, else the backbone's with the file it came from (``net1d-small (best-epoch=35.ckpt)``)."""
    if model.card.get("name"):
        return str(model.card["name"])
    return f"{model.name} ({Path(str(given)).name})" if Path(str(given)).exists() else model.name


def _key(settings: ReportSettings, head: str, metric: str, label: str | None = None, group: str | None = None) -> str:
    """``test/record/diagnoses/auroc/Sinus rhythm``: split, unit, head, [subgroup,] metric, label."""
    parts = [settings.split, settings.unit, head, *([group] if group else []), metric, *([label] if label else [])]
    return "/".join(parts)


def _put(
    report: Report, key: str, value: Interval | float | int | None, counts: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Record one metric under its flat key (estimate, low, high, level, method; the unit and, from ``counts``, the
    units, patients and positives it was computed on) and return its entry."""
    if value is None:
        return None
    entry = value.to_dict() if isinstance(value, Interval) else {"estimate": float(value)}
    entry["unit"] = key.split("/")[1]
    entry.update({name: int(counts[name]) for name in ("n", "n_patients", "positives") if name in (counts or {})})
    report.results["metrics"][key] = entry
    return entry


def _legend(label: str, interval: Interval | None) -> str:
    return f"{fig.wrap_label(label, 30)}: {interval}" if interval is not None else label


# ----------------------------------------------------------------------------------------------------- classification


def _label_arrays(units: Units | None, plan: HeadPlan, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, y, score, patient)`` of one label over the units whose target for it is known."""
    if units is None:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty, empty.astype(object)
    y = units.targets[plan.target][:, plan.columns[i]]
    rows = np.flatnonzero(np.isfinite(y))
    return rows, y[rows], units.outputs[plan.outputs[i]][rows], units.patient_id[rows]


def _score_classification(
    report: Report, plan: HeadPlan, evaluation: Evaluation, groups: Mapping[str, np.ndarray], settings: ReportSettings
) -> None:
    """Per label: counts, AUROC/AUPRC, threshold from validation and the metrics there, calibration, confusion; then
    the macro AUROC, the figures and the subgroup table."""
    units = evaluation.units
    head: dict[str, Any] = {"kind": plan.kind, "target": plan.target, "labels": [], "not_scored": []}
    curves, reliability, matrices, scored = [], [], [], []
    for i, label in enumerate(plan.labels):
        rows, y, score, patient = _label_arrays(units, plan, i)
        counts = _counts(y, patient)
        entry: dict[str, Any] = {"label": label, "output": plan.outputs[i], **counts}
        if min(counts["positives"], counts["negatives"]) < settings.min_positives:
            fewest = "positive" if counts["positives"] <= counts["negatives"] else "negative"
            k = min(counts["positives"], counts["negatives"])
            entry["reason"] = (
                f"{k} {fewest} {settings.unit}{'' if k == 1 else 's'} in {settings.split} "
                f"(fewer than {settings.min_positives})"
            )
            head["not_scored"].append(entry)
            continue
        strata = strata_by_any_positive(y, patient)
        entry["auroc"] = _put(
            report,
            _key(settings, plan.name, "auroc", label),
            _interval(auroc, y, score, groups=patient, strata=strata, settings=settings),
            counts,
        )
        entry["auprc"] = _put(
            report,
            _key(settings, plan.name, "auprc", label),
            _interval(auprc, y, score, groups=patient, strata=strata, settings=settings),
            counts,
        )
        threshold, source = _threshold_for(plan, i, evaluation, settings)
        entry["threshold"] = {"value": threshold, "method": settings.threshold_method, "chosen_on": source}
        operating = _binary_report(y, score, threshold, patient, settings)
        for metric in ("sensitivity", "specificity", "ppv", "npv", "f1", "mcc"):
            value = operating.get(metric)
            entry[metric] = _put(
                report, _key(settings, plan.name, metric, label), value if isinstance(value, Interval) else None, counts
            )
        tp, fp, fn, tn = (int(operating[key]) for key in ("tp", "fp", "fn", "tn"))
        entry["confusion"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        matrices.append((label, np.array([[tn, fp], [fn, tp]]), ["no", "yes"]))
        entry["calibration"] = _calibration(y, score, patient, report, settings, plan.name, label, reliability)
        if plan.name in evaluation.temperature:
            _temperature_comparison(report, entry, evaluation.temperature[plan.name], plan, i, rows, y, settings)
        head["labels"].append(entry)
        curves.append((label, y, score, entry))
        scored.append(i)
    _macro(report, head, plan, units, scored, settings)
    if plan.name in evaluation.temperature:
        head["temperature"] = _temperature_summary(report, head, evaluation.temperature[plan.name], plan, settings)
    _classification_figures(report, plan, head, curves, reliability, matrices, settings)
    if plan.decision is not None:
        head["confusion_matrix"] = _class_confusion(report, plan, units, settings)
    head["subgroups"] = _classification_subgroups(report, plan, units, groups, head, scored, settings)
    report.results["heads"][plan.name] = head


def _threshold_for(plan: HeadPlan, i: int, evaluation: Evaluation, settings: ReportSettings) -> tuple[float, str]:
    """The label's threshold chosen on validation, else the model's stored one, else 0.5; and where it came from."""
    _, y, score, _ = _label_arrays(evaluation.val_units, plan, i)
    if len(y) and 0 < (y > 0.5).sum() < len(y):
        chosen = choose_threshold(y, score, settings.threshold_method, settings.threshold_value)
        return float(chosen), f"{evaluation.val_source} ({settings.threshold_method})"
    if plan.stored_thresholds[i] is not None:
        why = "no validation split" if evaluation.val_units is None else "validation lacks a class"
        return float(plan.stored_thresholds[i]), f"the model's stored threshold ({why})"
    return 0.5, "0.5 (no validation split and no stored threshold)"


def _calibration(
    y: np.ndarray,
    p: np.ndarray,
    patient: np.ndarray,
    report: Report,
    settings: ReportSettings,
    head: str,
    label: str,
    curves: list,
) -> dict[str, Any]:
    """ECE and the Brier score (with its patient bootstrap interval) of probabilities ``p``, and the label's
    reliability curve (10 equal-width bins)."""
    from ecgfm.evaluation import calibration

    curve = calibration.reliability_curve(y, p)
    counts = _counts(y, patient)
    ece = float(calibration.expected_calibration_error(y, p))
    brier = _interval(brier_score, y, p, groups=patient, strata=strata_by_any_positive(y, patient), settings=settings)
    legend = f"{fig.wrap_label(label, 28)}: ECE {ece:.3f}, Brier {brier.estimate if brier else math.nan:.3f}"
    curves.append((legend, curve["mean_predicted"], curve["observed"], curve["count"]))
    return {
        "ece": _put(report, _key(settings, head, "ece", label), ece, counts),
        "brier": _put(report, _key(settings, head, "brier", label), brier, counts),
    }


# ----------------------------------------------------------------------------------------------------- temperature


def temperature_scaling(
    model: Any, plans: list[HeadPlan], evaluation: Evaluation, settings: ReportSettings
) -> dict[str, dict[str, Any]]:
    """Per classification head whose probabilities a temperature changes (the model carries T != 1, or
    ``fit_temperature`` fits one on the validation split's per-segment logits): the temperature compared with T = 1,
    where it came from, and the report split's probabilities per unit at T = 1 and at that temperature."""
    from ecgfm.evaluation.temperature import fit_head_temperature

    out: dict[str, dict[str, Any]] = {}
    for plan in plans:
        head = model.heads[plan.name]
        if plan.skip is not None or plan.kind not in CLASSIFICATION_KINDS or head.temperature_kind is None:
            continue
        stored = float(head.temperature)
        info: dict[str, Any] = {"stored": stored, "compared": stored if stored != 1.0 else None}
        info["source"] = f"stored with the model (T = {stored:.4g})" if stored != 1.0 else None
        val = evaluation.val_segments
        if settings.fit_temperature and (val is None or not len(val)):
            info["note"] = "not fitted: the validation split is empty"
        elif settings.fit_temperature:
            try:
                fitted = fit_head_temperature(head, val.logits[plan.name], val.targets[plan.target][:, plan.columns])
            except ValueError as err:
                info["note"] = f"not fitted: {err}"
            else:
                n_patients = len(np.unique(val.patient_id.astype(str)))
                same = "; the report split itself: optimistic" if settings.split == "val" else ""
                info.update(
                    fitted=fitted,
                    compared=fitted["temperature"],
                    source=f"fitted on the validation split ({len(val)} segments of {n_patients} patients{same})",
                )
        if info["compared"] is None and "note" not in info:
            continue
        if info["compared"] is not None:
            info["outputs"] = {
                "uncalibrated": _unit_scores(model, plan, evaluation.segments, 1.0, settings),
                "temperature_scaled": _unit_scores(model, plan, evaluation.segments, info["compared"], settings),
            }
        out[plan.name] = info
    return out


def _unit_scores(
    model: Any, plan: HeadPlan, segments: Segments, temperature: float, settings: ReportSettings
) -> dict[str, np.ndarray]:
    """The head's probabilities per unit with its temperature set to ``temperature`` (the head is left as it was)."""
    import torch

    head = model.heads[plan.name]
    stored = float(head.temperature)
    logits = torch.as_tensor(segments.logits[plan.name], dtype=torch.float32, device=head.temperature.device)
    head.set_temperature(temperature)
    try:
        with torch.no_grad():
            post = head.postprocess(logits)
    finally:
        head.set_temperature(stored)
    public = {key: name for name, owner, key in model.output_keys() if owner == plan.name}
    scores = {public[k]: v.double().cpu().numpy() for k, v in post.items() if public[k] in plan.outputs}
    only = Segments(segments.positions, segments.record_id, segments.patient_id, segments.segment_start, scores)
    return aggregate(only, settings.unit, settings.aggregation, list(scores)).outputs


def _temperature_comparison(
    report: Report,
    entry: dict,
    info: Mapping[str, Any],
    plan: HeadPlan,
    i: int,
    rows: np.ndarray,
    y: np.ndarray,
    settings: ReportSettings,
) -> None:
    """ECE and Brier score of one label at T = 1 (``uncalibrated``) and at the head's temperature
    (``temperature_scaled``), as ``entry["calibration"]`` entries and metrics.json keys."""
    from ecgfm.evaluation import calibration

    if "outputs" not in info:
        return
    counts = {key: entry[key] for key in ("n", "n_patients", "positives")}
    label = plan.labels[i]
    for name, outputs in info["outputs"].items():
        p = outputs[plan.outputs[i]][rows]
        ece = calibration.expected_calibration_error(y, p)
        brier = calibration.brier_score(y, p)
        entry["calibration"][name] = {
            "temperature": 1.0 if name == "uncalibrated" else float(info["compared"]),
            "ece": _put(report, _key(settings, plan.name, f"ece_{name}", label), ece, counts),
            "brier": _put(report, _key(settings, plan.name, f"brier_{name}", label), brier, counts),
        }


def _temperature_summary(
    report: Report, head: dict, info: Mapping[str, Any], plan: HeadPlan, settings: ReportSettings
) -> dict[str, Any]:
    """The head's temperature entry: stored, compared and where from, the validation NLL of a fit, and the mean ECE
    and Brier score over the scored labels at T = 1 and at the temperature."""
    summary = {key: info[key] for key in ("stored", "compared", "source", "note") if info.get(key) is not None}
    if "fitted" in info:
        summary["fit"] = dict(info["fitted"])
    counts = {"n": report.results["counts"]["units"]}
    if info.get("compared") is not None:
        _put(report, _key(settings, plan.name, "temperature"), float(info["compared"]), counts)
    for name in ("uncalibrated", "temperature_scaled"):
        for metric in ("ece", "brier"):
            values = [e["calibration"][name][metric]["estimate"] for e in head["labels"] if name in e["calibration"]]
            if values:
                summary[f"mean_{metric}_{name}"] = float(np.mean(values))
    return summary


@weight_matrix
def brier_score(y: Any, p: Any, w: Any = None) -> Any:
    """Weighted Brier score, mean (p - y)^2 (0 best), with resample weights ``w`` ([N] or [R, N]) for the bootstrap;
    equal to ``ecgfm.evaluation.calibration.brier_score`` without weights."""
    squared = (np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2
    if w is None:
        return float(squared.mean())
    weights = np.asarray(w, np.float64)
    total = weights.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ squared) / total


def _macro(
    report: Report, head: dict, plan: HeadPlan, units: Units, scored: list[int], settings: ReportSettings
) -> None:
    """The mean AUROC over the scored labels, with a patient-level bootstrap interval of that mean."""
    if len(scored) < 2:
        return
    y = units.targets[plan.target][:, [plan.columns[i] for i in scored]]
    score = np.stack([units.outputs[plan.outputs[i]] for i in scored], axis=1)
    known = np.isfinite(y)
    interval = _interval(
        macro_auroc, np.nan_to_num(y), score, known, groups=units.patient_id, strata=None, settings=settings
    )
    counts = {"n": len(units), "n_patients": units.n_patients}
    head["macro_auroc"] = _put(report, _key(settings, plan.name, "auroc"), interval, counts)
    head["n_labels_scored"] = len(scored)
    _put(report, _key(settings, plan.name, "n_labels_scored"), len(scored), counts)


def _class_confusion(report: Report, plan: HeadPlan, units: Units, settings: ReportSettings) -> dict[str, Any]:
    """The K x K confusion matrix of a multiclass or ordinal head: the true class against the model's own call
    (argmax or median level, made again on the aggregated probabilities), counts and row percentages."""
    y = units.targets[plan.target][:, plan.columns]
    labelled = np.isfinite(y).all(1) & (np.nan_to_num(y).max(1) > 0.5)
    truth = y[labelled].argmax(1)
    called = units.outputs[plan.decision][labelled].astype(np.int64)
    matrix = confusion_matrix(truth, called, list(range(len(plan.labels))))
    _figure(
        report,
        f"{plan.name}-classes-confusion.png",
        fig.confusion_figure(
            [(f"{plan.name} ({int(labelled.sum())} {settings.unit}s)", matrix["counts"], plan.labels)],
            f"{plan.name}: true class against the model's call",
        ),
        f"Confusion matrix of {plan.name}'s classes: the model's own call (the most probable class, or the median "
        "level), counts and row percentages.",
    )
    return {
        "labels": list(plan.labels),
        "decision": plan.decision,
        "n": int(labelled.sum()),
        "counts": matrix["counts"].tolist(),
        "row_percent": matrix["row_percent"].tolist(),
    }


def _classification_figures(
    report: Report,
    plan: HeadPlan,
    head: dict,
    curves: list,
    reliability: list,
    matrices: list,
    settings: ReportSettings,
) -> None:
    """ROC, precision-recall, calibration and confusion figures of one head (only for the labels scored)."""
    if not curves:
        return
    unit = f"{settings.split} split, one point per {settings.unit}"
    roc = [fig.Curve(label, y, s, _legend(label, _as_interval(e["auroc"]))) for label, y, s, e in curves]
    pr = [fig.Curve(label, y, s, _legend(label, _as_interval(e["auprc"]))) for label, y, s, e in curves]
    _figure(
        report,
        f"{plan.name}-roc.png",
        fig.roc_figure(roc, f"{plan.name}: ROC ({unit})", settings.level),
        f"ROC curves of {plan.name}; legend: AUROC with its {settings.level:.0%} patient-level bootstrap interval.",
    )
    _figure(
        report,
        f"{plan.name}-pr.png",
        fig.pr_figure(pr, f"{plan.name}: precision-recall ({unit})", settings.level),
        f"Precision-recall curves of {plan.name}; dotted lines: each label's prevalence (a random score).",
    )
    _figure(
        report,
        f"{plan.name}-calibration.png",
        fig.calibration_figure(reliability, f"{plan.name}: calibration ({unit})", "ECE and Brier score"),
        "Reliability: predicted probability (bin mean) against the observed fraction of positives.",
    )
    _figure(
        report,
        f"{plan.name}-confusion.png",
        fig.confusion_figure(matrices, f"{plan.name}: at the validation thresholds"),
        "Confusion matrices at each label's threshold chosen on validation: counts and row percentages.",
    )


def _as_interval(entry: Mapping[str, Any] | None) -> Interval | None:
    if not entry or "low" not in entry:
        return None
    return Interval(entry["estimate"], entry["low"], entry["high"], entry.get("level", 0.95), entry.get("method", ""))


def _figure(report: Report, name: str, figure: Any, caption: str) -> None:
    report.figures[name] = figure
    report.captions[name] = caption


def _classification_subgroups(
    report: Report,
    plan: HeadPlan,
    units: Units,
    groups: Mapping[str, np.ndarray],
    head: dict,
    scored: list[int],
    settings: ReportSettings,
) -> list[dict[str, Any]]:
    """Per scored label, subgroup column and group: counts, AUROC and sensitivity/specificity at the label's
    threshold, with intervals where the group has ``min_group_positives`` positives and negatives."""
    rows = []
    entries = {entry["label"]: entry for entry in head["labels"]}
    for i in scored:
        for column, labels_of_rows in groups.items():
            for group in group_order(labels_of_rows):
                members = labels_of_rows == group
                label = plan.labels[i]
                y_all = units.targets[plan.target][:, plan.columns[i]]
                keep = np.flatnonzero(members & np.isfinite(y_all))
                y, score, patient = y_all[keep], units.outputs[plan.outputs[i]][keep], units.patient_id[keep]
                row: dict[str, Any] = {"column": column, "group": group, "label": label, **_counts(y, patient)}
                name = f"{column}={group}"
                if min(row["positives"], row["negatives"]) < settings.min_group_positives:
                    row["note"] = f"too few to score (fewer than {settings.min_group_positives} of a class)"
                else:
                    strata = strata_by_any_positive(y, patient)
                    row["auroc"] = _put(
                        report,
                        _key(settings, plan.name, "auroc", label, name),
                        _interval(auroc, y, score, groups=patient, strata=strata, settings=settings),
                        row,
                    )
                    operating = _binary_report(y, score, entries[label]["threshold"]["value"], patient, settings)
                    for metric in ("sensitivity", "specificity"):
                        value = operating.get(metric)
                        row[metric] = _put(
                            report,
                            _key(settings, plan.name, metric, label, name),
                            value if isinstance(value, Interval) else None,
                            row,
                        )
                rows.append(row)
    _subgroup_figure(report, plan, rows, head, "auroc", "AUROC")
    return rows


def _subgroup_figure(report: Report, plan: HeadPlan, rows: list[dict], head: dict, metric: str, what: str) -> None:
    """A forest plot of ``metric`` per subgroup for the head's first scored label (or column) with most data."""
    scored = [row for row in rows if row.get(metric)]
    if not scored:
        return
    per_label: dict[str, int] = {}
    for row in scored:
        per_label[row["label"]] = per_label.get(row["label"], 0) + 1
    label = max(per_label, key=lambda name: per_label[name])  # the label with the most groups scored (first on ties)
    picked = [row for row in scored if row["label"] == label]
    overall = next(
        (e.get(metric) for e in head.get("labels", head.get("columns", [])) if e.get("label") == label), None
    )
    figure = fig.forest_figure(
        [
            (
                f"{row['column']} {row['group']} (n={row['n']})",
                row[metric]["estimate"],
                row[metric]["low"],
                row[metric]["high"],
            )
            for row in picked
        ],
        f"{plan.name} / {label}: {what} by subgroup",
        what,
        overall["estimate"] if overall else None,
    )
    _figure(
        report, f"{plan.name}-subgroups.png", figure, f"{what} of {label} per subgroup with its interval; dashed: all."
    )


# ----------------------------------------------------------------------------------------------------- regression


def _score_regression(
    report: Report, plan: HeadPlan, evaluation: Evaluation, groups: Mapping[str, np.ndarray], settings: ReportSettings
) -> None:
    """Per column: MAE, RMSE, Pearson r, Bland-Altman, scatter and the classification at its clinical cut-offs;
    then MAE per subgroup."""
    from ecgfm.evaluation import calibration

    units = evaluation.units
    head: dict[str, Any] = {"kind": plan.kind, "target": plan.target, "columns": [], "not_scored": []}
    for i, label in enumerate(plan.labels):
        rows, y, pred, patient = _label_arrays(units, plan, i)
        unit_text = plan.units[i]
        entry: dict[str, Any] = {
            "label": label,
            "output": plan.outputs[i],
            "unit": unit_text,
            "n": int(len(y)),
            "n_patients": int(len(np.unique(patient.astype(str)))),
        }
        if len(y) < max(3, settings.min_positives):
            least = max(3, settings.min_positives)
            entry["reason"] = f"{len(y)} {settings.unit}s with a value in {settings.split} (fewer than {least})"
            head["not_scored"].append(entry)
            continue
        for metric, function in (("mae", mae), ("rmse", rmse), ("pearson_r", pearson_r)):
            entry[metric] = _put(
                report,
                _key(settings, plan.name, metric, label),
                _interval(function, y, pred, groups=patient, strata=None, settings=settings),
                entry,
            )
        agreement = calibration.bland_altman(pred, y, level=settings.level)
        entry["bland_altman"] = {
            "bias": _put(report, _key(settings, plan.name, "bias", label), agreement["bias_ci"], entry),
            "loa_low": _put(report, _key(settings, plan.name, "loa_low", label), agreement["loa_low_ci"], entry),
            "loa_high": _put(report, _key(settings, plan.name, "loa_high", label), agreement["loa_high_ci"], entry),
            "sd": agreement["sd"],
        }
        entry["cutoffs"] = _cutoff_results(report, plan, label, y, pred, patient, plan.cutoffs[i], settings)
        head["columns"].append(entry)
        title = f"{plan.name} / {label}"
        ba = {key: entry["bland_altman"][key]["estimate"] for key in ("bias", "loa_low", "loa_high")}
        _figure(
            report,
            f"{plan.name}-{_slug(label)}-bland-altman.png",
            fig.bland_altman_figure(
                y,
                pred,
                ba["bias"],
                ba["loa_low"],
                ba["loa_high"],
                f"{title}: Bland-Altman ({settings.unit}s)",
                unit_text,
            ),
            f"Bland-Altman of {label}: bias and 95 % limits of agreement of prediction - truth.",
        )
        mae_text = f"MAE {_as_interval(entry['mae'])}" if entry.get("mae") else ""
        _figure(
            report,
            f"{plan.name}-{_slug(label)}-scatter.png",
            fig.scatter_figure(
                y, pred, f"{title}: prediction vs truth", unit_text, [c for _, c in plan.cutoffs[i]], mae_text
            ),
            f"Predicted against measured {label}; dotted: the clinical cut-offs.",
        )
        derived = [(c["name"], c["y"], c["score"], c) for c in entry["cutoffs"] if c.get("auroc")]
        if derived:
            roc = [fig.Curve(name, y_c, s_c, _legend(name, _as_interval(c["auroc"]))) for name, y_c, s_c, c in derived]
            _figure(
                report,
                f"{plan.name}-{_slug(label)}-cutoffs-roc.png",
                fig.roc_figure(roc, f"{title}: ROC at the clinical cut-offs", settings.level),
                f"ROC of the predicted {label} as a score for each clinical class.",
            )
        for c in entry["cutoffs"]:
            c.pop("y", None), c.pop("score", None)
    head["subgroups"] = _regression_subgroups(report, plan, units, groups, head, settings)
    report.results["heads"][plan.name] = head


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "column"


def _cutoff_results(
    report: Report,
    plan: HeadPlan,
    label: str,
    y: np.ndarray,
    pred: np.ndarray,
    patient: np.ndarray,
    cutoffs: Sequence[tuple[str, float]],
    settings: ReportSettings,
) -> list[dict[str, Any]]:
    """Per cut-off (``>``, 5.5): the true class from the measured value, the predicted value as its score (AUROC),
    and sensitivity, specificity, PPV and NPV of calling the class where the prediction crosses the same cut-off."""
    out = []
    for op, value in cutoffs:
        name = f"{label} {op} {value:g}"
        truth = _OPERATORS[op](y, value).astype(np.float64)
        score = pred if op in (">", ">=") else -pred
        entry: dict[str, Any] = {"name": name, "op": op, "value": value, **_counts(truth, patient)}
        if min(entry["positives"], entry["negatives"]) < settings.min_positives:
            fewest = min(entry["positives"], entry["negatives"])
            entry["reason"] = f"{fewest} {settings.unit}s on one side (fewer than {settings.min_positives})"
            out.append(entry)
            continue
        operating = regression_threshold_report(
            pred, y, value, op, groups=patient, strata=strata_by_any_positive(truth, patient), level=settings.level,
            n_resamples=settings.n_resamples, seed=settings.seed, proportion_interval=_proportions(patient),
        )  # fmt: skip
        auroc_ = operating["auroc"]
        entry["auroc"] = _put(
            report, _key(settings, plan.name, "auroc", name), auroc_ if math.isfinite(auroc_.low) else None, entry
        )
        for metric in ("sensitivity", "specificity", "ppv", "npv"):
            value_ = operating.get(metric)
            entry[metric] = _put(
                report,
                _key(settings, plan.name, metric, name),
                value_ if isinstance(value_, Interval) else None,
                entry,
            )
        entry["confusion"] = {key: int(operating[key]) for key in ("tp", "fp", "fn", "tn")}
        entry["y"], entry["score"] = truth, score
        out.append(entry)
    return out


def _regression_subgroups(
    report: Report, plan: HeadPlan, units: Units, groups: Mapping[str, np.ndarray], head: dict, settings: ReportSettings
) -> list[dict[str, Any]]:
    """Per subgroup column, group and scored column: n and MAE with its interval."""
    rows = []
    scored = {entry["label"] for entry in head["columns"]}
    for i, label in enumerate(plan.labels):
        if label not in scored:
            continue
        for column, labels_of_rows in groups.items():
            for group in group_order(labels_of_rows):
                y_all = units.targets[plan.target][:, plan.columns[i]]
                keep = np.flatnonzero((labels_of_rows == group) & np.isfinite(y_all))
                y, pred, patient = y_all[keep], units.outputs[plan.outputs[i]][keep], units.patient_id[keep]
                row: dict[str, Any] = {
                    "column": column,
                    "group": group,
                    "label": label,
                    "n": int(len(y)),
                    "n_patients": int(len(np.unique(patient.astype(str)))),
                }
                if len(y) < max(3, settings.min_group_positives):
                    row["note"] = f"fewer than {max(3, settings.min_group_positives)} {settings.unit}s"
                else:
                    row["mae"] = _put(
                        report,
                        _key(settings, plan.name, "mae", label, f"{column}={group}"),
                        _interval(mae, y, pred, groups=patient, strata=None, settings=settings),
                        row,
                    )
                rows.append(row)
    _subgroup_figure(report, plan, rows, head, "mae", "MAE")
    return rows


# ----------------------------------------------------------------------------------------------------- saliency


def _saliency(
    report: Report, plan: HeadPlan, model: Any, root: Path, evaluation: Evaluation, settings: ReportSettings
) -> None:
    """Saliency of the true positives with the highest scores (one per label, best-scored labels first), drawn on a
    paper ECG: the segment of each record (or patient) where the score was highest."""
    if settings.saliency_examples < 1:
        return
    head = report.results["heads"][plan.name]
    candidates = _saliency_candidates(plan, head, evaluation.units)
    examples = []
    for output, label, row, threshold in candidates[: settings.saliency_examples]:
        try:
            examples.append(
                _saliency_example(
                    report, plan, model, root, evaluation, settings, output, label, row, threshold, len(examples)
                )
            )
        except ValueError as err:  # e.g. a backbone that reads pages, not signals: said in the report, not fatal
            head.setdefault("saliency_notes", []).append(f"{label}: {err}")
    head["saliency"] = examples


def _saliency_candidates(plan: HeadPlan, head: dict, units: Units) -> list[tuple[str, str, int, float]]:
    """``(output, label, unit row, threshold)``: per scored label (highest AUROC first), its true positive with the
    highest score."""
    out = []
    if plan.kind in CLASSIFICATION_KINDS:
        entries = sorted(head["labels"], key=lambda e: -(e.get("auroc") or {}).get("estimate", 0.0))
        for entry in entries:
            i = plan.labels.index(entry["label"])
            threshold = entry["threshold"]["value"]
            y = units.targets[plan.target][:, plan.columns[i]]
            score = units.outputs[plan.outputs[i]]
            hits = np.flatnonzero((y > 0.5) & (score >= threshold))
            if len(hits):
                out.append((plan.outputs[i], entry["label"], int(hits[np.argmax(score[hits])]), threshold))
    else:
        for entry in head["columns"]:
            i = plan.labels.index(entry["label"])
            for cut in entry["cutoffs"]:
                op, value = cut["op"], cut["value"]
                y, pred = units.targets[plan.target][:, plan.columns[i]], units.outputs[plan.outputs[i]]
                with np.errstate(invalid="ignore"):
                    hits = np.flatnonzero(_OPERATORS[op](y, value) & _OPERATORS[op](pred, value))
                if len(hits):
                    best = hits[np.argmax(pred[hits] if op in (">", ">=") else -pred[hits])]
                    out.append((plan.outputs[i], cut["name"], int(best), value))
                    break
    return out


def _saliency_example(
    report: Report,
    plan: HeadPlan,
    model: Any,
    root: Path,
    evaluation: Evaluation,
    settings: ReportSettings,
    output: str,
    label: str,
    row: int,
    threshold: float,
    number: int,
) -> dict[str, Any]:
    """Attribute ``output`` on the best-scored segment of unit ``row`` and draw it; returns what the page says."""
    from ecgfm.data.dataset import ShardDataset
    from ecgfm.evaluation.saliency import attribute, plot_saliency
    from ecgfm.leads import lead_indices
    from ecgfm.signal import to_millivolts

    segments, units = evaluation.segments, evaluation.units
    members = np.flatnonzero(units.members == row)
    best = members[np.argmax(segments.outputs[output][members])]
    dataset = ShardDataset(root, segments.positions[[best]])
    batch = dataset.__getitems__([0])
    columns = lead_indices(model.leads, [lead.strip() for lead in dataset.manifest.lead_names])
    signal = to_millivolts(batch["signal"])[:, columns]
    lead_mask = batch["lead_mask"][:, columns]
    device = next(model.parameters()).device
    attribution = attribute(model, signal.to(device), output, settings.saliency_method, lead_mask.to(device))
    value = float(segments.outputs[output][best])
    start_s = float(segments.segment_start[best]) / float(dataset.manifest.fs)
    title = (
        f"{plan.name} / {label}: {output} = {value:.3g} (threshold {threshold:.3g})\n{settings.unit} "
        f"{units.ids[row]}, patient {units.patient_id[row]}, window at {start_s:g} s; "
        f"{settings.saliency_method.replace('_', ' ')}"
    )
    figure = plot_saliency(
        signal[0].numpy(), attribution[0].detach().cpu().numpy(), model.input_contract.fs, model.leads, title
    )
    name = f"{plan.name}-saliency-{number + 1}.png"
    _figure(
        report,
        name,
        figure,
        f"Saliency: where the model looked for {label} ({settings.saliency_method.replace('_', ' ')}).",
    )
    return {
        "label": label,
        "output": output,
        "unit_id": str(units.ids[row]),
        "patient_id": str(units.patient_id[row]),
        "value": value,
        "window_start_s": start_s,
        "figure": f"figures/{name}",
    }
