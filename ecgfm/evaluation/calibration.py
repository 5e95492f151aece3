"""Calibration of probabilities and agreement of measurements.

Discrimination (AUROC) says whether positives score higher; calibration says whether a predicted 30 % means 30 %,
which is what a clinician reads. Reliability curves, the expected calibration error and the Brier score measure it;
temperature scaling (Guo et al. 2017) repairs it on validation without changing any ranking or decision. For a
regression head (a potassium value), Bland-Altman limits of agreement say how far one prediction may be from the lab
value, and the derived-threshold report scores the clinical call (K+ > 5.5 mmol/L) the prediction implies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, stats

from ecgfm.evaluation.bootstrap import Interval, bootstrap_ci
from ecgfm.evaluation.metrics_np import auroc
from ecgfm.evaluation.thresholds import OPERATORS, binary_report

__all__ = [
    "KINDS",
    "bland_altman",
    "brier_score",
    "expected_calibration_error",
    "fit_temperature",
    "regression_threshold_report",
    "reliability_curve",
    "temperature_nll",
]

#: Output layouts :func:`fit_temperature` understands (one per classification head kind).
KINDS = ("binary", "multilabel", "multiclass", "ordinal")
#: Temperatures searched by :func:`fit_temperature` (a wider range only follows from degenerate data).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _probabilities(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary ``(y, p)``, or a multi-class ``p [N, K]`` with class indices ``y`` reduced to its top label: whether
    the most probable class is right, and its probability (the "confidence" of Guo et al. 2017)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    if p.ndim == 2:
        if y.shape != (len(p),):
            raise ValueError(f"with probabilities [N, K], y must be [N] class indices; got {y.shape}")
        return (p.argmax(1) == y.astype(np.int64)).astype(np.float64), p.max(1)
    p, y = p.reshape(-1), y.astype(np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"y has {y.size} values and p {p.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must be 0/1: drop the unlabelled (NaN) rows first")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be probabilities in [0, 1]")
    return y, p


def _edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":  # equal counts per bin; repeated quantiles (many equal p) merge bins
        return np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_curve(y: Any, p: Any, n_bins: int = 10, strategy: str = "uniform") -> dict[str, np.ndarray]:
    """Per bin of predicted probability: ``bin_low``, ``bin_high``, ``mean_predicted``, ``observed`` (fraction of
    positives) and ``count`` (NaN means in empty bins). ``uniform``: equal-width bins on [0, 1]; ``quantile``: bins
    holding equal numbers of cases. A bin holds ``bin_low <= p < bin_high`` (the last one includes its upper edge)."""
    y, p = _probabilities(y, p)
    edges = _edges(p, n_bins, strategy)
    n = max(len(edges) - 1, 1)
    index = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, n - 1)
    count = np.bincount(index, minlength=n).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n) / count
        observed = np.bincount(index, weights=y, minlength=n) / count
    low, high = (edges[:-1], edges[1:]) if len(edges) > 1 else (edges, edges)
    return {"bin_low": low, "bin_high": high, "mean_predicted": mean_predicted, "observed": observed, "count": count}


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """ECE = sum over bins of (cases in bin / N) |observed fraction - mean predicted probability| (Naeini et al.
    2015; Guo et al. 2017); 0 = calibrated. With ``p [N, K]``: the top-label ECE."""
    curve = reliability_curve(y, p, n_bins, strategy)
    used = curve["count"] > 0
    gap = np.abs(curve["observed"][used] - curve["mean_predicted"][used])
    return float((curve["count"][used] * gap).sum() / curve["count"].sum())


def brier_score(y: Any, p: Any) -> float:
    """Mean squared difference between probability and outcome (Brier 1950): binary, mean (p - y)^2; with ``p [N,
    K]`` and class indices ``y``, mean over cases of sum over classes of (p_k - [y = k])^2 (0 best, 2 worst)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if y.shape != (len(p),) or (y < 0).any() or (y >= p.shape[1]).any():
            raise ValueError(f"with probabilities [N, K], y must be [N] class indices in 0..K-1; got {y[:5]}")
        onehot = np.eye(p.shape[1])[y]
        return float(((p - onehot) ** 2).sum(1).mean())
    y, p = _probabilities(y, p)
    return float(((p - y) ** 2).mean())


