"""Metrics in numpy that take resample weights, so a bootstrap is matrix algebra instead of thousands of copies.

Every metric here takes the arrays of one evaluation (``y`` first) and optional weights ``w``: ``None`` (every row
counts once), ``[N]`` (row i counts ``w[i]`` times: one resample), or ``[R, N]`` (R resamples at once; the result is
then ``[R]``). Integer weights are exactly "row i drawn ``w[i]`` times", so a metric on weights equals the metric on
the resampled copy; :func:`ecgfm.evaluation.bootstrap.bootstrap_ci` feeds them patient-level resample counts.

Each metric splits into a *preparation* that depends on the data only (sorting the scores, once) and an evaluation
of ``[R, N]`` weights (a few passes over the matrix): :func:`prepare_metric` returns the prepared form, which the
bootstrap calls chunk after chunk.

A metric that is undefined (AUROC without a positive or without a negative, a ratio with a zero denominator) is
NaN, never an exception: a bootstrap resample may lack a class, and the bootstrap leaves such resamples out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Prepared",
    "accuracy",
    "auprc",
    "auroc",
    "balanced_accuracy",
    "concordance",
    "confusion_counts",
    "f1",
    "mae",
    "mcc",
    "npv",
    "pdi",
    "pearson_r",
    "ppv",
    "prepare_metric",
    "rmse",
    "sensitivity",
    "specificity",
    "weight_matrix",
]

Evaluate = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Prepared:
    """A metric with its data fixed: ``evaluate`` maps float64 weights ``[R, n]`` to ``[R]`` values. When ``order``
    is set, ``evaluate`` expects the weights' columns in that order (e.g. sorted by score, so it slices where it
    would gather); the bootstrap then writes its counts in that order directly."""

    n: int
    evaluate: Evaluate
    order: np.ndarray | None = None

    def __call__(self, w: Any = None) -> Any:
        """The metric at weights ``w`` (``None``, ``[n]`` or ``[R, n]``, rows in the data's order): a float, or
        ``[R]`` for a matrix."""
        W, single = _weights(w, self.n)
        values = self.evaluate(W if self.order is None else W[:, self.order])
        return float(values[0]) if single else values


def prepared_by(prepare: Callable[..., Prepared]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach ``prepare`` (same arguments as the metric, without ``w``) to a metric, for :func:`prepare_metric`."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.prepare = prepare
        return fn

    return mark


def weight_matrix(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a metric of your own as taking ``w`` of shape ``[R, N]`` and returning ``[R]`` values: the bootstrap then
    calls it once per chunk of resamples instead of once per resample."""
    fn.accepts_weight_matrix = True
    return fn


def prepare_metric(metric: Callable[..., Any], *arrays: Any) -> Prepared | None:
    """The prepared form of ``metric`` on ``arrays`` (``functools.partial`` arguments included), or None when the
    metric is neither one of this module's nor marked by :func:`weight_matrix` (the bootstrap then calls it once
    per resample)."""
    args: tuple[Any, ...] = ()
    keywords: dict[str, Any] = {}
    while isinstance(metric, functools.partial):
        args, keywords = metric.args + args, {**metric.keywords, **keywords}
        metric = metric.func
    if getattr(metric, "accepts_weight_matrix", False) and not hasattr(metric, "prepare"):
        fn, given = metric, (*args, *arrays)
        return Prepared(len(arrays[0]), lambda W: np.asarray(fn(*given, w=W, **keywords), np.float64).reshape(len(W)))
    prepare = getattr(metric, "prepare", None)
    return None if prepare is None else prepare(*args, *arrays, **keywords)


# ----------------------------------------------------------------------------------------------------------- inputs


def _weights(w: Any, n: int) -> tuple[np.ndarray, bool]:
    """``w`` as a float64 ``[R, N]`` matrix, and whether the caller gave one set (``None`` or ``[N]``)."""
    if w is None:
        return np.ones((1, n)), True
    w = np.asarray(w, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[-1] != n:
        raise ValueError(f"weights must be [N] or [R, N] with N = {n} rows, got shape {w.shape}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative (they count how often each row is drawn)")
    return (w[None, :], True) if w.ndim == 1 else (w, False)


def _binary(y: Any, name: str = "y") -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.dtype == bool:
        return y
    values = y.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be 0/1 (or boolean); found values {np.unique(values)[:5].tolist()}")
    return values == 1.0


def _scores(score: Any, n: int, name: str = "score") -> np.ndarray:
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if score.shape != (n,):
        raise ValueError(f"{name} has {score.shape[0]} values for {n} labels")
    if not np.isfinite(score).all():
        raise ValueError(f"{name} has NaN or infinite values: drop those rows first")
    return score


def _levels(y: Any, n_levels: int | None = None) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    levels = y.astype(np.int64)
    if not np.array_equal(levels, y.astype(np.float64)) or (levels < 0).any():
        raise ValueError("levels must be integers 0, 1, ..., K-1")
    if n_levels is not None and levels.size and levels.max() >= n_levels:
        raise ValueError(f"levels go up to {int(levels.max())} but there are {n_levels} categories")
    return levels


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two ``[R, M]`` matrices."""
    return np.einsum("rm,rm->r", a, b)


def _cumulative(W: np.ndarray, columns: np.ndarray | slice) -> np.ndarray:
    """``[R, M + 1]``: 0, then the running sum of ``W``'s ``columns`` in the order given."""
    out = np.zeros((len(W), len(columns) + 1))
    np.cumsum(W[:, columns], axis=1, out=out[:, 1:])
    return out


# ------------------------------------------------------------------------------------------------------ discrimination


def _by_level_and_score(levels: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, dict[int, slice]]:
    """Rows ordered by level, then by descending score within a level; each level's columns as a slice."""
    order = np.lexsort((-score, levels))
    bounds = np.searchsorted(levels[order], np.unique(levels), side="left").tolist() + [len(levels)]
    return order, {int(k): slice(a, b) for k, a, b in zip(np.unique(levels), bounds[:-1], bounds[1:], strict=True)}


def _mann_whitney(high: np.ndarray, low: np.ndarray, at_high: slice, at_low: slice) -> Callable[[np.ndarray], tuple]:
    """Prepared weighted Mann-Whitney U of the scores ``high`` (descending) over the scores ``low`` (descending),
    whose weights are the columns ``at_high`` and ``at_low``: ``evaluate(W) -> (U, W_high, W_low)``, where
    U = sum over (i high, j low) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2)."""
    above = np.searchsorted(-high, -low, side="left")  # high scores strictly above each low score
    at_or_above = np.searchsorted(-high, -low, side="right")
    tied = np.flatnonzero(above != at_or_above)  # low scores that some high score equals
    tied_above, tied_at_or_above = above[tied], at_or_above[tied]
    tied_columns = np.arange(at_low.start, at_low.stop)[tied]

    def evaluate(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cum = np.zeros((len(W), high.size + 1))
        np.cumsum(W[:, at_high], axis=1, out=cum[:, 1:])
        w_low = W[:, at_low]
        u = _dot(w_low, np.take(cum, above, axis=1))
        if tied.size:  # each tie with a high score counts 1/2
            half = np.take(cum, tied_at_or_above, axis=1) - np.take(cum, tied_above, axis=1)
            u += 0.5 * _dot(np.take(W, tied_columns, axis=1), half)
        return u, cum[:, -1], w_low.sum(1)

    return evaluate


def _prepare_auroc(y: Any, score: Any) -> Prepared:
    y = _binary(y)
    score = _scores(score, len(y))
    order, at = _by_level_and_score(y.astype(np.int64), score)
    pos, neg = at.get(1, slice(0, 0)), at.get(0, slice(len(y), len(y)))
    mann_whitney = _mann_whitney(score[order][pos], score[order][neg], pos, neg)

    def evaluate(W: np.ndarray) -> np.ndarray:
        u, w_pos, w_neg = mann_whitney(W)
        return _ratio(u, w_pos * w_neg)

    return Prepared(len(y), evaluate, order)


@prepared_by(_prepare_auroc)
def auroc(y: Any, score: Any, w: Any = None) -> Any:
    """Weighted area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2 (the
    Mann-Whitney U / (n_pos n_neg)). NaN when the positives or the negatives weigh nothing."""
    return _prepare_auroc(y, score)(w)


def _prepare_auprc(y: Any, score: Any) -> Prepared:
    y = _binary(y)
    score = _scores(score, len(y))
    order, at = _by_level_and_score(y.astype(np.int64), score)
    pos, neg = at.get(1, slice(0, 0)), at.get(0, slice(len(y), len(y)))
    s_pos, s_neg = score[order][pos], score[order][neg]
    # every positive is a threshold: rows scoring at least as much as it are called, ties included
    pos_called = np.searchsorted(-s_pos, -s_pos, side="right")
    neg_called = np.searchsorted(-s_neg, -s_pos, side="right")

    def evaluate(W: np.ndarray) -> np.ndarray:
        w_pos = W[:, pos]
        cum_pos, cum_neg = np.zeros((len(W), s_pos.size + 1)), np.zeros((len(W), s_neg.size + 1))
        np.cumsum(w_pos, axis=1, out=cum_pos[:, 1:])
        np.cumsum(W[:, neg], axis=1, out=cum_neg[:, 1:])
        tp = np.take(cum_pos, pos_called, axis=1)
        called = tp + np.take(cum_neg, neg_called, axis=1)
        precision = np.zeros_like(tp)
        np.divide(tp, called, out=precision, where=called > 0)
        return _ratio(_dot(w_pos, precision), cum_pos[:, -1])

    return Prepared(len(y), evaluate, order)


@prepared_by(_prepare_auprc)
def auprc(y: Any, score: Any, w: Any = None) -> Any:
    """Weighted average precision (area under the precision-recall curve as a step function, as scikit-learn's
    ``average_precision_score``): the mean over positives of the precision at the threshold equal to their score."""
    return _prepare_auprc(y, score)(w)


def _prepare_concordance(y: Any, score: Any, average: str = "pairs") -> Prepared:
    if average not in ("pairs", "categories"):
        raise ValueError(f"average must be 'pairs' or 'categories', got {average!r}")
    levels = _levels(y)
    score = _scores(score, len(levels))
    order, at = _by_level_and_score(levels, score)
    ordered = score[order]
    present = sorted(at)
    pairs = [
        _mann_whitney(ordered[at[high]], ordered[at[low]], at[high], at[low])
        for i, low in enumerate(present)
        for high in present[i + 1 :]
    ]

    def evaluate(W: np.ndarray) -> np.ndarray:
        wins, total, aucs = np.zeros(len(W)), np.zeros(len(W)), []
        for mann_whitney in pairs:
            u, w_high, w_low = mann_whitney(W)
            wins, total = wins + u, total + w_high * w_low
            aucs.append(_ratio(u, w_high * w_low))
        if average == "pairs":
            return _ratio(wins, total)
        stacked = np.stack(aucs) if aucs else np.full((1, len(W)), np.nan)
        finite = np.isfinite(stacked)
        return _ratio(np.where(finite, stacked, 0.0).sum(0), finite.sum(0))

    return Prepared(len(levels), evaluate, order)


@prepared_by(_prepare_concordance)
def concordance(y: Any, score: Any, w: Any = None, average: str = "pairs") -> Any:
    """Concordance of a score with an ordinal outcome: over pairs of cases at different levels, the weighted share
    where the higher level has the higher score (ties 1/2). ``pairs``: Harrell's c; ``categories``: Van Calster's
    ordinal c-index (ORC), the mean over level pairs of their AUROC. Same values as ``ecgfm.metrics``."""
    return _prepare_concordance(y, score, average)(w)


def _prepare_pdi(y: Any, probs: Any) -> Prepared:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {probs.shape}")
    n, k_levels = probs.shape
    levels = _levels(y, k_levels)
    if levels.shape != (n,):
        raise ValueError(f"y has {levels.shape[0]} values for {n} rows of probabilities")
    if not np.isfinite(probs).all():
        raise ValueError("probs has NaN or infinite values: drop those rows first")
    rows = [np.flatnonzero(levels == j) for j in range(k_levels)]
    plans = []  # per category k: its cases and, per other category, the other cases below and tied in p_k
    for k in range(k_levels):
        own = probs[rows[k], k]
        others = []
        for j in range(k_levels):
            if j != k:
                other = rows[j][np.argsort(probs[rows[j], k], kind="stable")]
                below = np.searchsorted(probs[other, k], own, side="left")
                others.append((other, below, np.searchsorted(probs[other, k], own, side="right")))
        plans.append(others)

    def evaluate(W: np.ndarray) -> np.ndarray:
        totals = np.stack([W[:, r].sum(1) for r in rows], 1)  # [R, K]
        per_level = np.zeros((len(W), k_levels))
        for k, others in enumerate(plans):
            poly = np.ones((len(W), len(rows[k]), 1))  # per case of k: coefficients of z^0 .. z^m (m ties)
            for other, below, at_or_below in others:
                cum = _cumulative(W, other)
                strictly, tied = cum[:, below], cum[:, at_or_below] - cum[:, below]
                nxt = np.zeros(poly.shape[:2] + (poly.shape[2] + 1,))
                nxt[..., :-1] += poly * strictly[..., None]
                nxt[..., 1:] += poly * tied[..., None]
                poly = nxt
            credit = poly @ (1.0 / np.arange(1, poly.shape[2] + 1))  # [R, n_k]: the case's share of wins
            per_level[:, k] = _dot(W[:, rows[k]], credit)
        return _ratio(per_level.sum(1), k_levels * totals.prod(1))

    return Prepared(n, evaluate)


@prepared_by(_prepare_pdi)
def pdi(y: Any, probs: Any, w: Any = None) -> Any:
    """Polytomous discrimination index (Van Calster et al. 2012), weighted: over sets of one case per category, the
    share in which category k's case has the highest probability of k (ties share the win), averaged over the K
    categories. 1/K = no discrimination; NaN if a category weighs nothing. Same value as ``ecgfm.metrics``."""
    return _prepare_pdi(y, probs)(w)


# ---------------------------------------------------------------------------------------------------------- regression


def _linear(n: int, numerators: list[np.ndarray], combine: Callable[..., np.ndarray]) -> Prepared:
    """A metric of weighted sums: ``combine(total weight, W @ v for v in numerators)``."""
    matrix = np.stack(numerators, 1)  # [N, M]

    def evaluate(W: np.ndarray) -> np.ndarray:
        sums = W @ matrix
        return combine(W.sum(1), *sums.T)

    return Prepared(n, evaluate)


def _pair(y: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if not np.isfinite(y).all():
        raise ValueError("y has NaN or infinite values: drop the unlabelled rows first")
    return y, _scores(pred, len(y), "pred")


def _prepare_mae(y: Any, pred: Any) -> Prepared:
    y, pred = _pair(y, pred)
    return _linear(len(y), [np.abs(pred - y)], lambda total, err: _ratio(err, total))


@prepared_by(_prepare_mae)
def mae(y: Any, pred: Any, w: Any = None) -> Any:
    """Weighted mean absolute error |pred - y|, in the target's unit."""
    return _prepare_mae(y, pred)(w)


def _prepare_rmse(y: Any, pred: Any) -> Prepared:
    y, pred = _pair(y, pred)
    return _linear(len(y), [(pred - y) ** 2], lambda total, sq: np.sqrt(_ratio(sq, total)))


@prepared_by(_prepare_rmse)
def rmse(y: Any, pred: Any, w: Any = None) -> Any:
    """Weighted root mean squared error, in the target's unit."""
    return _prepare_rmse(y, pred)(w)


def _prepare_pearson(y: Any, pred: Any) -> Prepared:
    y, pred = _pair(y, pred)
    # centred on the full data's means, so the sums of squares do not cancel catastrophically
    y, pred = y - y.mean(), pred - pred.mean()

    def combine(total, sy, sp, syy, spp, syp):
        my, mp = _ratio(sy, total), _ratio(sp, total)
        cov = syp - total * my * mp
        var = np.maximum(syy - total * my * my, 0.0) * np.maximum(spp - total * mp * mp, 0.0)
        return _ratio(cov, np.sqrt(var))

    return _linear(len(y), [y, pred, y * y, pred * pred, y * pred], combine)


@prepared_by(_prepare_pearson)
def pearson_r(y: Any, pred: Any, w: Any = None) -> Any:
    """Weighted Pearson correlation of predictions with the truth (NaN when either is constant)."""
    return _prepare_pearson(y, pred)(w)


# ------------------------------------------------------------------------------------------------------ decisions


def _cells(y: Any, called: Any) -> list[np.ndarray]:
    """Indicators of the four cells TP, FP, FN, TN, as float columns."""
    y = _binary(y)
    called = _binary(called, "called")
    if called.shape != y.shape:
        raise ValueError(f"called has {called.shape[0]} values for {y.shape[0]} labels")
    return [(y & called) * 1.0, (~y & called) * 1.0, (y & ~called) * 1.0, (~y & ~called) * 1.0]


def confusion_counts(y: Any, called: Any, w: Any = None) -> dict[str, Any]:
    """Weighted true/false positives and negatives of 0/1 calls: ``{"tp", "fp", "fn", "tn"}``, each a float (``[R]``
    arrays for a weight matrix)."""
    cells = _cells(y, called)
    W, single = _weights(w, len(cells[0]))
    sums = W @ np.stack(cells, 1)
    return {key: float(sums[0, i]) if single else sums[:, i] for i, key in enumerate(("tp", "fp", "fn", "tn"))}


def _decision_metric(combine: Callable[..., np.ndarray]) -> Callable[..., Prepared]:
    def prepare(y: Any, called: Any) -> Prepared:
        cells = _cells(y, called)
        return _linear(len(cells[0]), cells, lambda _total, tp, fp, fn, tn: combine(tp, fp, fn, tn))

    return prepare


_prepare_sensitivity = _decision_metric(lambda tp, fp, fn, tn: _ratio(tp, tp + fn))
_prepare_specificity = _decision_metric(lambda tp, fp, fn, tn: _ratio(tn, tn + fp))
_prepare_ppv = _decision_metric(lambda tp, fp, fn, tn: _ratio(tp, tp + fp))
_prepare_npv = _decision_metric(lambda tp, fp, fn, tn: _ratio(tn, tn + fn))
_prepare_accuracy = _decision_metric(lambda tp, fp, fn, tn: _ratio(tp + tn, tp + fp + fn + tn))
_prepare_balanced = _decision_metric(lambda tp, fp, fn, tn: 0.5 * (_ratio(tp, tp + fn) + _ratio(tn, tn + fp)))
_prepare_f1 = _decision_metric(lambda tp, fp, fn, tn: _ratio(2 * tp, 2 * tp + fp + fn))
_prepare_mcc = _decision_metric(
    lambda tp, fp, fn, tn: _ratio(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
)


@prepared_by(_prepare_sensitivity)
def sensitivity(y: Any, called: Any, w: Any = None) -> Any:
    """TP / (TP + FN): the share of positives called positive (recall)."""
    return _prepare_sensitivity(y, called)(w)


@prepared_by(_prepare_specificity)
def specificity(y: Any, called: Any, w: Any = None) -> Any:
    """TN / (TN + FP): the share of negatives called negative."""
    return _prepare_specificity(y, called)(w)


@prepared_by(_prepare_ppv)
def ppv(y: Any, called: Any, w: Any = None) -> Any:
    """TP / (TP + FP): positive predictive value (precision), at this sample's prevalence."""
    return _prepare_ppv(y, called)(w)


@prepared_by(_prepare_npv)
def npv(y: Any, called: Any, w: Any = None) -> Any:
    """TN / (TN + FN): negative predictive value, at this sample's prevalence."""
    return _prepare_npv(y, called)(w)


@prepared_by(_prepare_accuracy)
def accuracy(y: Any, called: Any, w: Any = None) -> Any:
    """(TP + TN) / all: the share of rows called correctly."""
    return _prepare_accuracy(y, called)(w)


@prepared_by(_prepare_balanced)
def balanced_accuracy(y: Any, called: Any, w: Any = None) -> Any:
    """(sensitivity + specificity) / 2: accuracy that does not reward calling every row the majority class."""
    return _prepare_balanced(y, called)(w)


@prepared_by(_prepare_f1)
def f1(y: Any, called: Any, w: Any = None) -> Any:
    """2 TP / (2 TP + FP + FN): the harmonic mean of sensitivity and PPV."""
    return _prepare_f1(y, called)(w)


@prepared_by(_prepare_mcc)
def mcc(y: Any, called: Any, w: Any = None) -> Any:
    """Matthews correlation coefficient (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); NaN when a margin is
    empty (every row called, or truly, one class)."""
    return _prepare_mcc(y, called)(w)
