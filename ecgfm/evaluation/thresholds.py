"""Decision thresholds and what they give: choose a threshold on validation, apply it unchanged to test.

A threshold chosen on the test set reports an optimistic operating point (the threshold is fitted to those very
cases), so :func:`choose_threshold` runs on validation outputs and :func:`binary_report` applies the returned number
to test outputs as it is. A call is ``score >= threshold`` (``op`` changes the comparison, e.g. ``>`` for K+ > 5.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecgfm.evaluation import metrics_np as m
from ecgfm.evaluation.bootstrap import Interval, bootstrap_distributions, percentile_interval
from ecgfm.evaluation.proportions import clopper_pearson_interval, wilson_interval

__all__ = ["METHODS", "OPERATORS", "binary_report", "choose_threshold", "confusion_matrix", "operating_points"]

#: ``youden`` (max sensitivity + specificity - 1) and ``balanced_accuracy`` (max of their mean) pick the same
#: threshold; ``sensitivity``/``specificity``/``npv``/``ppv`` reach at least ``value``; ``fixed`` is ``value``.
METHODS = ("youden", "balanced_accuracy", "sensitivity", "specificity", "npv", "ppv", "fixed")
OPERATORS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}


def _validated(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = m._binary(y)
    return y, m._scores(score, len(y))


def operating_points(y: Any, score: Any) -> dict[str, np.ndarray]:
    """Every distinct operating point of ``score >= t``: ``t`` (+inf: call nothing, then the distinct scores,
    descending), and at each the counts ``tp, fp, fn, tn`` and sensitivity, specificity, PPV and NPV (NaN where a
    denominator is 0)."""
    y, score = _validated(y, score)
    thresholds = np.r_[np.inf, np.unique(score)[::-1]]
    ordered = np.sort(score[y])
    tp = len(ordered) - np.searchsorted(ordered, thresholds, side="left")
    ordered = np.sort(score[~y])
    fp = len(ordered) - np.searchsorted(ordered, thresholds, side="left")
    fn, tn = y.sum() - tp, (~y).sum() - fp
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    return {
        "threshold": thresholds,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": m._ratio(tp, tp + fn),
        "specificity": m._ratio(tn, tn + fp),
        "ppv": m._ratio(tp, tp + fp),
        "npv": m._ratio(tn, tn + fn),
    }


def choose_threshold(y: Any, score: Any, method: str, value: float | None = None) -> float:
    """The threshold t (calls are ``score >= t``) that ``method`` picks on these (validation) outputs.

    ``youden``/``balanced_accuracy``: max sensitivity + specificity (the highest such t on ties); ``sensitivity``
    (``specificity``): the highest (lowest) t whose sensitivity (specificity) is at least ``value``; ``npv``: the
    highest t with NPV >= ``value`` (rule-out: the most cases called negative); ``ppv``: the lowest t with PPV >=
    ``value`` (rule-in: the most cases called positive); ``fixed``: ``value`` itself (a clinical cut-off, e.g. 5.5
    mmol/L on a potassium regression). The t returned is one of the validation scores (or +inf: call nothing).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "fixed" and method not in ("youden", "balanced_accuracy") and value is None:
        raise ValueError(f"method {method!r} needs value (the {method} to reach, e.g. 0.9)")
    if method == "fixed":
        if value is None or not math.isfinite(float(value)):
            raise ValueError("method 'fixed' needs a finite value (the cut-off)")
        return float(value)
    points = operating_points(y, score)
    if not (points["tp"][0] + points["fn"][0]) or not (points["tn"][0] + points["fp"][0]):
        raise ValueError(f"choosing a threshold by {method!r} needs positives and negatives in y")
    t = points["threshold"]
    if method in ("youden", "balanced_accuracy"):
        quality = points["sensitivity"] + points["specificity"]
        return float(t[int(np.argmax(quality))])  # thresholds descend: argmax takes the highest on ties
    reached = np.nan_to_num(points[method], nan=-1.0) >= float(value)
    if not reached.any():
        best = np.nanmax(points[method])
        raise ValueError(f"no threshold reaches {method} >= {value} on these outputs (the best is {best:.4f})")
    # sensitivity and NPV: the highest threshold that reaches the value; specificity and PPV: the lowest one
    index = np.flatnonzero(reached)[0 if method in ("sensitivity", "npv") else -1]
    return float(t[index])


def _called(score: np.ndarray, threshold: float, op: str) -> np.ndarray:
    if op not in OPERATORS:
        raise ValueError(f"op must be one of {sorted(OPERATORS)}, got {op!r}")
    return OPERATORS[op](score, float(threshold))