# --------------------------------------------------------------------------------------------------- temperature


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _ordinal_log_probs(z: np.ndarray) -> np.ndarray:
    """[N, K] log P(y = k) from [N, K-1] cumulative logits z_k = f - c_k (as ``OrdinalHead.log_category_probs``)."""
    first, last = _log_sigmoid(-z[:, :1]), _log_sigmoid(z[:, -1:])
    upper, lower = z[:, :-1], z[:, 1:]
    gap = np.maximum(upper - lower, 1e-12)
    middle = _log_sigmoid(upper) + _log_sigmoid(-lower) + np.log(-np.expm1(-gap))
    return np.concatenate([first, middle, last], 1)


def _nll_function(logits: Any, y: Any, kind: str) -> Any:
    """A function of the temperature -> the mean negative log-likelihood of ``logits / T`` (labelled entries only)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    z = np.asarray(logits, dtype=np.float64)
    if kind in ("binary", "multilabel"):
        y = np.asarray(y, dtype=np.float64)
        z, y = (z.reshape(-1), y.reshape(-1)) if kind == "binary" else (z, y)
        if z.shape != y.shape:
            raise ValueError(f"logits {z.shape} and y {y.shape} differ in shape")
        known = np.isfinite(y)
        if not np.isin(y[known], (0.0, 1.0)).all():
            raise ValueError("y must be 0/1 (NaN for unlabelled entries)")
        z, sign = z[known], 2.0 * y[known] - 1.0
        return len(z), lambda t: float(np.logaddexp(0.0, -sign * z / t).mean())
    if z.ndim != 2:
        raise ValueError(f"{kind} logits must be [N, K], got shape {z.shape}")
    y = np.asarray(y)
    if y.ndim == 2:  # one-hot rows (the shards' layout): unlabelled rows have NaN or no 1
        labelled = np.isfinite(y).all(1) & (np.nan_to_num(y).max(1) > 0.5)
        y, z = np.nan_to_num(y[labelled]).argmax(1), z[labelled]
    y = y.astype(np.int64).reshape(-1)
    n_classes = z.shape[1] + (1 if kind == "ordinal" else 0)
    if y.shape != (len(z),) or (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"y must be [N] class indices in 0..{n_classes - 1} (or one-hot rows)")
    rows = np.arange(len(z))
    if kind == "multiclass":
        return len(z), lambda t: float((np.logaddexp.reduce(z / t, axis=1) - z[rows, y] / t).mean())
    return len(z), lambda t: float(-_ordinal_log_probs(z / t)[rows, y].mean())


def temperature_nll(logits: Any, y: Any, kind: str, temperature: float = 1.0) -> float:
    """The mean negative log-likelihood of ``y`` under ``logits / temperature`` (what :func:`fit_temperature`
    minimises): NLL before and after scaling shows what the temperature bought."""
    _, nll = _nll_function(logits, y, kind)
    return nll(float(temperature))


def fit_temperature(logits: Any, y: Any, kind: str = "binary") -> float:
    """The temperature T > 0 minimising the NLL of ``logits / T`` on validation (Guo et al. 2017): one scalar per
    head, stored in the head's ``temperature`` buffer. ``kind``: ``binary`` (logits [N], y 0/1), ``multilabel``
    ([N, K], NaN = unlabelled), ``multiclass`` ([N, K], class indices or one-hot) or ``ordinal`` ([N, K-1]
    cumulative logits, level indices or one-hot). T > 1 softens over-confident probabilities; rankings and argmax /
    threshold decisions do not change. Searched in [0.05, 20]; an optimum at a bound is an error, not a T: at 20 the
    logits carry no signal on these labels (the NLL falls as the probabilities flatten), at 0.05 they are all
    separable, and either way a stored T would quietly change every probability."""
    n, nll = _nll_function(logits, y, kind)
    if n == 0:
        raise ValueError("fit_temperature needs labelled validation outputs; got none")
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = optimize.minimize_scalar(
        lambda log_t: nll(math.exp(log_t)), bounds=(low, high), method="bounded", options={"xatol": 1e-7}
    )
    if high - result.x < 1e-3:
        raise ValueError(
            f"the validation NLL keeps falling up to T = {TEMPERATURE_BOUNDS[1]:g} (the bound) on {n} labelled "
            "values: the logits carry no signal on these labels, and a temperature cannot calibrate them"
        )
    if result.x - low < 1e-3:
        raise ValueError(
            f"the validation NLL keeps falling down to T = {TEMPERATURE_BOUNDS[0]:g} (the bound) on {n} labelled "
            "values: the classes are perfectly separated there, which leaves no temperature to estimate"
        )
    return float(math.exp(result.x))


# --------------------------------------------------------------------------------------------------- agreement


def bland_altman(pred: Any, true: Any, level: float = 0.95, limits_z: float | None = None) -> dict[str, Any]:
    """Agreement of predictions with measurements (Bland & Altman 1986): the differences d = pred - true have
    ``bias`` (mean d) and ``sd``; the limits of agreement bias -+ z sd (z = 1.96 for 95 %, or ``limits_z``) hold
    ~95 % of single differences. Intervals (1999 paper): bias -+ t sd / sqrt(n); each limit -+ t sd sqrt(3 / n)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"pred has {pred.size} values and true {true.size}")
    known = np.isfinite(pred) & np.isfinite(true)
    d = pred[known] - true[known]
    n = int(d.size)
    if n < 3:
        raise ValueError(f"Bland-Altman needs at least 3 pairs with both values; got {n}")
    z = float(stats.norm.ppf(0.5 + level / 2)) if limits_z is None else float(limits_z)
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    t = float(stats.t.ppf(0.5 + level / 2, n - 1))
    se_bias, se_limit = sd / math.sqrt(n), sd * math.sqrt(3.0 / n)
    low, high = bias - z * sd, bias + z * sd
    method = "Bland-Altman, t interval"
    return {
        "bias": bias,
        "sd": sd,
        "loa_low": low,
        "loa_high": high,
        "n": n,
        "bias_ci": Interval(bias, bias - t * se_bias, bias + t * se_bias, level, method),
        "loa_low_ci": Interval(low, low - t * se_limit, low + t * se_limit, level, method),
        "loa_high_ci": Interval(high, high - t * se_limit, high + t * se_limit, level, method),
    }


