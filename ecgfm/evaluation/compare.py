"""Two models on the same cases: DeLong's test of their AUROCs and a paired patient-level bootstrap of any metric.

Both use the pairing: the two models' errors on one case are correlated, so comparing two separate intervals
(overlapping or not) is the wrong test. DeLong's test treats cases as independent; with several records per
patient, use :func:`paired_bootstrap` with ``groups``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from ecgfm.evaluation.bootstrap import Interval, bootstrap_distributions, percentile_interval, point_estimate

__all__ = ["delong_ci", "delong_covariance", "delong_test", "paired_bootstrap"]


def _binary_labels(y: Any) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if not np.isin(y.astype(np.float64), (0.0, 1.0)).all():
        raise ValueError("y must be 0/1 (or boolean)")
    return y.astype(np.float64) == 1.0


def _finite_scores(scores: Any, n: int) -> np.ndarray:
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != n:
        raise ValueError(f"scores have {scores.shape[1]} values for {n} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores have NaN or infinite values: drop those rows first")
    return scores


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of each row of ``x`` [k, m], tied values sharing the mean of their ranks (Sun & Xu's T)."""
    order = np.argsort(x, axis=1, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    for row in range(x.shape[0]):
        ordered = x[row, order[row]]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        mid = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
        ranks[row, order[row]] = np.repeat(mid, ends - starts)
    return ranks


def delong_covariance(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k scores of the same cases and their k x k covariance matrix (DeLong, DeLong & Clarke-Pearson 1988),
    computed from midranks in O(k n log n) (Sun & Xu 2014, "Fast implementation of DeLong's algorithm")."""
    y = _binary_labels(y)
    scores = _finite_scores(scores, len(y))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives; got {m} and {n}")
    positives, negatives = scores[:, y], scores[:, ~y]
    tx, ty, tz = _midranks(positives), _midranks(negatives), _midranks(np.concatenate([positives, negatives], 1))
    aucs = tz[:, :m].sum(1) / (m * n) - (m + 1) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives: share of negatives each one beats
    v10 = 1.0 - (tz[:, m:] - ty) / m  # of the negatives: share of positives that beat each one
    covariance = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, covariance


def delong_ci(y: Any, score: Any, level: float = 0.95) -> Interval:
    """AUROC with DeLong's asymptotic interval, AUC +- z SE (what pROC's ``ci.auc`` gives by default), clipped to
    [0, 1]."""
    aucs, covariance = delong_covariance(y, score)
    z = float(stats.norm.ppf(0.5 + level / 2))
    se = math.sqrt(max(float(covariance[0, 0]), 0.0))
    auc = float(aucs[0])
    return Interval(auc, max(0.0, auc - z * se), min(1.0, auc + z * se), level, "DeLong")


def delong_test(y: Any, score_a: Any, score_b: Any, level: float = 0.95) -> dict[str, Any]:
    """DeLong's test that two correlated AUROCs (two models' scores of the same cases) are equal: ``{"auc_a",
    "auc_b", "diff" (a - b), "se", "z", "p_value" (two-sided), "ci" (Interval of the difference)}``. Identical
    scores give z = 0 and p = 1."""
    score_a, score_b = (np.asarray(s, dtype=np.float64).reshape(-1) for s in (score_a, score_b))
    if score_a.shape != score_b.shape:
        raise ValueError(f"score_a has {score_a.size} values and score_b {score_b.size}: score the same cases")
    aucs, covariance = delong_covariance(y, np.stack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    se = math.sqrt(max(variance, 0.0))
    if se > 0:
        z_value = diff / se
    else:  # no variance in the difference: equal AUROCs are not evidence of anything, unequal ones certain
        z_value = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    p_value = float(2 * stats.norm.sf(abs(z_value)))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "z": z_value,
        "p_value": p_value,
        "ci": Interval(diff, diff - z * se, diff + z * se, level, "DeLong"),
    }


def paired_bootstrap(
    metric: Callable[..., Any],
    y: Any,
    score_a: Any,
    score_b: Any,
    groups: Any = None,
    strata: Any = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(y, score)`` of two models on the same resamples of patients: ``{"a", "b", "diff" (a - b): Interval,
    "p_value"}``. The p-value is two-sided, 2 min(P*(diff <= 0), P*(diff >= 0)) over the resamples (at most 1)."""
    y, score_a, score_b = (np.asarray(x) for x in (y, score_a, score_b))
    estimate_a, estimate_b = point_estimate(metric, [y, score_a]), point_estimate(metric, [y, score_b])
    a, b = bootstrap_distributions([(metric, (y, score_a)), (metric, (y, score_b))], groups, strata, n_resamples, seed)
    diff = a - b
    finite = diff[np.isfinite(diff)]
    if not finite.size:
        raise ValueError("the metric is undefined (NaN) on every resample: too few cases of a class?")
    p_value = min(1.0, 2 * min(float((finite <= 0).mean()), float((finite >= 0).mean())))
    unit = "row" if groups is None else "patient"
    method = f"paired {'stratified ' if strata is not None else ''}{unit} bootstrap, {n_resamples} resamples"
    return {
        "a": percentile_interval(estimate_a, a, level, method),
        "b": percentile_interval(estimate_b, b, level, method),
        "diff": percentile_interval(estimate_a - estimate_b, diff, level, method),
        "p_value": p_value,
    }