#: Each proportion's successes and failures among the four counts.
PROPORTIONS = {
    "sensitivity": (("tp",), ("fn",)),
    "specificity": (("tn",), ("fp",)),
    "ppv": (("tp",), ("fp",)),
    "npv": (("tn",), ("fn",)),
    "accuracy": (("tp", "tn"), ("fp", "fn")),
}


def binary_report(
    y: Any,
    score: Any,
    threshold: float,
    groups: Any = None,
    strata: Any = None,
    op: str = ">=",
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    proportion_interval: str = "wilson",
) -> dict[str, Any]:
    """Counts and every rate at ``score op threshold`` (a threshold from validation, applied as it is), each an
    :class:`Interval`: sensitivity, specificity, PPV, NPV and accuracy by Wilson's interval (``proportion_interval``:
    ``wilson``, ``clopper_pearson`` or ``bootstrap``); F1, MCC and balanced accuracy by the patient bootstrap
    (``groups``, ``strata``). Wilson treats records as independent: with several per patient, ask for ``bootstrap``.
    """
    y, score = _validated(y, score)
    if proportion_interval not in ("wilson", "clopper_pearson", "bootstrap"):
        raise ValueError(f"proportion_interval must be wilson, clopper_pearson or bootstrap: {proportion_interval!r}")
    called = _called(score, threshold, op)
    counts = {key: int(v) for key, v in m.confusion_counts(y, called).items()}
    report: dict[str, Any] = {"threshold": float(threshold), "op": op, "n": int(len(y)), **counts}
    report["positives"], report["negatives"] = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    interval = wilson_interval if proportion_interval == "wilson" else clopper_pearson_interval
    bootstrapped = {"f1": m.f1, "mcc": m.mcc, "balanced_accuracy": m.balanced_accuracy}
    if proportion_interval == "bootstrap":
        bootstrapped = {
            "sensitivity": m.sensitivity,
            "specificity": m.specificity,
            "ppv": m.ppv,
            "npv": m.npv,
            "accuracy": m.accuracy,
            **bootstrapped,
        }
    else:
        for name, (successes, failures) in PROPORTIONS.items():
            k = sum(counts[key] for key in successes)
            report[name] = interval(k, k + sum(counts[key] for key in failures), level)
    report.update(_bootstrapped(bootstrapped, y, called, groups, strata, n_resamples, level, seed))
    return report


def _bootstrapped(
    metrics: dict[str, Any],
    y: np.ndarray,
    called: np.ndarray,
    groups: Any,
    strata: Any,
    n_resamples: int,
    level: float,
    seed: int,
) -> dict[str, Interval]:
    """Percentile intervals of several decision metrics from one set of patient resamples (NaN estimate: NaN
    interval, e.g. MCC when nothing is called positive)."""
    names = list(metrics)
    values = bootstrap_distributions([(metrics[k], (y, called)) for k in names], groups, strata, n_resamples, seed)
    unit = "patient" if groups is not None else "row"
    method = f"{'stratified ' if strata is not None else ''}{unit} bootstrap, {n_resamples} resamples"
    out = {}
    for name, resampled in zip(names, values, strict=True):
        estimate = float(metrics[name](y, called))
        if not math.isfinite(estimate) or not np.isfinite(resampled).any():
            out[name] = Interval(estimate, math.nan, math.nan, level, method, int(np.isnan(resampled).sum()))
        else:
            out[name] = percentile_interval(estimate, resampled, level, method)
    return out


def confusion_matrix(y_true: Any, y_pred: Any, labels: Sequence[Any]) -> dict[str, Any]:
    """Counts (true label in rows, predicted in columns, in ``labels`` order) and row percentages (each true
    class's share called as each class; NaN for a class with no cases)."""
    labels = list(labels)
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values and y_pred {y_pred.size}")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"labels are repeated: {labels}")
    unknown = sorted({str(v) for v in np.concatenate([y_true, y_pred]).tolist() if v not in index})
    if unknown:
        raise ValueError(f"values not in labels {labels}: {unknown[:5]}")
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[v] for v in y_true.tolist()], [index[v] for v in y_pred.tolist()]), 1)
    totals = counts.sum(1, keepdims=True)
    row_percent = np.full(counts.shape, np.nan)
    np.divide(100.0 * counts, totals, out=row_percent, where=totals > 0)
    return {"labels": labels, "counts": counts, "row_percent": row_percent, "n": totals.reshape(-1)}
