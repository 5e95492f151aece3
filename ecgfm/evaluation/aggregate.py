"""A record's windows -> one prediction per record, in numpy (no torch): scores are averaged (or their maximum taken)
and the decisions are made again on the aggregate, at the model's stored thresholds, so a record's call is the one
the model would make on a window with the record's mean probability."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ecgfm.decisions import apply_decisions

__all__ = ["AGGREGATIONS", "aggregate_windows", "window_rows"]

#: ``mean`` of the windows' scores (the default), their ``max`` (a finding seen in any window), or ``none``: one row
#: per window, as the model gave it.
AGGREGATIONS = ("mean", "max", "none")


def aggregate_windows(
    outputs: Mapping[str, np.ndarray],
    score_names: Sequence[str],
    rules: Sequence[Mapping[str, Any]],
    method: str = "mean",
) -> dict[str, float | int]:
    """``{output: [W] array}`` of one record's windows -> ``{"n_windows": W, output: float}`` in ``outputs``' order.

    Scores (probabilities, values) are aggregated with ``method`` (``mean`` or ``max``); every decision that
    ``rules`` (``ecgfm.decisions``) makes is recomputed from the aggregated scores instead of averaging 0/1 calls.
    An output that is neither a score nor decided by a rule is aggregated like a score.
    """
    if method not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max' to give one row per record, got {method!r}")
    arrays = {name: np.asarray(value, dtype=np.float64).reshape(-1) for name, value in outputs.items()}
    lengths = {len(value) for value in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every output needs one value per window, and at least one window; got lengths {lengths}")
    decided = {rule["output"] for rule in rules}
    reduce = np.mean if method == "mean" else np.max
    scores = {
        name: np.asarray([reduce(value)])
        for name, value in arrays.items()
        if name in set(score_names) or name not in decided
    }
    decisions = apply_decisions(scores, rules)
    row: dict[str, float | int] = {"n_windows": lengths.pop()}
    for name in outputs:
        row[name] = float((decisions[name] if name in decisions else scores[name])[0])
    return row


def window_rows(outputs: Mapping[str, np.ndarray], starts_s: Sequence[float]) -> list[dict[str, float | int]]:
    """One row per window: its index, its start in seconds and every output as the model gave it for that window."""
    arrays = {name: np.asarray(value).reshape(-1) for name, value in outputs.items()}
    for name, value in arrays.items():
        if len(value) != len(starts_s):
            raise ValueError(f"output {name!r} has {len(value)} values for {len(starts_s)} windows")
    return [
        {"window": i, "start_s": float(start), **{name: float(value[i]) for name, value in arrays.items()}}
        for i, start in enumerate(starts_s)
    ]
