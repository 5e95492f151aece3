"""Confidence intervals for a proportion (sensitivity, specificity, PPV, NPV, accuracy: k of n cases).

Wilson's score interval is the default: it stays inside [0, 1], is not degenerate at 0 or n successes, and its
coverage is close to nominal even for small n (Newcombe 1998, Brown, Cai & DasGupta 2001), unlike the Wald interval
p +- z sqrt(p (1 - p) / n). Clopper-Pearson's "exact" interval guarantees at least nominal coverage, at the price of
being wider. Both treat the n cases as independent: with several records per patient, use the patient bootstrap.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ecgfm.evaluation.bootstrap import Interval

__all__ = ["clopper_pearson_interval", "wilson_interval"]


def _check(successes: float, n: float, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"a proportion needs 0 <= successes <= n, got {successes} of {n}")


def wilson_interval(successes: float, n: float, level: float = 0.95) -> Interval:
    """Wilson (1927) score interval of ``successes / n``: the proportions p whose score test |p_hat - p| /
    sqrt(p (1 - p) / n) <= z does not reject. NaN interval when n is 0 (e.g. PPV with nothing called positive)."""
    _check(successes, n, level)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, level, "Wilson score")
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if successes == 0:
        low = 0.0  # exact at the boundary (the formula gives 0 up to rounding)
    if successes == n:
        high = 1.0
    return Interval(p, low, high, level, "Wilson score")


def clopper_pearson_interval(successes: float, n: float, level: float = 0.95) -> Interval:
    """Clopper-Pearson (1934) "exact" interval from beta quantiles: [B((1 - level) / 2; k, n - k + 1),
    B((1 + level) / 2; k + 1, n - k)], with 0 and 1 at k = 0 and k = n. NaN interval when n is 0."""
    _check(successes, n, level)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, level, "Clopper-Pearson exact")
    alpha = 1 - level
    k = successes
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(float(np.float64(k) / n), low, high, level, "Clopper-Pearson exact")
