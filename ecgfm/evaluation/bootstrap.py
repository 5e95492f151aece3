"""Confidence intervals by a patient-level, stratified bootstrap, vectorised through resample weights.

Why by patient: a patient's records (and a record's windows) are not independent cases, so resampling rows would
understate the uncertainty; each resample draws *patients* with replacement and takes every row of a drawn patient,
as many times as it was drawn. Why stratified: drawing patients within strata (e.g. patients with any positive
record vs none) keeps every resample's class balance, so no resample lacks positives.

A resample is a ``[N]`` vector of counts (how often each row was drawn). The metrics of
:mod:`ecgfm.evaluation.metrics_np` sort their data once and then take ``[R, N]`` counts for many resamples at once;
another metric that takes ``w`` receives one ``[N]`` vector per resample; any other metric receives the resampled
copy of its arrays (slow, but any function works).

The draws, so that anyone can reproduce them: ``rng = numpy.random.default_rng(seed)``; patients are the sorted
unique values of ``groups``, strata the sorted unique values of ``strata``; for each resample in turn, for each
stratum in turn, ``rng.integers(0, m, m)`` picks (positions among) that stratum's ``m`` patients, in sorted order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ecgfm.evaluation.metrics_np import auprc, auroc, mae, prepare_metric

__all__ = [
    "Interval",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "bootstrap_distribution",
    "bootstrap_distributions",
    "bootstrap_indices",
    "mae",
    "percentile_interval",
    "point_estimate",
    "strata_by_any_positive",
]

#: Upper bound on the elements of one ``[resamples, rows]`` chunk (float64: 32 MiB), which fixes the chunk size.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; ``method`` says how the interval was made (``dropped``:
    bootstrap resamples where the metric was undefined, left out of the percentiles)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = ""
    dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and strings, for ``metrics.json`` and loggers."""
        return {key: (float(v) if isinstance(v, float | np.floating) else v) for key, v in asdict(self).items()}

    def format(self, digits: int = 3) -> str:
        """``0.912 (0.871-0.948)``; `` to `` separates the limits when one is negative."""
        low, high = f"{self.low:.{digits}f}", f"{self.high:.{digits}f}"
        sep = " to " if self.low < 0 or self.high < 0 else "-"
        return f"{self.estimate:.{digits}f} ({low}{sep}{high})"

    def __str__(self) -> str:
        return self.format()


def strata_by_any_positive(y: Any, groups: Any) -> np.ndarray:
    """Per row, 1 if its patient has any positive row and 0 otherwise: the usual strata of a stratified bootstrap of a
    binary outcome (ignores NaN labels)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    _, patient = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    if patient.shape != y.shape:
        raise ValueError(f"groups has {patient.shape[0]} values for {y.shape[0]} labels")
    positive = np.zeros(patient.max() + 1 if patient.size else 0, dtype=bool)
    np.logical_or.at(positive, patient, np.nan_to_num(y) > 0.5)
    return positive[patient].astype(np.int64)


def _patients(groups: Any, strata: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each row's patient index (into the sorted unique groups) and, per stratum in sorted order, its patients."""
    groups = np.asarray(groups).reshape(-1)
    _, patient = np.unique(groups, return_inverse=True)
    patient = patient.reshape(-1)
    n_patients = int(patient.max()) + 1 if patient.size else 0
    if strata is None:
        return patient, [np.arange(n_patients)]
    strata = np.asarray(strata).reshape(-1)
    if strata.shape != groups.shape:
        raise ValueError(f"strata has {strata.shape[0]} values for {groups.shape[0]} rows")
    _, stratum = np.unique(strata, return_inverse=True)
    stratum = stratum.reshape(-1)
    of_patient = np.full(n_patients, -1)
    of_patient[patient] = stratum
    if (of_patient[patient] != stratum).any():
        bad = groups[np.flatnonzero(of_patient[patient] != stratum)[0]]
        raise ValueError(f"patient {bad!r} has rows in two strata: strata must be constant within a patient")
    return patient, [np.flatnonzero(of_patient == s) for s in range(int(stratum.max()) + 1)]


def _count_chunks(
    groups: Any, n_resamples: int, seed: int, strata: Any, chunk: int | None, dtype: Any, order: Any = None
) -> Iterator[np.ndarray]:
    """The resamples' row counts, ``[c, N]`` of ``dtype`` at a time (see :func:`bootstrap_indices`); with ``order``,
    the columns are the rows in that order."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    patient, members = _patients(groups, strata)
    n_rows, n_patients = len(patient), sum(len(m) for m in members)
    if n_rows == 0:
        raise ValueError("cannot bootstrap no rows")
    column_patient = patient if order is None else patient[np.asarray(order)]
    one_row_each = n_patients == n_rows
    if one_row_each:  # a stratum's draw counts go straight to its patients' columns
        column_of = np.empty(n_rows, dtype=np.int64)
        column_of[column_patient] = np.arange(n_rows)
        targets = [column_of[m] for m in members]
    chunk = chunk or max(1, CHUNK_ELEMENTS // n_rows)
    rng = np.random.default_rng(seed)
    per_patient = np.zeros(n_patients, dtype=np.int64)
    for start in range(0, n_resamples, chunk):
        counts = np.empty((min(chunk, n_resamples - start), n_rows), dtype=dtype)
        for r in range(len(counts)):
            for s, m in enumerate(members):  # positions among the stratum's patients, drawn with replacement
                drawn = np.bincount(rng.integers(0, len(m), len(m)), minlength=len(m))
                if one_row_each:
                    counts[r, targets[s]] = drawn
                else:
                    per_patient[m] = drawn
            if not one_row_each:
                counts[r] = per_patient[column_patient]
        yield counts


def bootstrap_indices(
    groups: Any, n_resamples: int = 2000, seed: int = 0, strata: Any = None, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Yield ``[c, N]`` int arrays, c resamples at a time (``n_resamples`` in all): how often each of the N rows is in
    that resample. Patients (``groups``) are drawn with replacement within each stratum; a drawn patient brings all
    its rows. ``np.repeat(np.arange(N), counts)`` turns one resample into row indices."""
    yield from _count_chunks(groups, n_resamples, seed, strata, chunk, np.int32)