def regression_threshold_report(
    pred: Any,
    true: Any,
    cutoff: float,
    direction: str = ">",
    groups: Any = None,
    strata: Any = None,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    proportion_interval: str = "wilson",
) -> dict[str, Any]:
    """The clinical call a regression implies, scored against the lab's (e.g. hyperkalaemia as K+ > 5.5 mmol/L):
    both the measured and the predicted value are classified by ``true/pred direction cutoff``, then
    :func:`~ecgfm.evaluation.thresholds.binary_report`; plus the AUROC of the prediction for the measured call."""
    if direction not in OPERATORS:
        raise ValueError(f"direction must be one of {sorted(OPERATORS)}, got {direction!r}")
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"pred has {pred.size} values and true {true.size}")
    known = np.isfinite(pred) & np.isfinite(true)
    groups = None if groups is None else np.asarray(groups).reshape(-1)[known]
    strata = None if strata is None else np.asarray(strata).reshape(-1)[known]
    pred, true = pred[known], true[known]
    y = OPERATORS[direction](true, float(cutoff))
    report = binary_report(
        y,
        pred,
        cutoff,
        groups=groups,
        strata=strata,
        op=direction,
        level=level,
        n_resamples=n_resamples,
        seed=seed,
        proportion_interval=proportion_interval,
    )
    report["cutoff"], report["direction"] = float(cutoff), direction
    score = pred if direction in (">", ">=") else -pred  # higher score = more likely on the cut-off's side
    if y.all() or not y.any():
        report["auroc"] = Interval(math.nan, math.nan, math.nan, level, "undefined: one class")
    else:
        report["auroc"] = bootstrap_ci(
            auroc, y, score, groups=groups, strata=strata, n_resamples=n_resamples, level=level, seed=seed
        )
    return report