def _takes_w(metric: Callable[..., Any]) -> bool:
    try:
        return "w" in inspect.signature(metric).parameters
    except (TypeError, ValueError):
        return False


def _evaluator(
    metric: Callable[..., Any], arrays: Sequence[np.ndarray]
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray | None]:
    """A function of a ``[c, N]`` chunk of counts -> the metric on each of those ``c`` resamples, and the column
    order it wants the counts in (None: the rows' order)."""
    prepared = prepare_metric(metric, *arrays)
    if prepared is not None:
        return prepared.evaluate, prepared.order
    if _takes_w(metric):
        return (lambda counts: np.array([float(metric(*arrays, w=row)) for row in counts])), None
    rows = np.arange(len(arrays[0]))

    def on_copies(counts: np.ndarray) -> np.ndarray:
        copies = (np.repeat(rows, c.astype(np.int64)) for c in counts)
        return np.array([float(metric(*(a[index] for a in arrays))) for index in copies])

    return on_copies, None


def _arrays(arrays: Sequence[Any]) -> list[np.ndarray]:
    if not arrays:
        raise ValueError("give the metric's arrays (y_true, y_score, ...)")
    out = [np.asarray(a) for a in arrays]
    n = len(out[0])
    if any(len(a) != n for a in out):
        raise ValueError(f"the arrays differ in length: {[len(a) for a in out]} (one row per case in each)")
    return out


def bootstrap_distributions(
    evaluations: Sequence[tuple[Callable[..., Any], Sequence[Any]]],
    groups: Any = None,
    strata: Any = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> list[np.ndarray]:
    """Several ``(metric, arrays)`` on the *same* patient-level resamples (paired comparisons, one table's metrics):
    one ``[n_resamples]`` array per evaluation (NaN where the metric is undefined on a resample)."""
    prepared = [(metric, _arrays(arrays)) for metric, arrays in evaluations]
    n = len(prepared[0][1][0])
    if any(len(arrays[0]) != n for _, arrays in prepared):
        raise ValueError("every evaluation must cover the same rows (one per case)")
    groups = np.arange(n) if groups is None else np.asarray(groups).reshape(-1)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} values for {n} rows")
    evaluators = [_evaluator(metric, arrays) for metric, arrays in prepared]
    orders = [order for _, order in evaluators]
    shared = orders[0] if all(o is orders[0] for o in orders) else None  # one metric: counts come in its order

    def evaluate_chunk(counts: np.ndarray) -> list[np.ndarray]:
        return [
            np.asarray(evaluate(counts if order is None or order is shared else counts[:, order]), np.float64).reshape(
                len(counts)
            )
            for evaluate, order in evaluators
        ]

    chunks: list[list[np.ndarray]] = []
    # the draws (one generator, in order) overlap with the evaluation of the chunk before, in a second thread
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for counts in _count_chunks(groups, n_resamples, seed, strata, None, np.float64, shared):
            submitted = pool.submit(evaluate_chunk, counts)
            if pending is not None:
                chunks.append(pending.result())
            pending = submitted
        if pending is not None:
            chunks.append(pending.result())
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(evaluators))]


def bootstrap_distribution(
    metric: Callable[..., Any],
    *arrays: Any,
    groups: Any = None,
    strata: Any = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """The metric on each of ``n_resamples`` patient-level resamples, ``[n_resamples]`` (NaN where undefined)."""
    return bootstrap_distributions([(metric, arrays)], groups, strata, n_resamples, seed)[0]


def percentile_interval(estimate: float, values: Any, level: float = 0.95, method: str = "bootstrap") -> Interval:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the finite
    ``values``, around ``estimate``; undefined resamples are counted in ``dropped``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise ValueError("the metric is undefined (NaN) on every resample: too few cases of a class?")
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), level, method, int(values.size - finite.size))


def _name(metric: Callable[..., Any]) -> str:
    while hasattr(metric, "func"):
        metric = metric.func
    return getattr(metric, "__name__", type(metric).__name__)


def point_estimate(metric: Callable[..., Any], arrays: Sequence[np.ndarray]) -> float:
    """The metric on the full data; a clear error when it is undefined there (no resample can then mean anything)."""
    estimate = float(metric(*arrays))
    if not np.isfinite(estimate):
        raise ValueError(
            f"{_name(metric)} is undefined on the full data ({estimate}): e.g. only one class, or an empty denominator"
        )
    return estimate


def bootstrap_ci(
    metric: Callable[..., Any],
    *arrays: Any,
    groups: Any = None,
    strata: Any = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric(*arrays)`` (e.g. ``auroc, y, score``), resampling patients
    (``groups``, one id per row; default: every row its own patient) within ``strata``; the estimate is the metric
    on the full data. Extra metric arguments: pass ``functools.partial(metric, ...)``."""
    arrays = _arrays(arrays)
    estimate = point_estimate(metric, arrays)
    values = bootstrap_distribution(metric, *arrays, groups=groups, strata=strata, n_resamples=n_resamples, seed=seed)
    unit = "patient" if groups is not None else "row"
    kind = "stratified " if strata is not None else ""
    return percentile_interval(estimate, values, level, f"{kind}{unit} bootstrap, {n_resamples} resamples")
